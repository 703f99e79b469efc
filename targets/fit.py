"""Device fit: will the model fit in the profile's RAM budget, and how fast can decode possibly be?

Decode is memory-bound on phones: each generated token reads every linear weight once plus the
filled KV cache, so `bandwidth / bytes_read_per_token` is a ceiling no runtime beats. Bits per
weight follow what the ExecuTorch/XNNPACK artifact stores (checked against real .pte sizes in the
tests): int4 groups with a bf16 scale per group, int8 per-channel weights with an fp32 scale per
row, the 4-bit embedding with an fp32 scale per group, an fp32 KV cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from llamaship.errors import UnsupportedError
from llamaship.export.llama.spec import ModelSpec
from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.storage import XNNPACK, Storage
from llamaship.targets.profile import Profile

GB = 1e9


@dataclass(frozen=True)
class Fit:
    model: str
    scheme: str
    profile: str
    context: int
    weight_bytes: float
    kv_cache_bytes: float
    total_bytes: float
    ram_budget_bytes: float
    fits: bool
    bytes_per_token: float
    bandwidth_gbs: float
    decode_ceiling_tok_s: float
    bits_per_weight: float
    sizes_bytes: dict[str, float] = field(default_factory=dict)  # predicted file size per format
    npu_parts: list[dict[str, Any]] = field(default_factory=list)  # the NPU artifact's parts, for a SoC profile

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return (
            f"{self.model} [{self.scheme}] on {self.profile}: weights {self.weight_bytes / GB:.2f} GB "
            f"({self.bits_per_weight:.2f} bpw) + KV cache {self.kv_cache_bytes / GB:.2f} GB at "
            f"{self.context} tokens = {self.total_bytes / GB:.2f} GB vs budget "
            f"{self.ram_budget_bytes / GB:.1f} GB: {verdict}; decode reads "
            f"{self.bytes_per_token / GB:.3f} GB/token (cache half full on average) -> ceiling "
            f"{self.decode_ceiling_tok_s:.1f} tok/s at {self.bandwidth_gbs:g} GB/s"
        ) + self.npu_summary()

    def npu_summary(self) -> str:
        if not self.npu_parts:
            return ""
        sizes = ", ".join(f"{p['bytes'] / GB:.2f}" for p in self.npu_parts)
        layers = ", ".join(f"{p['layers'][0]}-{p['layers'][1] - 1}" for p in self.npu_parts)
        return (f"; NPU: {len(self.npu_parts)} part(s) of {sizes} GB (layers {layers}), each a prefill and a "
                "1-token decode graph sharing weights (a decoded token reads each weight once, not a 128-token call)")


def weight_parts(spec: ModelSpec, scheme: QuantScheme | None, storage: Storage = XNNPACK) -> dict[str, float]:
    """Bytes of the linear layers, lm_head, embedding and norms as `storage` keeps them."""
    q_dim = spec.n_heads * spec.head_dim
    kv_dim = spec.n_kv_heads * spec.head_dim
    per_layer = {  # in_features -> params
        "dim": spec.dim * (q_dim + 2 * kv_dim + 2 * spec.hidden_dim),
        "q": q_dim * spec.dim,
        "hidden": spec.hidden_dim * spec.dim,
    }
    in_widths = {"dim": spec.dim, "q": q_dim, "hidden": spec.hidden_dim}
    vocab_params = spec.vocab_size * spec.dim
    bits = scheme.bits if scheme else 0
    gs = scheme.group_size if scheme else 32
    sym = scheme.symmetric if scheme else True
    return {
        "linear": spec.n_layers * sum(n * storage.linear_bpw(bits, gs, in_widths[k], sym) / 8
                                      for k, n in per_layer.items()),
        "lm_head": vocab_params * storage.linear_bpw(scheme.lm_head_bits if scheme else 0, gs, spec.dim, sym) / 8,
        "embedding": vocab_params * storage.embedding_bpw(scheme.embedding_bits if scheme else 0, gs, sym) / 8,
        "norms": (2 * spec.n_layers + 1) * spec.dim * 4,
    }


def predict_sizes(spec: ModelSpec, scheme: QuantScheme | None) -> dict[str, float]:
    """Predicted artifact bytes per format, from each backend's storage model (one function for the
    fit command, the export's disk check and the report)."""
    from llamaship import backends

    return {b.name: sum(weight_parts(spec, scheme, b.storage).values())
            for b in backends.REGISTRY.values() if b.storage is not None}


def predict_fit(spec: ModelSpec, scheme: QuantScheme | None, profile: Profile, context: int | None = None) -> Fit:
    context = context or profile.max_context
    kv_dim = spec.n_kv_heads * spec.head_dim
    parts = weight_parts(spec, scheme)
    linear_bytes, head_bytes, norms = parts["linear"], parts["lm_head"], parts["norms"]
    head_params = spec.vocab_size * spec.dim
    weight_bytes = sum(parts.values())
    kv_bytes = 2 * spec.n_layers * context * kv_dim * 4
    total = weight_bytes + kv_bytes
    # per token: every linear + lm_head once, one embedding row, and on average half the cache
    per_token = linear_bytes + head_bytes + kv_bytes / 2 + norms
    params = spec.param_count() + (0 if not spec.tied_embeddings else head_params)
    return Fit(
        model=spec.name,
        scheme=scheme.name if scheme else "fp32",
        profile=profile.name,
        context=context,
        weight_bytes=weight_bytes,
        kv_cache_bytes=kv_bytes,
        total_bytes=total,
        ram_budget_bytes=profile.ram_budget_gb * GB,
        fits=total <= profile.ram_budget_gb * GB,
        bytes_per_token=per_token,
        bandwidth_gbs=profile.bandwidth_gbs,
        decode_ceiling_tok_s=profile.bandwidth_gbs * GB / per_token,
        bits_per_weight=8 * weight_bytes / params,
        sizes_bytes=predict_sizes(spec, scheme),
        npu_parts=npu_parts(spec, scheme, profile, context),
    )


def npu_parts(spec: ModelSpec, scheme: QuantScheme | None, profile: Profile, context: int) -> list[dict[str, Any]]:
    """How the NPU artifact would be split for `profile`'s HTP (only a profile that names a SoC, for a
    scheme the NPU route takes): layer ranges and context-binary weight bytes per part."""
    from llamaship.export.qnn_parts import limit_bytes, part_bytes, plan_parts

    if "soc_model" not in profile.extra or scheme is None or scheme.bits != 4 or not scheme.symmetric \
            or scheme.lm_head_bits not in (4, 8):
        return []
    try:
        plan = plan_parts(spec, scheme, context, limit_bytes(profile.extra.get("htp_context_limit_gb")))
    except UnsupportedError:
        return []
    return [{"layers": [a, b], "bytes": part_bytes(spec, scheme, context, a, b)} for a, b in plan]
