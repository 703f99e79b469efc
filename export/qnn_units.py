"""The NPU graph cut into units the build holds one at a time: the RoPE tables, the embedding, each
transformer block, the head (final norm + lm_head).

Why units: the HTP graph is built from a float ONNX graph that onnxruntime's quantizer loads whole
and calibrates by running it, so a whole-model float graph costs ~12 bytes per parameter on the
host (fp32 weights in the torch module, the ONNX proto, the calibration session): ~96 GB for
Llama 3 8B. A unit is at most one block (0.9 GB fp32 at 8B) or the vocab-sized embedding / lm_head
(2.1 GB fp32 at 8B), so the build holds one unit's float weights at a time; the quantized units are
then joined into the parts the phone loads (qnn_merge.py).

Each unit's float graph has the token count T (and the past slots P = context - T) symbolic: the
prefill (T = 128) and decode (T = 1) graphs are two static instances of one quantized graph, so
they carry the same weights and the same activation encodings by construction.

Tensor names are the contract between units (and with the app): `hidden_i` enters block i,
`past_keys_i` / `new_keys_i` are block i's cache in and out, `cos` / `sin` come from the RoPE unit.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llamaship.export.llama.model import Block, RMSNorm, position_tables
from llamaship.export.llama.spec import ModelSpec
from llamaship.export.qnn_graph import StaticBlock, rms_norm_prescaled

T, P = "T", "P"  # symbolic dims: tokens per call, past cache slots (context - T)


def hidden(i: int) -> str:
    return f"hidden_{i}"


def past(i: int) -> tuple[str, str]:
    return f"past_keys_{i}", f"past_values_{i}"


def new(i: int) -> tuple[str, str]:
    return f"new_keys_{i}", f"new_values_{i}"


@dataclass(frozen=True)
class Unit:
    kind: str  # "rope", "embed", "block", "head"
    layer: int = -1  # the block's index; for "head", the model's layer count

    @property
    def name(self) -> str:
        return f"block{self.layer}" if self.kind == "block" else self.kind

    def io(self) -> tuple[list[str], list[str]]:
        """(input names, output names)."""
        i = self.layer
        return {
            "rope": (["position_ids"], ["cos", "sin"]),
            "embed": (["input_ids"], [hidden(0)]),
            "block": ([hidden(i), "cos", "sin", "attention_mask", *past(i)], [hidden(i + 1), *new(i)]),
            "head": ([hidden(i)], ["logits"]),
        }[self.kind]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {"position_ids": {1: T}, "input_ids": {1: T}, "cos": {0: T}, "sin": {0: T},
                "attention_mask": {2: T}, "logits": {1: T}}
        for n in range(max(self.layer, 0) + 2):
            axes[hidden(n)] = {1: T}
            for name in past(n):
                axes[name] = {1: P}
            for name in new(n):
                axes[name] = {1: T}
        names = set(sum(self.io(), []))
        return {k: v for k, v in axes.items() if k in names}


def units_of(first: int, last: int, n_layers: int) -> list[Unit]:
    """The units of a part holding layers [first, last): RoPE first (every block of the part reads
    it), the embedding in the first part, the head in the last."""
    units = [Unit("rope")] + ([Unit("embed")] if first == 0 else [])
    units += [Unit("block", i) for i in range(first, last)]
    return units + ([Unit("head", n_layers)] if last == n_layers else [])


class RopeUnit(nn.Module):
    cos_table: torch.Tensor
    sin_table: torch.Tensor

    def __init__(self, spec: ModelSpec, ctx: int) -> None:
        super().__init__()
        cos, sin = position_tables(spec, ctx)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_table[position_ids[0]], self.sin_table[position_ids[0]]


class EmbedUnit(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding.from_pretrained(weight, freeze=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids)


class HeadUnit(nn.Module):
    def __init__(self, norm: RMSNorm, output: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.output = nn.Linear(output.shape[1], output.shape[0], bias=False)
        self.output.weight = nn.Parameter(output, requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(rms_norm_prescaled(self.norm, h))


def unit_module(unit: Unit, spec: ModelSpec, state: Mapping[str, torch.Tensor], ctx: int) -> nn.Module:
    """The unit's float module, reading only its own weights from `state` (the quantize stage's
    dequantized weights: activations calibrate on what will run)."""
    if unit.kind == "rope":
        return RopeUnit(spec, ctx).eval()
    if unit.kind == "embed":
        return EmbedUnit(state["tok_embeddings.weight"].float()).eval()
    if unit.kind == "head":
        norm = RMSNorm(spec.dim, spec.norm_eps)
        norm.weight = nn.Parameter(state["norm.weight"].float(), requires_grad=False)
        return HeadUnit(norm, state["output.weight"].float()).eval()
    with torch.device("meta"):
        block = Block(spec, ctx, "torch")
    prefix = f"layers.{unit.layer}."
    block.load_state_dict({n: state[prefix + n].float() for n, _ in block.named_parameters()},
                          strict=False, assign=True)
    att = block.attention
    att.k_cache = att.v_cache = torch.empty(0)  # the app owns the cache: the module's own is never allocated
    return StaticBlock(block, spec).eval()


def example_inputs(unit: Unit, spec: ModelSpec, ar: int, ctx: int) -> tuple[torch.Tensor, ...]:
    past_slots = torch.zeros(spec.n_kv_heads, ctx - ar, spec.head_dim)
    return {
        "rope": (torch.arange(ar, dtype=torch.int32)[None],),
        "embed": (torch.zeros(1, ar, dtype=torch.int32),),
        "block": (torch.zeros(1, ar, spec.dim), torch.zeros(ar, spec.head_dim), torch.zeros(ar, spec.head_dim),
                  torch.zeros(1, 1, ar, ctx), past_slots, past_slots.clone()),
        "head": (torch.zeros(1, ar, spec.dim),),
    }[unit.kind]


def export_unit(unit: Unit, module: nn.Module, spec: ModelSpec, ctx: int, path: Path, ar: int = 128) -> None:
    """The unit's float graph (opset 17, TorchScript exporter: HTP-native ops one to one), T and P
    symbolic, weights in one external data file beside it."""
    import onnx

    inputs, outputs = unit.io()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer notices
        torch.onnx.export(module, example_inputs(unit, spec, ar, ctx), str(path), dynamo=False, opset_version=17,
                          input_names=inputs, output_names=outputs, dynamic_axes=unit.dynamic_axes(),
                          do_constant_folding=True)
    proto = onnx.load(str(path))
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
