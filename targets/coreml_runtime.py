"""Running a Core ML bundle artifact: Core ML itself on macOS (`MLModel.predict` with state), the
NumPy MIL reference evaluator everywhere else. Both sit behind the same `forward(tokens, start_pos)`
the other formats' modules have, so accuracy and smoke tests are one code path."""

from __future__ import annotations

import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaship.errors import RuntimeFailure
from llamaship.export.coreml import causal_mask
from llamaship.runtime.memory import available_memory
from llamaship.targets.greedy import generate_ids  # noqa: F401  (this runtime's generation)


def on_macos() -> bool:
    return sys.platform == "darwin"


def runtime_name() -> str:
    return ("Core ML (MLModel.predict, this Mac)" if on_macos()
            else "MIL reference evaluator (the program compiled to torch CPU calls, fp16 tensors; "
                 "no Core ML runtime on Linux)")


def check_evaluator_memory(package: Path, program: Any) -> None:
    """Refuse, with the reason, a program the evaluator cannot hold in this machine's memory
    (instead of the OOM killer ending the whole export): the plan's own estimate of what it keeps
    (`mil_plan.memory_estimate`), made from the program before its weights are read."""
    from llamaship.runtime.mil_eval import WEIGHT_CACHE_BYTES
    from llamaship.runtime.mil_plan import memory_estimate

    need = memory_estimate(program, WEIGHT_CACHE_BYTES)
    avail = available_memory()
    if avail is not None and need > avail:
        weights = sum(f.stat().st_size for f in Path(package).rglob("*.bin"))
        raise RuntimeFailure(
            f"{package}: the MIL reference evaluator would need about {need / 2**30:.1f} GiB for these "
            f"{weights / 1e9:.1f} GB of weights and {avail / 2**30:.1f} GiB are available; free memory, or run "
            "this artifact with Core ML on a Mac (the same code path calls MLModel.predict there)")


class CoreMLModule:
    """The program's forward with its KV-cache state; positions come from the mask width."""

    def __init__(self, package: Path, engine: str = "plan") -> None:
        self.package = Path(package)
        self._mlmodel: Any = None
        self._state: Any = None
        if on_macos():  # pragma: no cover - no Mac here; same interface as the evaluator
            import coremltools as ct

            try:
                self._mlmodel = ct.models.MLModel(str(self.package))
                self._state = self._mlmodel.make_state()
            except Exception as exc:
                raise RuntimeFailure(f"{package}: Core ML could not load it ({exc})") from exc
        else:
            from llamaship.runtime.mil_eval import MilModel

            self._eval = MilModel(self.package, engine=engine, check=partial(check_evaluator_memory, self.package))

    def reset(self) -> None:
        if self._mlmodel is not None:  # pragma: no cover
            self._state = self._mlmodel.make_state()
        else:
            self._eval.reset_state()

    def inputs(self, tokens: list[int], start_pos: int) -> dict[str, np.ndarray]:
        return {"input_ids": np.asarray([tokens], dtype=np.int32),
                "causal_mask": causal_mask(start_pos, len(tokens), np.float16)}

    def forward(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        inputs = self.inputs(tokens, start_pos)
        if self._mlmodel is not None:  # pragma: no cover
            outs = self._mlmodel.predict(inputs, state=self._state)
        else:
            outs = self._eval.predict(inputs)
        (out,) = outs.values()  # one output: "logits" here, an ExecuTorch-given name in a delegate
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(1, -1))


class CoreMLPteModule(CoreMLModule):
    """The Core ML program inside an ExecuTorch Core ML-delegate .pte, run with the runner's
    inputs (`tokens`, `input_pos`). It is extracted from the .pte (a temporary folder that lives
    as long as this object) and executed like a .mlpackage: ExecuTorch's Core ML backend runs
    only on Apple platforms, and there it hands the same program to Core ML."""

    def __init__(self, pte: Path, engine: str = "plan") -> None:
        from llamaship.export.executorch_coreml import extract_program

        self._tmp = tempfile.TemporaryDirectory(prefix="llamaship-cm-")
        super().__init__(extract_program(Path(pte), Path(self._tmp.name)), engine)

    def inputs(self, tokens: list[int], start_pos: int) -> dict[str, np.ndarray]:
        return {"tokens": np.asarray([tokens], dtype=np.int32),
                "input_pos": np.arange(start_pos, start_pos + len(tokens), dtype=np.int32)}


def load_module(path: Path, fmt: str) -> CoreMLModule:
    """`fmt` "coreml" (a .mlpackage) or "executorch_coreml" (a Core ML-delegate .pte)."""
    return CoreMLPteModule(path) if fmt == "executorch_coreml" else CoreMLModule(path)


