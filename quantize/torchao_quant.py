"""Apply a QuantScheme to the Llama module with torchao, the way ExecuTorch's XNNPACK path expects:
linears as int8-dynamic-activation x intN-weight per group (lowered to XNNPACK's qd8 GEMM kernels),
the embedding as intN weight-only per group (fused into ExecuTorch's quantized embedding op)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llamaship.export.llama.model import Llama
from llamaship.quantize.scheme import QuantScheme

OFFLOAD_MIN_NUMEL = 1 << 16  # small tensors are not worth a file each


def offload_qdata(module: nn.Module, folder: Path) -> int:
    """Move the int8 values of every torchao-quantized weight under `module` into a file-backed
    (shared mmap) tensor in `folder`; returns the bytes moved. Why: torchao keeps 4-bit values
    unpacked, one byte each, so an 8B model's quantized weights are 8 GB of anonymous memory, and
    ExecuTorch's lowering needs about as much again. File-backed pages can be written back and
    dropped by the kernel under memory pressure (there is no swap here), so the export's peak
    anonymous memory no longer grows with the model."""
    moved = 0
    for name, param in module.named_parameters():
        q = getattr(param, "qdata", None)
        if not isinstance(q, torch.Tensor) or q.numel() < OFFLOAD_MIN_NUMEL:
            continue
        path = folder / f"{id(param):x}-{name}.bin"
        mapped = torch.from_file(str(path), shared=True, size=q.numel(), dtype=q.dtype).view(q.shape)
        mapped.copy_(q)
        param.qdata = mapped
        moved += q.numel() * q.element_size()
    return moved


def group_quantizer(scheme: QuantScheme, offload_dir: Path | None = None):  # type: ignore[no-untyped-def]
    """`on_loaded(model, prefix)` for `Llama.load_weights`: quantize one group (the embedding, a
    block, the lm_head) as soon as it is loaded, so the fp32 copy of only that group is alive;
    with `offload_dir`, its quantized values then move to file-backed memory (`offload_qdata`)."""
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    mapping = None if scheme.symmetric else MappingType.ASYMMETRIC

    def linear_config(bits: int):  # type: ignore[no-untyped-def]
        # XNNPACK's qd8 GEMMs take per-group scales only for 4-bit weights; 8-bit is per channel.
        dtype = torch.int4 if bits == 4 else torch.int8
        granularity = PerGroup(scheme.group_size) if bits == 4 else PerAxis(0)
        if scheme.activations == "int8_dynamic":
            kw = {"weight_mapping_type": mapping} if mapping else {}
            return Int8DynamicActivationIntxWeightConfig(
                weight_dtype=dtype, weight_granularity=granularity, **kw
            )
        kw = {"mapping_type": mapping} if mapping else {}
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity, **kw)

    @torch.no_grad()
    def on_loaded(model: Llama, prefix: str) -> None:
        if prefix == "output":
            if scheme.lm_head_bits:
                quantize_(model, linear_config(scheme.lm_head_bits), filter_fn=lambda m, fqn: fqn == "output")
        elif prefix == "tok_embeddings":
            if scheme.embedding_bits:
                emb_dtype = torch.int4 if scheme.embedding_bits == 4 else torch.int8
                quantize_(model, IntxWeightOnlyConfig(weight_dtype=emb_dtype, granularity=PerGroup(scheme.group_size)),
                          filter_fn=lambda m, fqn: fqn == "tok_embeddings")
        elif prefix.startswith("layers."):
            quantize_(model, linear_config(scheme.bits),
                      filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.startswith(prefix + "."))
        if offload_dir is not None:
            offload_qdata(model.get_submodule(prefix), offload_dir)

    return on_loaded


@torch.no_grad()
def quantize_for_executorch(model: Llama, scheme: QuantScheme) -> Llama:
    """Quantize an already built model (every group); exports build with `group_quantizer` instead."""
    scheme.check_fits(model.spec)
    on_loaded = group_quantizer(scheme)
    for prefix in ["tok_embeddings", *(f"layers.{i}" for i in range(len(model.layers))), "norm", "output"]:
        on_loaded(model, prefix)
    return model
