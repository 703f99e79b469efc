"""Greedy generation over any artifact module with `reset()` and `forward(tokens, start_pos)`
(logits whose last row is the last token's): the Core ML programs and the NPU graph share it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def generate_ids(module: Any, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] | list[int],
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], dict[str, float]]:
    """One prefill call, then one call per token; stops after a stop id."""
    module.reset()
    t0 = time.perf_counter()
    logits = module.forward(prompt_ids, 0)
    first = time.perf_counter()
    new: list[int] = []
    pos = len(prompt_ids)
    while len(new) < max_new_tokens:
        tid = int(logits[-1].argmax(-1))
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
