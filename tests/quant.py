"""The quantize stage's output and the eager modules packed from it: the references the
artifacts are compared with."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llamaship.export.llama.model import Llama, build_model
from llamaship.quantize.checkpoint import QuantizedCheckpoint
from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.stage import quantize_checkpoint
from llamaship.quantize.torchao_pack import PackingState, codes_packer

# the scheme of the tiny fixtures: calibrated, so identity across formats means the stage ran once
TINY_SCHEME = QuantScheme(algorithm="gptq", calibration_tokens=1024)


def stage(ckpt: Any, scheme: QuantScheme, folder: Path, spec: Any = None,
          state: Mapping[str, torch.Tensor] | None = None) -> QuantizedCheckpoint:
    return quantize_checkpoint(spec or ckpt.spec, state if state is not None else ckpt.state, ckpt.tokenizer,
                               scheme, folder, progress=lambda s: None)


def packed_model(spec: Any, state: Mapping[str, torch.Tensor], quantized: QuantizedCheckpoint, max_context: int,
                 activations: str, impl: str = "torch") -> Llama:
    """The eager module with the stage's codes as torchao tensors (what the exporters lower)."""
    return build_model(spec, PackingState(quantized, state), max_context=max_context, impl=impl,
                       on_loaded=codes_packer(quantized, activations))
