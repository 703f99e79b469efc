"""QTensor: one matrix's integer codes and scales, the quantize stage's result that every format packs.

Why one canonical form: each format stores 4-bit weights its own way (torchao's int8-held int4 in
[-8, 7], onnxruntime's unsigned nibbles with a zero point, Core ML's int4 with an optional offset),
but all of them mean w = (q - z) * s per group. Holding q, z and s once lets the formats differ
only in packing, so a bundle's .pte, ONNX and .mlpackage carry the same weights (tested by
reading the codes back from each artifact). Codes are signed, like torchao's and Core ML's; ONNX's
unsigned nibbles are q + 2^(bits-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def qrange(bits: int) -> tuple[int, int]:
    """Signed code range: [-8, 7] for 4 bits, [-128, 127] for 8."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@dataclass(frozen=True)
class QTensor:
    """codes int8 [out, in]; scales fp32 [out, in // group_size]; zeros int8 like scales, or None
    for symmetric (z = 0). `group_size == in` is one scale per output channel."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def zero_points(self) -> torch.Tensor:
        return self.zeros if self.zeros is not None else torch.zeros_like(self.scales, dtype=torch.int8)

    def dequantize(self) -> torch.Tensor:
        out, k = self.shape
        q = self.codes.view(out, k // self.group_size, self.group_size).float()
        z = self.zero_points().float().unsqueeze(-1)
        return ((q - z) * self.scales.unsqueeze(-1)).view(out, k)

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        parts = {f"{name}.codes": self.codes.cpu().contiguous(), f"{name}.scales": self.scales.cpu().contiguous()}
        if self.zeros is not None:
            parts[f"{name}.zeros"] = self.zeros.cpu().contiguous()
        return parts


def minmax_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest scale (and integer zero point) per row of `w` [rows, group], the way
    torchao's `choose_qparams_affine` picks them, so `rtn` reproduces what the .pte shipped
    before this stage existed: symmetric s = max|w| / 7.5; asymmetric s = (max - min) / 15 with
    z = clamp(qmin - round(min / s))."""
    qmin, qmax = qrange(bits)
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        amax = w.abs().amax(-1)
        return (amax / ((qmax - qmin) / 2)).clamp_min(eps), None
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero.to(torch.int8)


CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(17))  # shrink the range by up to 40%


def clipped_params(w: torch.Tensor, bits: int, symmetric: bool,
                   importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max params with the range shrunk per row by the factor (from CLIP_GRID) that minimises
    the rounding error, weighted per column by `importance` (GPTQ passes the Hessian's diagonal:
    the input energy of each column). Clipping a few outliers buys finer steps for the rest; the
    reference GPTQ's `mse` option does the same search."""
    best_scale, best_zero = minmax_params(w, bits, symmetric)
    best_err = torch.full_like(best_scale, float("inf"))
    imp = importance if importance is not None else torch.ones(w.shape[-1], device=w.device)
    for shrink in CLIP_GRID:
        scale, zero = minmax_params(w * shrink, bits, symmetric)
        q = encode(w, scale, zero, bits).float()
        deq = (q - (0.0 if zero is None else zero.float().unsqueeze(-1))) * scale.unsqueeze(-1)
        err = ((w - deq).pow(2) * imp).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None and best_zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes of `w` [rows, n] under per-row `scale`/`zero` [rows]."""
    qmin, qmax = qrange(bits)
    z = 0.0 if zero is None else zero.float().unsqueeze(-1)
    # times the reciprocal, as torchao's quantize_affine computes it (ties land the same way)
    return torch.clamp(torch.round(w * (1.0 / scale).unsqueeze(-1)) + z, qmin, qmax).to(torch.int8)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, k = w.shape
    if k % group_size:
        raise ValueError(f"input width {k} is not a multiple of group size {group_size}")
    return w.reshape(out, k // group_size, group_size)


def rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QTensor:
    """Plain round-to-nearest with min/max scales."""
    g = grouped(w.float(), group_size)
    out, n_groups, _ = g.shape
    flat = g.reshape(out * n_groups, group_size)
    scale, zero = minmax_params(flat, bits, symmetric)
    codes = encode(flat, scale, zero, bits).reshape(w.shape)
    return QTensor(codes, scale.reshape(out, n_groups), None if zero is None else zero.reshape(out, n_groups),
                   bits, group_size)
