"""QuantizedCheckpoint: the quantize stage's output on disk, one safetensors file per group
(embedding, each block, lm_head), read back one matrix at a time by every format's exporter.

Why on disk: at 8B the codes alone are 8 GB as int8; the exporters consume one block at a time,
so the stage writes each block as it finishes and nothing holds the whole model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from llamaship.quantize.codes import QTensor

RECORD = "quant.json"


def group_of(name: str) -> str:
    """The file a weight lives in: "layers.3.attention.wq.weight" -> "layers.3"."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


class QuantizedCheckpoint:
    """Codes per quantized matrix plus the float tensors the stage changed (AWQ's rescaled norms)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        path = folder / RECORD
        self.record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"matrices": {}, "floats": []}
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None

    # -- writing (the stage) --
    def write_group(self, group: str, matrices: dict[str, QTensor], floats: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for name, qt in matrices.items():
            tensors |= qt.to_tensors(name)
            self.record["matrices"][name] = {"bits": qt.bits, "group_size": qt.group_size,
                                             "symmetric": qt.symmetric, "shape": list(qt.shape)}
        for name, t in floats.items():
            tensors[name] = t.float().cpu().contiguous()
            self.record["floats"].append(name)
        if tensors:
            save_file(tensors, str(self.folder / f"{group}.safetensors"))

    def finish(self, info: dict[str, Any]) -> None:
        self.record |= info
        (self.folder / RECORD).write_text(json.dumps(self.record, indent=1))

    # -- reading (the exporters) --
    def _group(self, group: str) -> dict[str, torch.Tensor]:
        if self._cache is None or self._cache[0] != group:
            from safetensors.torch import load_file

            path = self.folder / f"{group}.safetensors"
            self._cache = (group, load_file(str(path)) if path.exists() else {})
        return self._cache[1]

    def __contains__(self, name: str) -> bool:
        return name in self.record["matrices"]

    def names(self) -> list[str]:
        return list(self.record["matrices"])

    def get(self, name: str) -> QTensor:
        meta = self.record["matrices"][name]
        t = self._group(group_of(name))
        return QTensor(t[f"{name}.codes"], t[f"{name}.scales"], t.get(f"{name}.zeros"), meta["bits"],
                       meta["group_size"])

    def float_tensor(self, name: str) -> torch.Tensor | None:
        return self._group(group_of(name))[name] if name in self.record["floats"] else None

    def state(self, base: Mapping[str, torch.Tensor]) -> QuantizedState:
        return QuantizedState(self, base)

    def describe(self) -> dict[str, Any]:
        """The manifest's record: algorithm, parameters, calibration, and what was quantized how."""
        kinds: dict[str, int] = {}
        for meta in self.record["matrices"].values():
            per = "per channel" if meta["group_size"] == meta["shape"][1] else f"group {meta['group_size']}"
            key = f"int{meta['bits']} {per} {'symmetric' if meta['symmetric'] else 'asymmetric'}"
            kinds[key] = kinds.get(key, 0) + 1
        return {k: v for k, v in self.record.items() if k not in ("matrices", "floats")} | {
            "matrices": kinds, "rescaled_floats": len(self.record["floats"])}


class QuantizedState(Mapping[str, torch.Tensor]):
    """The checkpoint's state as the stage left it: the stage's float tensors (rescaled norms)
    replace the originals, and each quantized matrix reads as its dequantized weight, so a format
    that takes float weights (the fp16/QNN graphs, fake-quant references) sees the same values
    the codes mean. Exporters that pack codes ask `quantized` for them instead."""

    def __init__(self, quantized: QuantizedCheckpoint, base: Mapping[str, torch.Tensor]) -> None:
        self.quantized, self.base = quantized, base

    def __getitem__(self, name: str) -> torch.Tensor:
        override = self.quantized.float_tensor(name) if name in self.quantized.record["floats"] else None
        if override is not None:
            return override
        if name in self.quantized:
            return self.quantized.get(name).dequantize()
        if name == "output.weight" and name not in self.base:  # a tied lm_head left float: the float table
            return self.base["tok_embeddings.weight"]
        return self.base[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.quantized:
            return tuple(self.quantized.record["matrices"][name]["shape"])
        shape_of = getattr(self.base, "shape", None)
        return tuple(shape_of(name)) if callable(shape_of) else tuple(self.base[name].shape)

    def __iter__(self) -> Iterator[str]:
        yield from self.base  # an untied lm_head the stage made for a tied model comes last
        yield from (n for n in self.quantized.names() if n not in self.base)
        if "output.weight" not in self.base and "output.weight" not in self.quantized:
            yield "output.weight"  # the lm_head of a tied model is its own (float) matrix here

    def __len__(self) -> int:
        return sum(1 for _ in self)
