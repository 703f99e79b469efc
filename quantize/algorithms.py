"""How a matrix's codes are chosen: one handler class per algorithm, in a registry the scheme and
the CLI's `--quant-algo` choose from (gpt-fast style).

- `rtn`: round to nearest with min/max scales (torchao's choice: what the .pte shipped before).
- `hqq`: half-quadratic scale refinement, no calibration; torchao's scale-only HQQ, the rounding
  ExecuTorch's `export_llm` uses by default. Symmetric only (that is what torchao implements and
  what XNNPACK runs).
- `gptq`: Hessian-aware rounding (Frantar et al. 2022) from calibration activations.
  Written here because torchao 0.18's `gptq_quantize` asserts a CUDA device and needs the mslk
  int4 kernels, and its observer flow quantizes a whole model at once (no block streaming);
  onnxruntime's and coremltools' GPTQ run on their own graph formats, after export, so their codes
  could not be shared across formats. The algorithm is ~40 lines (lazy block updates, groups'
  scales taken when the group is reached, as the reference implementation does).
- `awq`: activation-aware per-channel scales (Lin et al. 2023), searched per block on the
  calibration activations and folded into the preceding RMSNorm, then round to nearest. Written
  here for the same reasons (torchao's AWQ prototype observes a whole model and keeps the scales as
  a separate tensor subclass, which no other format can read); folding into the norm means every
  format gets the benefit with no extra op.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from llamaship.errors import UnsupportedError
from llamaship.quantize.codes import QTensor, clipped_params, encode, qrange, rtn

GPTQ_DAMP = 0.01  # fraction of the Hessian's mean diagonal added for stability (the paper's 1%)
GPTQ_BLOCK = 128  # columns updated lazily together


class Algorithm:
    """Rounds one matrix given its scheme slot; `calibrated` algorithms receive the Hessian
    H = X^T X / n of the matrix's input activations; `scales_inputs` ones also rescale the block
    (`awq_scales`) before rounding."""

    name: ClassVar[str]
    help: ClassVar[str]
    calibrated: ClassVar[bool] = False
    scales_inputs: ClassVar[bool] = False

    def check(self, symmetric: bool) -> None:
        """Raise UnsupportedError when this algorithm cannot produce the scheme's codes."""

    def quantize(self, w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 hessian: torch.Tensor | None = None) -> QTensor:
        return rtn(w, bits, group_size, symmetric)

    def params(self) -> dict[str, object]:
        return {}


class RTN(Algorithm):
    name = "rtn"
    help = "round to nearest, min/max scales (no calibration)"


class HQQ(Algorithm):
    name = "hqq"
    help = "half-quadratic scale refinement, torchao's scale-only HQQ (no calibration; symmetric)"

    def check(self, symmetric: bool) -> None:
        if not symmetric:
            raise UnsupportedError("hqq is scale-only (symmetric), as torchao implements it: drop --asymmetric "
                                   "or use --quant-algo gptq")

    def quantize(self, w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 hessian: torch.Tensor | None = None) -> QTensor:
        from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq

        self.check(symmetric)
        qmin, qmax = qrange(bits)
        codes, scale = _choose_qparams_and_quantize_scale_only_hqq(w.float(), [1, group_size], qmin, qmax)
        return QTensor(codes.to(torch.int8), scale.float(), None, bits, group_size)


class GPTQ(Algorithm):
    name = "gptq"
    help = "Hessian-aware rounding from WikiText-2 validation activations (calibrated)"
    calibrated = True

    def params(self) -> dict[str, object]:
        return {"damp": GPTQ_DAMP, "block": GPTQ_BLOCK, "act_order": False}

    @torch.no_grad()
    def quantize(self, w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 hessian: torch.Tensor | None = None) -> QTensor:
        if hessian is None:
            raise ValueError("gptq needs the input Hessian")
        w = w.float().clone()
        out, k = w.shape
        h = hessian.to(w.device).double().clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1
        w[:, dead] = 0
        h.diagonal().add_(GPTQ_DAMP * torch.diag(h).mean())
        # upper Cholesky factor of H^-1: row i holds what column i's error does to later columns
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
        n_groups, dev = k // group_size, w.device
        scales = torch.empty(out, n_groups, device=dev)
        zeros = None if symmetric else torch.empty(out, n_groups, dtype=torch.int8, device=dev)
        codes = torch.empty(out, k, dtype=torch.int8, device=dev)
        for b0 in range(0, k, GPTQ_BLOCK):
            b1 = min(b0 + GPTQ_BLOCK, k)
            wb, err = w[:, b0:b1].clone(), torch.zeros(out, b1 - b0, device=dev)
            for j in range(b1 - b0):
                col = b0 + j
                g = col // group_size
                if col % group_size == 0:  # the group's scale from the weights as updated so far
                    s, z = clipped_params(w_group(w, wb, b0, col, group_size), bits, symmetric,
                                          torch.diag(h)[col : col + group_size].float())
                    scales[:, g] = s
                    if zeros is not None and z is not None:
                        zeros[:, g] = z
                z_g = None if zeros is None else zeros[:, g]
                q = encode(wb[:, j : j + 1], scales[:, g], z_g, bits)[:, 0]
                codes[:, col] = q
                deq = (q.float() - (0.0 if z_g is None else z_g.float())) * scales[:, g]
                e = (wb[:, j] - deq) / hinv[col, col]
                wb[:, j:] -= e[:, None] * hinv[col, col:b1][None, :]
                err[:, j] = e
            w[:, b1:] -= err @ hinv[b0:b1, b1:]
        return QTensor(codes, scales, zeros, bits, group_size)


def w_group(w: torch.Tensor, wb: torch.Tensor, b0: int, col: int, group_size: int) -> torch.Tensor:
    """The current values of the group starting at `col` (its columns inside the lazy block come
    from the block's working copy)."""
    end = col + group_size
    inside = wb[:, col - b0 : min(end - b0, wb.shape[1])]
    rest = w[:, b0 + wb.shape[1] : end] if end > b0 + wb.shape[1] else w[:, :0]
    return torch.cat([inside, rest], dim=1)


class AWQ(Algorithm):
    name = "awq"
    help = "activation-aware channel scales folded into the RMSNorms, then round to nearest (calibrated)"
    calibrated = True
    scales_inputs = True
    grid: ClassVar[int] = 20

    def params(self) -> dict[str, object]:
        return {"grid": self.grid, "fold": "preceding RMSNorm (attention_norm -> wq/wk/wv, ffn_norm -> w1/w3)"}


@torch.no_grad()
def awq_scales(weights: list[torch.Tensor], x: torch.Tensor, x_mean_abs: torch.Tensor, bits: int,
               group_size: int, symmetric: bool, grid: int = AWQ.grid) -> torch.Tensor:
    """Per-input-channel scales s for matrices sharing the input `x` [n, K]: W' = W * s is what
    gets rounded and x / s is what the norm then emits. s = mean|x|^alpha, alpha from a grid,
    chosen by the output error of the rounded matrices on `x` (the AWQ paper's search)."""
    ref = [x @ w.T for w in weights]
    best, best_err = torch.ones_like(x_mean_abs), float("inf")
    for i in range(grid):
        alpha = i / grid
        s = x_mean_abs.clamp_min(1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, r in zip(weights, ref, strict=True):
            deq = rtn(w * s, bits, group_size, symmetric).dequantize() / s
            err += float((x @ deq.T - r).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    return best


REGISTRY: dict[str, type[Algorithm]] = {a.name: a for a in (RTN, HQQ, GPTQ, AWQ)}
DEFAULT = "gptq"  # the CLI's default: measured best (README); QuantScheme's own default stays rtn


def get(name: str) -> Algorithm:
    if name not in REGISTRY:
        raise UnsupportedError(f"unknown quantization algorithm {name!r}: choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]()
