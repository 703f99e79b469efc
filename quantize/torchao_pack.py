"""The quantize stage's codes as torchao tensors, the form ExecuTorch's XNNPACK path (and
coremltools' torch.export frontend) expects: linears as int8-dynamic-activation x intN-weight per
group (lowered to XNNPACK's qd8 GEMM kernels), the embedding as intN weight-only per group (fused
into ExecuTorch's quantized embedding op)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llamaship.export.llama.model import Llama
from llamaship.quantize.checkpoint import QuantizedCheckpoint, QuantizedState
from llamaship.quantize.codes import QTensor

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


def to_torchao(qt: QTensor, int8_activations: bool) -> torch.Tensor:
    """torchao's tensor for these exact codes: `IntxUnpackedToInt8Tensor` is what `quantize_`
    makes for `Int8DynamicActivationIntxWeightConfig` / `IntxWeightOnlyConfig` and what ExecuTorch
    lowers to XNNPACK's qd8 GEMMs and its quantized embedding, so building it from the stage's
    codes (instead of letting torchao round) changes the values, not the program's ops."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    act = IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN if int8_activations else None
    return IntxUnpackedToInt8Tensor(
        qdata=qt.codes, scale=qt.scales, zero_point=qt.zero_points(), target_dtype=getattr(torch, f"int{qt.bits}"),
        block_size=(1, qt.group_size), dtype=torch.float32, activation_quantization=act)


class PackingState(QuantizedState):
    """The state a build with `codes_packer` reads: each quantized matrix is a meta tensor of its
    shape, because the packer swaps it for its codes before anything reads it. Why: reading the
    stage's state dequantizes each matrix to fp32 first, and Llama 3 8B's embedding and lm_head
    are 2.1 GB each that way, ~6 GiB with the temporaries, the largest thing an 8B export held."""

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.quantized:
            return torch.empty(self.shape(name), dtype=torch.float32, device="meta")
        return super().__getitem__(name)


def codes_packer(quantized: QuantizedCheckpoint, activations: str, offload_dir: Path | None = None):  # type: ignore[no-untyped-def]
    """`on_loaded(model, prefix)` for `Llama.load_weights`: as soon as a group (the embedding, a
    block, the lm_head) is loaded, its quantized matrices become torchao tensors of the stage's
    codes, so the fp32 copy of only that group is alive; with `offload_dir`, their values then
    move to file-backed memory (`offload_qdata`). Linears get int8 dynamic activations when
    `activations` is "int8_dynamic"; the embedding is always weight-only."""

    @torch.no_grad()
    def on_loaded(model: Llama, prefix: str) -> None:
        group = model.get_submodule(prefix)
        for name, module in group.named_modules():
            fqn = f"{prefix}.{name}" if name else prefix
            if not isinstance(module, (nn.Linear, nn.Embedding)) or f"{fqn}.weight" not in quantized:
                continue
            dynamic = isinstance(module, nn.Linear) and activations == "int8_dynamic"
            module.weight = nn.Parameter(to_torchao(quantized.get(f"{fqn}.weight"), dynamic), requires_grad=False)
        unpacked = [n for n, p in group.named_parameters() if p.is_meta]
        if unpacked:  # a PackingState placeholder that no packer rule replaced
            raise ValueError(f"{prefix}: quantized weights {unpacked} have no torchao packing here")
        if offload_dir is not None:
            offload_qdata(group, offload_dir)

    return on_loaded


@torch.no_grad()
def pack_model(model: Llama, quantized: QuantizedCheckpoint, activations: str) -> Llama:
    """Pack an already built model (every group); exports build with `codes_packer` instead."""
    on_loaded = codes_packer(quantized, activations)
    for prefix in ["tok_embeddings", *(f"layers.{i}" for i in range(len(model.layers))), "norm", "output"]:
        on_loaded(model, prefix)
    return model
