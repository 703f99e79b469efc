"""The static-shape forward the Snapdragon HTP runs, and its float ONNX graph.

Why a separate forward (`StaticLlama`) instead of `Llama` itself: the HTP compiles a graph for
fixed tensor shapes and has no place for a KV cache that lives inside the graph. So, as Qualcomm
AI Hub's Llama graphs do, the app owns the cache: each call takes `ar` new tokens ("autoregressive
length": 128 for prompt processing, 1 for token generation), their positions, an additive attention
mask over the `ctx` slots (past first, then the new tokens), and the past keys/values (ctx - ar
slots), and returns the logits of every new token plus the new tokens' keys/values, which the app
writes into its cache. Both graphs carry the same weights.

Attention is written with plain MatMul/Softmax ops (grouped heads folded into the query so keys are
never repeated), RoPE is a Gather from position tables: every op is one the QNN HTP backend runs
natively. The graph is exported with torch's TorchScript ONNX exporter (opset 17), which emits those
ops one to one; the quantization that makes it an NPU graph happens on the ONNX graph (qnn.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llamaship.export.llama.model import Llama, apply_rope
from llamaship.export.llama.spec import ModelSpec

MASK_MIN = -100.0  # additive "-inf": exp(-100) is 0 in fp32, and the range stays small enough to
# quantize scores + mask to 16 bits without flattening the softmax (-1e4 would cost 0.15 per step)


def rms_norm_prescaled(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm whose every intermediate has a range 16-bit quantization can hold. SmolLM2's first
    token carries a massive activation (|h| ~ 24,500 in one channel from layer 11 on), so the plain
    form's h^2 spans [0, 6e8]: quantized to 16 bits, every other token's squares round to zero
    (SQNR 2-15 dB: the naive QDQ graph's PPL of 2e5). Dividing each row by its own max |h| keeps
    (h/m)^2 in [0, 1]; the result is invariant to m, so m's own quantization error cancels.
    Same maths as Core ML's fp16-safe norm, but written with Pow(-0.5): onnxruntime's
    SimplifiedLayerNormalization fusion matches the Sqrt/Div form and mis-fuses it when the
    epsilon is not a constant (errors up to 3.4 on small rows)."""
    m = x.abs().amax(-1, keepdim=True).clamp(min=1e-2)
    xs = x / m
    return norm.weight * (xs * (xs.pow(2).mean(-1, keepdim=True) + (norm.eps**0.5 / m) ** 2) ** -0.5)


class StaticLlama(nn.Module):
    """Wraps a built `Llama`: same weights, app-owned cache, fixed shapes (see module docstring)."""

    def __init__(self, model: Llama, ar: int, ctx: int, plain_norm: bool = False) -> None:
        """`plain_norm` keeps the module's own RMSNorm: only the error table uses it, to show why not."""
        super().__init__()
        spec = model.spec
        if not 1 <= ar < ctx:
            raise ValueError(f"ar {ar} must be in [1, ctx={ctx})")
        self.model, self.spec, self.ar, self.ctx = model, spec, ar, ctx
        self.norm = (lambda n, x: n(x)) if plain_norm else rms_norm_prescaled
        self.blocks = nn.ModuleList(StaticBlock(layer, spec, self.norm) for layer in model.layers)
        self.register_buffer("cos", model.rope_cos[:ctx].clone(), persistent=False)
        self.register_buffer("sin", model.rope_sin[:ctx].clone(), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # int32 [1, ar]
        position_ids: torch.Tensor,  # int32 [1, ar]
        attention_mask: torch.Tensor,  # float [1, 1, ar, ctx]: 0 = attend, MASK_MIN = not
        past_keys: torch.Tensor,  # float [n_layers, n_kv_heads, ctx - ar, head_dim]
        past_values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        cos, sin = self.cos[position_ids[0]], self.sin[position_ids[0]]  # [T, D]
        h = m.tok_embeddings(input_ids)
        new_keys, new_values = [], []
        for i, block in enumerate(self.blocks):
            h, k, v = block(h, cos, sin, attention_mask, past_keys[i], past_values[i])
            new_keys.append(k)
            new_values.append(v)
        logits = m.output(self.norm(m.norm, h))
        return logits, torch.stack(new_keys), torch.stack(new_values)


class StaticBlock(nn.Module):
    """One transformer block; a module of its own so every exported node name says its layer."""

    def __init__(self, layer: nn.Module, spec: ModelSpec,
                 norm: Callable[[nn.Module, torch.Tensor], torch.Tensor] = rms_norm_prescaled) -> None:
        super().__init__()
        self.layer, self.spec, self.norm = layer, spec, norm

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention_mask: torch.Tensor,
                past_k: torch.Tensor, past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, att = self.spec, self.layer.attention
        kvh, group, hd = s.n_kv_heads, s.n_heads // s.n_kv_heads, s.head_dim
        x = self.norm(self.layer.attention_norm, h)  # the token count is -1 in every reshape: one graph, any T
        q = apply_rope(att.wq(x).view(1, -1, s.n_heads, hd), cos, sin)
        k = apply_rope(att.wk(x).view(1, -1, kvh, hd), cos, sin)
        v = att.wv(x).view(1, -1, kvh, hd)
        k, v = k.transpose(1, 2)[0], v.transpose(1, 2)[0]  # [kvh, T, D]
        keys = torch.cat((past_k, k), dim=1)[:, None]  # [kvh, 1, ctx, D]
        values = torch.cat((past_v, v), dim=1)[:, None]
        qg = q[0].view(-1, kvh, group, hd).permute(1, 2, 0, 3)  # [kvh, group, T, D]: heads never repeated
        scores = qg @ keys.transpose(-1, -2) * hd**-0.5 + attention_mask[0]  # [kvh, group, T, ctx]
        y = (scores.softmax(-1) @ values).permute(2, 0, 1, 3).reshape(1, -1, s.n_heads * hd)
        h = h + att.wo(y)
        h = h + self.layer.feed_forward(self.norm(self.layer.ffn_norm, h))
        return h, k, v


INPUTS = ("input_ids", "position_ids", "attention_mask", "past_keys", "past_values")
OUTPUTS = ("logits", "new_keys", "new_values")


def example_inputs(model: StaticLlama) -> tuple[torch.Tensor, ...]:
    s, ar, ctx = model.spec, model.ar, model.ctx
    past = torch.zeros(s.n_layers, s.n_kv_heads, ctx - ar, s.head_dim)
    return (torch.zeros(1, ar, dtype=torch.int32), torch.arange(ar, dtype=torch.int32)[None],
            torch.zeros(1, 1, ar, ctx), past, past.clone())


def export_float_onnx(model: StaticLlama, path: Path) -> None:
    """The float graph, weights in one external data file beside it (SmolLM2's are 0.5 GB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer notices
        torch.onnx.export(model, example_inputs(model), str(path), dynamo=False, opset_version=17,
                          input_names=list(INPUTS), output_names=list(OUTPUTS), do_constant_folding=True)
    import onnx

    proto = onnx.load(str(path))
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)


def attention_mask(ar: int, ctx: int, n_past: int) -> np.ndarray:
    """The additive mask of a call of `ar` tokens with `n_past` cache slots filled: [1, 1, ar, ctx],
    columns 0..ctx-ar-1 are the past slots (0 where filled), the last `ar` columns the call's own
    tokens (causal)."""
    mask = np.full((1, 1, ar, ctx), MASK_MIN, np.float32)
    mask[0, 0, :, :n_past] = 0.0
    q, k = np.arange(ar)[:, None], np.arange(ar)[None, :]
    mask[0, 0, :, ctx - ar :] = np.where(k <= q, 0.0, MASK_MIN)
    return mask


class StaticCacheRunner:
    """Drives a static graph the way an app does: prompt chunks of `ar` tokens (the last one
    padded), the cache kept outside the graph with past slots filled from the left. `run(feeds)`
    is the artifact's own session (onnxruntime on CPU or on the HTP). `forward(tokens, start_pos)`
    returns the logits of every token [n, vocab], so accuracy can score whole chunks."""

    def __init__(self, run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], ar: int, ctx: int,
                 n_layers: int, n_kv_heads: int, head_dim: int) -> None:
        self.run, self.ar, self.ctx = run, ar, ctx
        self.past_k = np.zeros((n_layers, n_kv_heads, ctx - ar, head_dim), np.float32)
        self.past_v = np.zeros_like(self.past_k)
        self.n_past = 0

    def reset(self) -> None:
        self.past_k[:] = 0
        self.past_v[:] = 0
        self.n_past = 0

    def feeds(self, chunk: list[int]) -> dict[str, np.ndarray]:
        ar, ctx, n, p = self.ar, self.ctx, len(chunk), self.n_past
        ids = np.zeros((1, ar), np.int32)
        ids[0, :n] = chunk
        mask = attention_mask(ar, ctx, p)
        return {"input_ids": ids, "position_ids": (np.arange(ar, dtype=np.int32) + p)[None],
                "attention_mask": mask, "past_keys": self.past_k, "past_values": self.past_v}

    def forward(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """A call may start while at most ctx - ar tokens are cached (the past slots); a chunk that
        no longer fits the past slots is still scored, but nothing may follow it."""
        if start_pos == 0:
            self.reset()
        if start_pos != self.n_past:
            raise ValueError(f"start_pos {start_pos} but the cache holds {self.n_past} tokens")
        rows = []
        for c in range(0, len(tokens), self.ar):
            chunk, p = tokens[c : c + self.ar], self.n_past
            if p > self.ctx - self.ar:
                raise ValueError(f"context full: {p} tokens cached, the graph has {self.ctx - self.ar} past "
                                 f"slots (context {self.ctx} - chunk {self.ar})")
            logits, new_k, new_v = self.run(self.feeds(chunk))[:3]
            n = len(chunk)
            if p + n <= self.ctx - self.ar:
                self.past_k[:, :, p : p + n] = new_k[:, :, :n]
                self.past_v[:, :, p : p + n] = new_v[:, :, :n]
            self.n_past += n
            rows.append(torch.from_numpy(np.ascontiguousarray(logits[0, :n])))
        return torch.cat(rows)
