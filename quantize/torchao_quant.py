"""Apply a QuantScheme to the Llama module with torchao, the way ExecuTorch's XNNPACK path expects:
linears as int8-dynamic-activation x intN-weight per group (lowered to XNNPACK's qd8 GEMM kernels),
the embedding as intN weight-only per group (fused into ExecuTorch's quantized embedding op)."""

from __future__ import annotations

import torch
from torch import nn

from llamaship.export.model import Llama
from llamaship.quantize.scheme import QuantScheme


def group_quantizer(scheme: QuantScheme):  # type: ignore[no-untyped-def]
    """`on_loaded(model, prefix)` for `Llama.load_weights`: quantize one group (the embedding, a
    block, the lm_head) as soon as it is loaded, so the fp32 copy of only that group is alive."""
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

    return on_loaded


@torch.no_grad()
def quantize_for_executorch(model: Llama, scheme: QuantScheme) -> Llama:
    """Quantize an already built model (every group); exports build with `group_quantizer` instead."""
    scheme.check_fits(model.spec)
    on_loaded = group_quantizer(scheme)
    for prefix in ["tok_embeddings", *(f"layers.{i}" for i in range(len(model.layers))), "norm", "output"]:
        on_loaded(model, prefix)
    return model
