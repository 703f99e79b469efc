"""What both Core ML routes share (the .mlpackage and the Core ML-delegate .pte): the deployment
target, the fp16-safe RMSNorm, the weight-only scheme they store, and one stateful layer loop.

Both programs keep the KV cache as Core ML state [n_layers, n_kv_heads, max_context, head_dim] in
fp16 and differ only in how positions arrive (from input shapes for the .mlpackage, from
`input_pos` for the ExecuTorch runner); `StatefulLlama.layers_forward` is the loop they share.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from llamaship.export.llama.model import Llama, apply_rope
from llamaship.quantize.scheme import QuantScheme

MIN_TARGET = "iOS18"  # stateful programs and constexpr_blockwise_shift_scale need iOS 18 / macOS 15
MASK_MIN = -1e4  # fp16-safe "-inf" for masked positions (fp16 max is 65504)


def rms_norm_fp16_safe(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm that neither overflows nor underflows in fp16. Core ML runs the program in fp16 (the
    ANE has no fp32), and SmolLM2's residual reaches |h| ~ 26,000, so h^2 overflows (NaN logits);
    a fixed prescale (1/256) fixes that but underflows the small early-layer activations instead
    (cosine 0.99 after one layer). Dividing each row by its own max |h| keeps (h/m)^2 in [0, 1] and
    mean((h/m)^2) >= 1/dim, and (h/m) * rsqrt(mean((h/m)^2) + eps/m^2) equals h * rsqrt(mean(h^2)
    + eps) in real arithmetic."""
    m = x.abs().amax(-1, keepdim=True).clamp(min=1e-2)
    xs = x / m
    return norm.weight * (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + norm.eps / m / m))  # m*m overflows


def weight_only(scheme: QuantScheme) -> QuantScheme:
    """The scheme as Core ML stores it: weight-only (Core ML computes in fp16; there is no dynamic
    int8 activation path), with the quantize stage's codes as they are."""
    return dataclasses.replace(scheme, activations="none")


class StatefulLlama(nn.Module):
    """Wraps a built `Llama` (impl "torch"): same weights, an fp16 KV cache held as state."""

    k_cache: torch.Tensor  # buffers, declared for the type checker
    v_cache: torch.Tensor

    def __init__(self, model: Llama) -> None:
        super().__init__()
        spec = model.spec
        self.spec, self.model = spec, model
        shape = (spec.n_layers, spec.n_kv_heads, model.max_context, spec.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))

    def layers_forward(self, tokens: torch.Tensor, seqlen: int, cos: torch.Tensor, sin: torch.Tensor,
                       mask: torch.Tensor, start: int | torch.SymInt, end: int | None) -> torch.Tensor:
        """Logits of the last position. New keys/values go to cache slots [start, end), and
        attention reads slots [0, end); with `end` None (positions from `input_pos`), they go to
        [start, start + T) and attention reads the whole cache, the mask hiding the rest. Each
        expression is spelled as each route traced it before they shared this loop, so both
        programs are op for op what they were."""
        m, spec = self.model, self.spec
        group = spec.n_heads // spec.n_kv_heads
        h = m.tok_embeddings(tokens)
        for i, layer in enumerate(m.layers):
            att = layer.attention
            x = rms_norm_fp16_safe(layer.attention_norm, h)
            q = apply_rope(att.wq(x).view(1, seqlen, spec.n_heads, spec.head_dim), cos, sin)
            k = apply_rope(att.wk(x).view(1, seqlen, spec.n_kv_heads, spec.head_dim), cos, sin)
            v = att.wv(x).view(1, seqlen, spec.n_kv_heads, spec.head_dim)
            if end is None:
                self.k_cache[i : i + 1, :, start : start + seqlen] = k.transpose(1, 2).to(torch.float16)
                self.v_cache[i : i + 1, :, start : start + seqlen] = v.transpose(1, 2).to(torch.float16)
                keys, values = self.k_cache[i : i + 1].to(q.dtype), self.v_cache[i : i + 1].to(q.dtype)
            else:
                self.k_cache[i : i + 1, :, start:end] = k.transpose(1, 2).to(torch.float16)
                self.v_cache[i : i + 1, :, start:end] = v.transpose(1, 2).to(torch.float16)
                keys = self.k_cache[i : i + 1, :, :end].to(q.dtype)
                values = self.v_cache[i : i + 1, :, :end].to(q.dtype)
            if group > 1:
                keys = keys.repeat_interleave(group, dim=1)
                values = values.repeat_interleave(group, dim=1)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
            h = h + att.wo(y.transpose(1, 2).reshape(1, seqlen, -1))
            h = h + layer.feed_forward(rms_norm_fp16_safe(layer.ffn_norm, h))
        return m.output(rms_norm_fp16_safe(m.norm, h[:, -1, :]))
