"""ModelSpec: the one description of a Llama-architecture model that every loader fills in.

Loaders for Hugging Face folders, Meta folders and GGUF files all reduce to this dataclass plus a
state dict in the naming of `llamaship.export.llama.model.Llama`, so everything downstream (export,
quantization, validation, the manifest) sees one shape of model whatever the source was.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from llamaship.errors import CheckpointError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 style frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def validate(self) -> None:
        r = self
        if not all(math.isfinite(v) and v > 0 for v in (r.factor, r.low_freq_factor, r.high_freq_factor)):
            raise CheckpointError(f"rope_scaling factors must be finite positive numbers, got {r}")
        if r.high_freq_factor <= r.low_freq_factor:
            raise CheckpointError(f"rope_scaling high_freq_factor ({r.high_freq_factor}) must exceed "
                                  f"low_freq_factor ({r.low_freq_factor})")
        if r.original_max_position_embeddings <= 0:
            raise CheckpointError("rope_scaling original_max_position_embeddings must be positive")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tied_embeddings: bool = False
    max_context: int = 2048
    head_dim: int = 0
    bos_id: int | None = None
    add_bos: bool = True
    eos_id: int | None = None
    stop_ids: tuple[int, ...] = ()
    chat_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // max(self.n_heads, 1))
        self.validate()

    def validate(self) -> None:
        """Reject configs that cannot describe a Llama; called by every loader."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{name} must be a positive integer, got {value!r}")
            if value > 1_000_000:
                raise CheckpointError(f"{name}={value} is absurdly large for a Llama model")
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim={self.head_dim} must be even for RoPE")
        if not (0 < self.norm_eps < 1):
            raise CheckpointError(f"norm_eps={self.norm_eps} is out of range (0, 1)")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise CheckpointError(f"rope_theta={self.rope_theta} must be a finite positive number")
        if not isinstance(self.max_context, int) or isinstance(self.max_context, bool) or self.max_context <= 0:
            raise CheckpointError(f"max_context={self.max_context!r} must be a positive integer")
        if self.rope_scaling is not None:
            self.rope_scaling.validate()
        for tok in (self.bos_id, self.eos_id, *self.stop_ids):
            if tok is not None and not (0 <= tok < self.vocab_size):
                raise CheckpointError(
                    f"special token id {tok} is outside the vocabulary (size {self.vocab_size})"
                )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight the module needs, with its shape: loaders check checkpoints against it."""
        q_out = self.n_heads * self.head_dim
        kv_out = self.n_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "tok_embeddings.weight": (self.vocab_size, self.dim),
            "norm.weight": (self.dim,),
        }
        if not self.tied_embeddings:
            shapes["output.weight"] = (self.vocab_size, self.dim)
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes |= {
                p + "attention_norm.weight": (self.dim,),
                p + "attention.wq.weight": (q_out, self.dim),
                p + "attention.wk.weight": (kv_out, self.dim),
                p + "attention.wv.weight": (kv_out, self.dim),
                p + "attention.wo.weight": (self.dim, q_out),
                p + "ffn_norm.weight": (self.dim,),
                p + "feed_forward.w1.weight": (self.hidden_dim, self.dim),
                p + "feed_forward.w2.weight": (self.dim, self.hidden_dim),
                p + "feed_forward.w3.weight": (self.hidden_dim, self.dim),
            }
        return shapes

    def param_count(self) -> int:
        total = 0
        for shape in self.expected_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["stop_ids"] = list(self.stop_ids)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        if data.get("rope_scaling"):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        data["stop_ids"] = tuple(data.get("stop_ids", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)
