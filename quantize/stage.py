"""The quantize stage: from a checkpoint and a QuantScheme, every quantized matrix's codes and
scales, computed once and written to a QuantizedCheckpoint that every format then packs.

It streams block by block. Uncalibrated algorithms (rtn, hqq) round each matrix as it is read.
Calibrated ones (gptq, awq) run the calibration windows (WikiText-2 *validation*, never the test
split) through the model one block at a time, and inside a block one sub-layer at a time: the
attention projections see the block's input, `wo` sees the attention output computed with the
already quantized q/k/v, the FFN sees the quantized attention's residual, and the next block sees
this block's quantized output (GPTQ's "true sequential" order). Only one block's fp32 weights and
the calibration activations are alive at once, so 7B/8B stays inside 24 GB.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llamaship.bundle import work_dir
from llamaship.data import CALIB_FILE, data_file
from llamaship.errors import DataError, UnsupportedError
from llamaship.export.llama.model import apply_rope, position_tables
from llamaship.export.llama.spec import ModelSpec
from llamaship.export.llama.tokenizer import Tokenizer
from llamaship.progress import advance
from llamaship.quantize import algorithms
from llamaship.quantize.algorithms import Algorithm, awq_scales
from llamaship.quantize.checkpoint import QuantizedCheckpoint
from llamaship.quantize.codes import QTensor, rtn
from llamaship.quantize.scheme import QuantScheme

CALIB_WINDOW = 512
AWQ_SAMPLE_TOKENS = 4096  # activations the AWQ grid search scores each candidate on
ATTENTION = ("attention.wq", "attention.wk", "attention.wv")
FFN_IN = ("feed_forward.w1", "feed_forward.w3")


@dataclass(frozen=True)
class Calibration:
    tokens: torch.Tensor  # [windows, window] token ids

    def describe(self) -> dict[str, Any]:
        n, w = self.tokens.shape
        return {"file": CALIB_FILE, "split": "validation", "tokens": n * w, "windows": n, "window": w,
                "source": "WikiText-2 (raw) validation, the first tokens after the model's tokenizer"}


def calibration(tokenizer: Tokenizer, n_tokens: int, window: int = CALIB_WINDOW) -> Calibration:
    """The first `n_tokens` of WikiText-2 *validation*, in windows (each starting with BOS when
    the tokenizer has one, as a prompt does)."""
    text = data_file(CALIB_FILE).read_text()
    ids = tokenizer.encode(text[: n_tokens * 12], bos=False)
    per = window - 1
    n = min(n_tokens // window, len(ids) // per)
    if n == 0:
        raise DataError(f"{data_file(CALIB_FILE)} is too short for one calibration window of {window} tokens")
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else [ids[0]]
    rows = [bos + ids[i * per : (i + 1) * per] for i in range(n)]
    return Calibration(torch.tensor(rows, dtype=torch.long))


def matrix_names(spec: ModelSpec) -> list[str]:
    names = ["tok_embeddings.weight"]
    for i in range(spec.n_layers):
        names += [f"layers.{i}.{m}.weight" for m in (*ATTENTION, "attention.wo", *FFN_IN, "feed_forward.w2")]
    return [*names, "output.weight"]


class _Block:
    """One block's fp32 weights by short name ("attention.wq"), norms included, on `device`."""

    def __init__(self, state: Mapping[str, torch.Tensor], i: int, device: torch.device) -> None:
        p = f"layers.{i}."
        self.w = {m: state[p + m + ".weight"].to(device=device, dtype=torch.float32) for m in
                  (*ATTENTION, "attention.wo", *FFN_IN, "feed_forward.w2", "attention_norm", "ffn_norm")}


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def hessian(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return (flat.T @ flat) / flat.shape[0]


class Stage:
    """Runs one scheme over one checkpoint into `out` (see the module docstring)."""

    def __init__(self, spec: ModelSpec, state: Mapping[str, torch.Tensor], scheme: QuantScheme,
                 out: QuantizedCheckpoint, progress: Callable[[str], None]) -> None:
        self.spec, self.state, self.scheme, self.out, self.progress = spec, state, scheme, out, progress
        self.algo: Algorithm = algorithms.get(scheme.algorithm)
        self.algo.check(scheme.symmetric)
        # calibration runs on a CUDA device when one is present (never on this project's CI: the
        # CPU wheel of torch is installed there); the codes are the same kind either way
        self.device = torch.device("cuda" if self.algo.calibrated and torch.cuda.is_available() else "cpu")

    def round(self, w: torch.Tensor, bits: int, group: int, h: torch.Tensor | None) -> QTensor:
        if bits == 8:  # 8-bit matrices are per output channel (what XNNPACK's int8 GEMM takes)
            group = w.shape[1]
        if h is None and self.algo.calibrated:  # no activations for this matrix: plain rounding
            return rtn(w, bits, group, self.scheme.symmetric)
        return self.algo.quantize(w, bits, group, self.scheme.symmetric, h)

    def embedding(self) -> torch.Tensor:
        """Quantizes the embedding (never calibrated: it is a lookup) and returns the table the
        model will see, dequantized."""
        emb = self.state["tok_embeddings.weight"].float()
        if not self.scheme.embedding_bits:
            self.out.write_group("tok_embeddings", {}, {})
            return emb
        bits, g = self.scheme.embedding_bits, self.scheme.group_size
        qt = self.algo.quantize(emb, bits, g, self.scheme.symmetric) if not self.algo.calibrated \
            else rtn(emb, bits, g, self.scheme.symmetric)
        self.out.write_group("tok_embeddings", {"tok_embeddings.weight": qt}, {})
        return qt.dequantize()

    def head(self, x: torch.Tensor | None) -> None:
        if not self.scheme.lm_head_bits:
            self.out.write_group("output", {}, {})
            return
        w = self.state["output.weight"] if "output.weight" in self.state else self.state["tok_embeddings.weight"]
        h = None
        if x is not None:
            h = hessian(rms(x, self.state["norm.weight"].to(x.device, torch.float32), self.spec.norm_eps))
        self.progress(f"quantize: lm_head, {self.scheme.lm_head_bits}-bit per channel")
        self.out.write_group("output", {"output.weight": self.round(w.to(self.device, torch.float32),
                                                                    self.scheme.lm_head_bits,
                                                                    self.scheme.group_size, h)}, {})

    def block(self, i: int, x: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """Quantize block i; with calibration activations `x` [n, T, dim], return its quantized output."""
        b, bits, g = _Block(self.state, i, self.device), self.scheme.bits, self.scheme.group_size
        eps = self.spec.norm_eps
        q: dict[str, QTensor] = {}
        floats: dict[str, torch.Tensor] = {}
        if x is None:
            for m in (*ATTENTION, "attention.wo", *FFN_IN, "feed_forward.w2"):
                q[m] = self.round(b.w[m], bits, g, None)
        else:
            a = rms(x, b.w["attention_norm"], eps)
            a = self._scaled(b, "attention_norm", ATTENTION, a, floats)
            ha = hessian(a)
            for m in ATTENTION:
                q[m] = self.round(b.w[m], bits, g, ha)
            y = self._attention(a, q, cos, sin)
            q["attention.wo"] = self.round(b.w["attention.wo"], bits, g, hessian(y))
            h = x + y @ q["attention.wo"].dequantize().T
            f = rms(h, b.w["ffn_norm"], eps)
            f = self._scaled(b, "ffn_norm", FFN_IN, f, floats)
            hf = hessian(f)
            for m in FFN_IN:
                q[m] = self.round(b.w[m], bits, g, hf)
            mid = F.silu(f @ q["feed_forward.w1"].dequantize().T) * (f @ q["feed_forward.w3"].dequantize().T)
            q["feed_forward.w2"] = self.round(b.w["feed_forward.w2"], bits, g, hessian(mid))
            x = h + mid @ q["feed_forward.w2"].dequantize().T
        self.out.write_group(f"layers.{i}", {f"layers.{i}.{m}.weight": t for m, t in q.items()},
                             {f"layers.{i}.{n}.weight": t for n, t in floats.items()})
        return x

    def _scaled(self, b: _Block, norm: str, targets: tuple[str, ...], a: torch.Tensor,
                floats: dict[str, torch.Tensor]) -> torch.Tensor:
        """AWQ: scale the matrices' input channels by s and the norm by 1/s (same float output)."""
        if not self.algo.scales_inputs:
            return a
        flat = a.reshape(-1, a.shape[-1])
        sample = flat[torch.linspace(0, flat.shape[0] - 1, min(AWQ_SAMPLE_TOKENS, flat.shape[0])).long()]
        s = awq_scales([b.w[m] for m in targets], sample, flat.abs().mean(0), self.scheme.bits,
                       self.scheme.group_size, self.scheme.symmetric)
        for m in targets:
            b.w[m] = b.w[m] * s
        b.w[norm] = b.w[norm] / s
        floats[norm] = b.w[norm]
        return a / s

    def _attention(self, a: torch.Tensor, q: dict[str, QTensor], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n, t, _ = a.shape
        s = self.spec
        xq = apply_rope((a @ q["attention.wq"].dequantize().T).view(n, t, s.n_heads, s.head_dim), cos, sin)
        xk = apply_rope((a @ q["attention.wk"].dequantize().T).view(n, t, s.n_kv_heads, s.head_dim), cos, sin)
        xv = (a @ q["attention.wv"].dequantize().T).view(n, t, s.n_kv_heads, s.head_dim)
        y = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        return y.transpose(1, 2).reshape(n, t, -1)


@torch.no_grad()
def quantize_checkpoint(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], tokenizer: Tokenizer | None, scheme: QuantScheme,
    folder: Path, progress: Callable[[str], None] = print,
) -> QuantizedCheckpoint:
    """Write the scheme's codes for every quantized matrix into `folder` and return it
    (`tokenizer` cuts the calibration text; only calibrated algorithms need it)."""
    scheme.check_fits(spec)
    folder.mkdir(parents=True, exist_ok=True)
    out = QuantizedCheckpoint(folder)
    stage = Stage(spec, state, scheme, out, progress)
    t0 = time.perf_counter()
    calib = None
    if stage.algo.calibrated:
        if tokenizer is None:
            raise UnsupportedError(f"{scheme.algorithm} calibrates on text: it needs the checkpoint's tokenizer")
        calib = calibration(tokenizer, scheme.calibration_tokens)
    emb = stage.embedding()
    x = cos = sin = None
    if calib is not None:
        if stage.device.type == "cuda":
            progress(f"quantize: calibrating on {torch.cuda.get_device_name(stage.device)} (CUDA)")
        x = emb[calib.tokens].to(stage.device)
        cos, sin = (t.to(stage.device) for t in position_tables(spec, calib.tokens.shape[1]))
    del emb
    label = f"quantize ({scheme.algorithm}" + (f", {calib.tokens.numel()} calibration tokens)" if calib else ")")
    for i in range(spec.n_layers):
        advance(progress, label, i, spec.n_layers)
        x = stage.block(i, x, cos if cos is not None else torch.empty(0), sin if sin is not None else torch.empty(0))
    advance(progress, label, spec.n_layers, spec.n_layers)
    stage.head(x)
    out.finish({"algorithm": scheme.algorithm, "params": stage.algo.params(),
                "calibration": calib.describe() if calib else None,
                "seconds": round(time.perf_counter() - t0, 1)})
    return out


@contextmanager
def stage_output(spec: ModelSpec, state: Mapping[str, torch.Tensor], scheme: QuantScheme,
                 quantized: QuantizedCheckpoint | None, parent: Path, progress: Callable[[str], None],
                 tokenizer: Tokenizer | None = None) -> Iterator[QuantizedCheckpoint]:
    """`quantized` when the pipeline already ran the stage; else the stage's output in a temp
    folder beside the artifact, removed afterwards (an exporter called on its own)."""
    if quantized is not None:
        yield quantized
        return
    folder = work_dir(parent, "llamaship-quant")
    try:
        yield quantize_checkpoint(spec, state, tokenizer, scheme, folder, progress)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
