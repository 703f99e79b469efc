"""Builds the NPU graph's parts unit by unit, so the host never holds the float model.

In dataflow order, each unit (qnn_units.py) is exported as a float graph from the quantize stage's
weights, calibrated on WikiText-2 *validation* chunks, quantized to w4a16 (qnn_quant.py) and then
run quantized on the CPU to make the next unit's calibration inputs: so block i+1 (and part k+1)
is calibrated on what the quantized graph before it really outputs. A block's KV cache is filled
from its own outputs chunk by chunk, as the app fills it. Only one unit's float weights exist at a
time; the quantized units are joined into parts at the end (qnn_merge.py).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaship.data import CALIB_FILE, data_file
from llamaship.export.llama.spec import ModelSpec
from llamaship.export.llama.tokenizer import Tokenizer
from llamaship.export.qnn_graph import attention_mask
from llamaship.export.qnn_quant import Encoding, output_encodings, quantize_w4a16, summarize_distances
from llamaship.export.qnn_units import Unit, export_unit, hidden, new, past, unit_module
from llamaship.progress import advance
from llamaship.quantize.checkpoint import QuantizedCheckpoint
from llamaship.quantize.scheme import QuantScheme

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class Chunk:
    ids: np.ndarray  # int32 [1, ar]: the tokens, padded
    n: int  # real tokens
    pos: int  # position of the first
    seq: int  # which calibration sequence


def calibration_chunks(tokenizer: Tokenizer, ar: int, ctx: int, n_sequences: int) -> list[Chunk]:
    """`n_sequences` sequences of `ctx` validation tokens in chunks of `ar`, each chunk starting
    where at most ctx - ar tokens are cached: so the calibrated ranges cover first tokens
    (SmolLM2's massive activation), padded chunks and late positions alike."""
    text = data_file(CALIB_FILE).read_text()
    ids = tokenizer.encode(text[: n_sequences * ctx * 12], bos=False)
    chunks = []
    for s in range(n_sequences):
        seq = ids[s * ctx : (s + 1) * ctx]
        if len(seq) < ar:
            break
        for c in range(0, min(len(seq), ctx - ar + 1), ar):
            part = seq[c : c + ar]
            padded = np.zeros((1, ar), np.int32)
            padded[0, : len(part)] = part
            chunks.append(Chunk(padded, len(part), c, s))
    return chunks


def drive(run: Callable[[Feeds], Feeds], unit: Unit, chunks: list[Chunk], inputs: list[Feeds], spec: ModelSpec,
          ctx: int) -> Iterator[tuple[Feeds, Feeds]]:
    """(feeds, outputs) of each chunk through `run`, in order. A block's past keys/values are its
    own earlier outputs in the same sequence, written into the cache the way an app writes them."""
    if unit.kind != "block":
        for feed in inputs:
            yield feed, run(feed)
        return
    (pk, pv), (nk, nv) = past(unit.layer), new(unit.layer)
    ar = chunks[0].ids.shape[1]
    seq, cache_k, cache_v = -1, np.empty(0), np.empty(0)
    for chunk, feed in zip(chunks, inputs, strict=True):
        if chunk.seq != seq:
            seq = chunk.seq
            cache_k = np.zeros((spec.n_kv_heads, ctx - ar, spec.head_dim), np.float32)
            cache_v = np.zeros_like(cache_k)
        full = feed | {pk: cache_k.copy(), pv: cache_v.copy()}
        out = run(full)
        end = chunk.pos + chunk.n
        if end <= ctx - ar:
            cache_k[:, chunk.pos : end] = out[nk][:, : chunk.n]
            cache_v[:, chunk.pos : end] = out[nv][:, : chunk.n]
        yield full, out


def cpu_runner(model: Path) -> Callable[[Feeds], Feeds]:
    """`model` on onnxruntime's CPU EP: feeds -> every output by name."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(names, feeds), strict=True))


@dataclass
class UnitBuild:
    """What the build leaves: each unit's quantized graph, and what to report."""

    qdq: dict[str, Path]
    described: dict[str, Any]
    timings: dict[str, float]


class StreamedBuild:
    """Quantizes the units of a model one at a time (see the module docstring)."""

    def __init__(self, spec: ModelSpec, state: Mapping[str, torch.Tensor], quantized: QuantizedCheckpoint,
                 scheme: QuantScheme, ar: int, ctx: int, chunks: list[Chunk], work: Path,
                 progress: Callable[[str], None]) -> None:
        self.spec, self.state, self.quantized, self.scheme = spec, state, quantized, scheme
        self.ar, self.ctx, self.chunks, self.work, self.progress = ar, ctx, chunks, work, progress
        self.qdq: dict[str, Path] = {}
        self.distances: list[dict[str, list[float]]] = []
        self.described: dict[str, Any] = {}
        self.seconds = {"float_graphs": 0.0, "calibrate_and_quantize": 0.0, "quantized_outputs": 0.0}

    def unit(self, unit: Unit, inputs: list[Feeds], fixed: dict[str, Encoding] | None = None) -> list[Feeds]:
        """Quantizes `unit` on `inputs` (one per chunk); returns its quantized outputs per chunk."""
        t = time.perf_counter()
        folder = self.work / unit.name
        float_path, qdq_path = folder / "float.onnx", self.work / f"{unit.name}.qdq.onnx"
        module = unit_module(unit, self.spec, self.state, self.ctx)
        export_unit(unit, module, self.spec, self.ctx, float_path, self.ar)
        del module
        t2 = time.perf_counter()
        self.seconds["float_graphs"] += t2 - t
        feeds = (f for f, _ in drive(cpu_runner(float_path), unit, self.chunks, inputs, self.spec, self.ctx))
        described = quantize_w4a16(float_path, qdq_path, feeds, self.scheme, quantized=self.quantized,
                                   layer=unit.layer if unit.kind == "block" else None, fixed=fixed, whole=False)
        shutil.rmtree(folder, ignore_errors=True)
        self.distances.append(described.pop("lpbq_distances", {}))
        self.described = self.described or described
        t3 = time.perf_counter()
        self.seconds["calibrate_and_quantize"] += t3 - t2
        outs = [o for _, o in drive(cpu_runner(qdq_path), unit, self.chunks, inputs, self.spec, self.ctx)]
        self.seconds["quantized_outputs"] += time.perf_counter() - t3
        self.qdq[unit.name] = qdq_path
        return outs

    def run(self) -> UnitBuild:
        """Every unit, in dataflow order."""
        ar, chunks, n = self.ar, self.chunks, self.spec.n_layers
        label, todo, done = "qnn: units calibrated and quantized", n + 3, 0

        def tick() -> None:
            nonlocal done
            done += 1
            advance(self.progress, label, done, todo)

        rope = self.unit(Unit("rope"), [{"position_ids": (np.arange(ar, dtype=np.int32) + c.pos)[None]}
                                        for c in chunks])
        tick()
        shared = [{"cos": r["cos"], "sin": r["sin"], "attention_mask": attention_mask(ar, self.ctx, c.pos)}
                  for r, c in zip(rope, chunks, strict=True)]
        h = [o[hidden(0)] for o in self.unit(Unit("embed"), [{"input_ids": c.ids} for c in chunks])]
        tick()
        for i in range(n):
            fixed = output_encodings(self.qdq["embed" if i == 0 else f"block{i - 1}"], [hidden(i)])
            outs = self.unit(Unit("block", i), [s | {hidden(i): x} for s, x in zip(shared, h, strict=True)], fixed)
            h = [o[hidden(i + 1)] for o in outs]
            tick()
        fixed = output_encodings(self.qdq[f"block{n - 1}"], [hidden(n)])
        self.unit(Unit("head", n), [{hidden(n): x} for x in h], fixed)
        tick()
        self.described["calibration"] = (f"{len(chunks)} chunks of {ar} tokens of {CALIB_FILE}, each unit on the "
                                         "quantized outputs of the units before it")
        self.described["n_block_linears"] = 7 * n
        summary = summarize_distances(self.distances)
        if summary:
            self.described["lpbq_vs_stage_codes"] = summary
        return UnitBuild(self.qdq, self.described, dict(self.seconds))
