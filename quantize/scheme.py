"""QuantScheme: the one 4-bit group quantization description; the quantize stage computes its codes
once for every format."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llamaship.errors import UnsupportedError
from llamaship.export.llama.spec import ModelSpec

GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class QuantScheme:
    """bits/group_size/symmetric describe the linear weights; `activations` is "int8_dynamic"
    (8da4w: XNNPACK's fast path on phones) or "none" (weight-only); `embedding_bits` 4 or 8
    quantizes the token embedding per group, 0 keeps it float; `lm_head_bits` (4 or 8; 0 keeps
    fp32) is separate because the output projection is the most error-sensitive matrix: on
    SmolLM2-135M, 4-bit lm_head alone costs KL 0.13 vs fp32 and 8-bit almost nothing, the same
    reason llama.cpp's Q4_K_M keeps output.weight at 6 bits. 8-bit linear weights are per output
    channel, not per group: XNNPACK's dynamically quantized GEMMs support groups only at 4 bits.
    `algorithm` (quantize/algorithms.py) says how the quantize stage picks the codes and
    `calibration_tokens` how much WikiText-2 validation text the calibrated ones read; `name` is
    the storage layout only (what `fit` sizes), so the manifest records the algorithm beside it.
    The dataclass default is `rtn` (no data needed); the CLI defaults to the measured best."""

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    activations: str = "int8_dynamic"
    embedding_bits: int = 4
    lm_head_bits: int = 8
    algorithm: str = "rtn"  # how codes are chosen: quantize/algorithms.py (rtn, hqq, gptq, awq)
    calibration_tokens: int = 8192  # WikiText-2 validation tokens, for the calibrated algorithms

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UnsupportedError(f"weight bits must be 4 or 8, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise UnsupportedError(f"group size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.lm_head_bits not in (0, 4, 8):
            raise UnsupportedError(f"lm_head bits must be 0, 4 or 8, got {self.lm_head_bits}")
        if self.embedding_bits not in (0, 4, 8):
            raise UnsupportedError(f"embedding bits must be 0, 4 or 8, got {self.embedding_bits}")
        if self.activations not in ("int8_dynamic", "none"):
            raise UnsupportedError(f"unknown activation mode {self.activations!r}")
        from llamaship.quantize.algorithms import get

        get(self.algorithm).check(self.symmetric)
        if not 512 <= self.calibration_tokens <= 1 << 20:
            raise UnsupportedError(f"calibration tokens must be 512 to 1048576, got {self.calibration_tokens}")

    @property
    def name(self) -> str:
        act = "8da" if self.activations == "int8_dynamic" else ""
        emb = f"-emb{self.embedding_bits}" if self.embedding_bits else ""
        head = f"-head{self.lm_head_bits}" if self.lm_head_bits else "-headfp32"
        return f"{act}{self.bits}w-g{self.group_size}{'' if self.symmetric else '-asym'}{emb}{head}"

    def check_fits(self, spec: ModelSpec) -> None:
        """Every quantized matrix's input width must be a multiple of the group size; say which
        one is not and which group sizes would work, rather than silently leaving it float."""
        dims = {"dim": spec.dim, "hidden_dim (FFN)": spec.hidden_dim,
                "attention output": spec.n_heads * spec.head_dim}
        bad = {name: k for name, k in dims.items() if k % self.group_size}
        if bad:
            name, k = next(iter(bad.items()))
            fits = [g for g in GROUP_SIZES if all(v % g == 0 for v in dims.values())]
            raise UnsupportedError(
                f"group size {self.group_size} does not divide {name} input width {k}; "
                f"use --group-size {' or '.join(map(str, fits)) or '(none fits)'}"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"name": self.name}
