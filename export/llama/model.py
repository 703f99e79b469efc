"""The Llama module every format is exported from (llama2.c / gpt-fast style).

One file, one forward pass: RMSNorm, RoPE (half-split layout, as Hugging Face stores q/k, with
Llama 3.1 frequency scaling), grouped-query attention, SwiGLU, and a static KV cache that lives in
buffers and is updated in place, so an exported graph carries its own state.

`forward(tokens, input_pos)` takes `tokens` [1, T] and `input_pos` [1] (the position of the first
token), which is the signature ExecuTorch's LLM runner calls. Attention has two implementations
with the same cache layout [1, max_context, n_kv_heads, head_dim]:
  * "torch": plain PyTorch (reference, parity with transformers, ONNX/Core ML later);
  * "executorch": ExecuTorch's `llama::update_cache` and `llama::custom_sdpa` kernels, which attend
    only over the filled part of the cache (the runner's fast path on phones).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llamaship.export.llama.spec import ModelSpec, RopeScaling


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse RoPE frequencies, with Llama 3.1 scaling applied as Meta's reference does."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s: RopeScaling | None = spec.rope_scaling
    if s is None:
        return inv_freq.float()
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, out).float()


class RMSNorm(nn.Module):
    """`mean_by_gemm` (ExecuTorch): the mean of squares as a [1, dim] GEMM. XNNPACK reduces only
    4-D tensors over their two inner dims, so a last-dim `mean` stays outside the delegate and
    splits every block into four partitions; as a GEMM the whole norm is delegated."""

    def __init__(self, dim: int, eps: float, mean_by_gemm: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.mean_by_gemm = mean_by_gemm
        if mean_by_gemm:
            self.register_buffer("mean_weight", torch.full((1, dim), 1.0 / dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        squares = xf.pow(2)
        ms = F.linear(squares, self.mean_weight) if self.mean_by_gemm else squares.mean(-1, keepdim=True)
        xf = xf * torch.rsqrt(ms + self.eps)
        return self.weight * xf.type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [T, D]. Half-split rotation (rotate_half)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, max_context: int, impl: str) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.impl = impl
        self.wq = nn.Linear(spec.dim, spec.n_heads * spec.head_dim, bias=False)
        self.wk = nn.Linear(spec.dim, spec.n_kv_heads * spec.head_dim, bias=False)
        self.wv = nn.Linear(spec.dim, spec.n_kv_heads * spec.head_dim, bias=False)
        self.wo = nn.Linear(spec.n_heads * spec.head_dim, spec.dim, bias=False)
        cache_shape = (1, max_context, spec.n_kv_heads, spec.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start_pos: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if self.impl == "executorch":
            torch.ops.llama.update_cache(k, self.k_cache, start_pos)
            torch.ops.llama.update_cache(v, self.v_cache, start_pos)
            y = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start_pos, None, 0, True)
        else:
            self.k_cache[:, start_pos : start_pos + seqlen] = k
            self.v_cache[:, start_pos : start_pos + seqlen] = v
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                self.k_cache.transpose(1, 2),
                self.v_cache.transpose(1, 2),
                attn_mask=mask,
                enable_gqa=True,
            ).transpose(1, 2)
        return self.wo(y.reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, max_context: int, impl: str) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(spec.dim, spec.norm_eps, mean_by_gemm=impl == "executorch")
        self.attention = Attention(spec, max_context, impl)
        self.ffn_norm = RMSNorm(spec.dim, spec.norm_eps, mean_by_gemm=impl == "executorch")
        self.feed_forward = FeedForward(spec.dim, spec.hidden_dim)

    def forward(self, x, cos, sin, start_pos, mask):  # type: ignore[no-untyped-def]
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """`max_context` sizes the KV cache; `full_logits` returns logits for every input position
    (needed for perplexity), else only for the last one (what generation needs, and much cheaper
    for a 49k-128k vocabulary)."""

    def __init__(
        self,
        spec: ModelSpec,
        max_context: int | None = None,
        impl: str = "torch",
        full_logits: bool = False,
    ) -> None:
        super().__init__()
        if impl not in ("torch", "executorch"):
            raise ValueError(f"unknown attention impl {impl!r}")
        self.spec = spec
        self.max_context = max_context or spec.max_context
        self.impl = impl
        self.full_logits = full_logits
        self.tok_embeddings = nn.Embedding(spec.vocab_size, spec.dim)
        self.layers = nn.ModuleList(Block(spec, self.max_context, impl) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.dim, spec.norm_eps, mean_by_gemm=impl == "executorch")
        self.output = nn.Linear(spec.dim, spec.vocab_size, bias=False)
        cos, sin = self.stored_tables(position_tables(spec, self.max_context))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def stored_tables(self, tables: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The .pte stores each RoPE table's first half only: both halves are the same angles
        (`position_tables`), and the whole tables are 1 MB of SmolLM2's .pte at context 2048 (what
        ExecuTorch's own export_llama stores is half too). The other paths read the full tables."""
        if self.impl != "executorch":
            return tables
        return tuple(t[:, : t.shape[1] // 2].clone() for t in tables)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        seqlen = tokens.shape[1]
        start_pos = input_pos[0].item()
        torch._check(start_pos >= 0)
        torch._check(start_pos + seqlen <= self.max_context)
        cos = self.rope_cos.narrow(0, start_pos, seqlen)
        sin = self.rope_sin.narrow(0, start_pos, seqlen)
        if self.impl == "executorch":  # stored_tables keeps half: one concat per call, shared by every layer
            cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        mask = None
        if self.impl == "torch":  # query i (absolute start_pos + i) sees cache slots j <= it
            q_pos = torch.arange(seqlen, device=tokens.device) + start_pos
            mask = torch.arange(self.max_context, device=tokens.device)[None, :] <= q_pos[:, None]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos, mask)
        if not self.full_logits:
            h = h[:, -1, :]
        return self.output(self.norm(h))

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.attention.k_cache.zero_()
            layer.attention.v_cache.zero_()

    def load_weights(self, state: Mapping[str, torch.Tensor],
                     on_loaded: Callable[[Llama, str], None] | None = None) -> None:
        """Load a loader's state dict group by group (embedding, each block, norm, lm_head), each
        converted to fp32 only when its turn comes; `on_loaded(model, prefix)` runs after each group,
        so a quantizer can shrink it before the next is read. That keeps an 8B export to the
        quantized model plus one fp32 block instead of 32 GB of fp32 weights. Tied models get an
        untied copy of the embedding as `output.weight` so each can be quantized the way its op needs."""
        prefixes = ["tok_embeddings", *(f"layers.{i}" for i in range(len(self.layers))), "norm", "output"]
        expected = [k for k in state if k != "output.weight"] + ["output.weight"]
        unexpected = [k for k in expected if not any(k.startswith(p + ".") for p in prefixes)]
        if unexpected:
            raise KeyError(f"unexpected weights {unexpected[:5]}")
        for prefix in prefixes:
            module = self.get_submodule(prefix)
            names = [n for n, _ in module.named_parameters()]
            group = {}
            for n in names:
                key = f"{prefix}.{n}"
                if key == "output.weight" and key not in state:
                    key = "tok_embeddings.weight"
                if key not in state:
                    raise KeyError(f"missing weight {prefix}.{n}")
                source = state[key]
                tensor = source.to(torch.float32)
                if prefix == "output" and key == "tok_embeddings.weight" and tensor is source:
                    tensor = tensor.clone()  # never the embedding's own storage (a lazy state reads anew)
                group[n] = tensor
            module.load_state_dict(group, strict=False, assign=True)
            del group
            if on_loaded is not None:
                on_loaded(self, prefix)


def position_tables(spec: ModelSpec, max_context: int) -> tuple[torch.Tensor, ...]:
    freqs = torch.outer(torch.arange(max_context, dtype=torch.float32), rope_inv_freq(spec))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def build_model(
    spec: ModelSpec,
    state: Mapping[str, torch.Tensor],
    max_context: int | None = None,
    impl: str = "torch",
    full_logits: bool = False,
    on_loaded: Callable[[Llama, str], None] | None = None,
) -> Llama:
    """Build on the meta device: parameters come into existence only as `load_weights` reads
    them (so a large model is never allocated twice); buffers are made here."""
    with torch.device("meta"):
        model = Llama(spec, max_context=max_context, impl=impl, full_logits=full_logits)
    model.rope_cos, model.rope_sin = model.stored_tables(position_tables(spec, model.max_context))
    for norm in model.modules():
        if isinstance(norm, RMSNorm) and norm.mean_by_gemm:
            norm.mean_weight = torch.full((1, spec.dim), 1.0 / spec.dim)
    for layer in model.layers:
        att = layer.attention
        att.k_cache = torch.zeros(att.k_cache.shape, dtype=att.k_cache.dtype)
        att.v_cache = torch.zeros(att.v_cache.shape, dtype=att.v_cache.dtype)
    model.load_weights(state, on_loaded)
    return model.eval()
