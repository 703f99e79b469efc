"""Running a Core ML bundle artifact: Core ML itself on macOS (`MLModel.predict` with state), the
NumPy MIL reference evaluator everywhere else. Both sit behind the same `forward(tokens, start_pos)`
the other formats' modules have, so accuracy and smoke tests are one code path."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaship.errors import RuntimeFailure
from llamaship.export.coreml import causal_mask


def on_macos() -> bool:
    return sys.platform == "darwin"


def runtime_name() -> str:
    return ("Core ML (MLModel.predict, this Mac)" if on_macos()
            else "MIL reference evaluator (NumPy, fp16 tensors; no Core ML runtime on Linux)")


class CoreMLModule:
    """The program's forward with its KV-cache state; positions come from the mask width."""

    def __init__(self, package: Path) -> None:
        self.package = Path(package)
        self._mlmodel: Any = None
        self._state: Any = None
        if on_macos():  # pragma: no cover - no Mac here; same interface as the evaluator
            import coremltools as ct

            try:
                self._mlmodel = ct.models.MLModel(str(package))
                self._state = self._mlmodel.make_state()
            except Exception as exc:
                raise RuntimeFailure(f"{package}: Core ML could not load it ({exc})") from exc
        else:
            from llamaship.targets.mil_eval import MilModel

            self._eval = MilModel(self.package)

    def reset(self) -> None:
        if self._mlmodel is not None:  # pragma: no cover
            self._state = self._mlmodel.make_state()
        else:
            self._eval.reset_state()

    def forward(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        inputs = {"input_ids": np.asarray([tokens], dtype=np.int32),
                  "causal_mask": causal_mask(start_pos, len(tokens), np.float16)}
        if self._mlmodel is not None:  # pragma: no cover
            out = self._mlmodel.predict(inputs, state=self._state)["logits"]
        else:
            out = self._eval.predict(inputs)["logits"]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(1, -1))


def generate_ids(module: CoreMLModule, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...],
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], dict[str, float]]:
    """Greedy generation: one prefill call, then one call per token; stops after a stop id."""
    module.reset()
    t0 = time.perf_counter()
    logits = module.forward(prompt_ids, 0)
    first = time.perf_counter()
    new: list[int] = []
    pos = len(prompt_ids)
    while len(new) < max_new_tokens:
        tid = int(logits.argmax(-1))
        new.append(tid)
        if on_token:
            on_token(tid)
        if tid in stop_ids or len(new) == max_new_tokens:
            break
        logits = module.forward([tid], pos)
        pos += 1
    end = time.perf_counter()
    decoded = max(len(new) - 1, 1)
    prefill, decode = len(prompt_ids) / max(first - t0, 1e-9), decoded / max(end - first, 1e-9)
    return new, {"prompt_tokens": len(prompt_ids), "generated_tokens": len(new), "ttft_ms": (first - t0) * 1000,
                 "prefill_tok_s": prefill, "decode_tok_s": decode,
                 "prefill_token_per_sec": prefill, "decode_token_per_sec": decode}
