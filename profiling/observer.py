"""Read what ExecuTorch's LLM runner prints: one `PyTorchObserver {...}` JSON line per generation
(its Stats), and `RSS after ...: N MiB` log lines. The format is the runner's C++ code
(extension/llm/runner/stats.h, text_llm_runner.cpp), the same in llama_main on a phone and in the
Python bindings on this host; tests use output recorded from a real run."""

from __future__ import annotations

import json
import re
from typing import Any

from llamaship.errors import RuntimeFailure

OBSERVER = "PyTorchObserver "
RSS = re.compile(r"RSS after [^:]*: ([0-9.]+) MiB")


def parse_stats(text: str) -> list[dict[str, Any]]:
    """Every stats record in `text`, in order. Each line is checked, so a truncated record (the
    process killed mid-print) is an error rather than a silently missing run."""
    stats = []
    for line in text.splitlines():
        at = line.find(OBSERVER)
        if at < 0:
            continue
        payload = line[at + len(OBSERVER):].strip()
        try:
            stat = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise RuntimeFailure(f"runner printed a malformed stats line ({exc}): {payload[:120]!r}") from exc
        missing = {"prompt_tokens", "generated_tokens", "inference_start_ms", "prompt_eval_end_ms",
                   "inference_end_ms", "model_load_start_ms", "model_load_end_ms"} - set(stat)
        if missing:
            raise RuntimeFailure(f"runner stats line lacks {sorted(missing)}: {payload[:120]!r}")
        stats.append(stat)
    return stats


def peak_rss_mib(text: str) -> float | None:
    """The largest RSS the runner logged (it logs after load, prefill and generation)."""
    values = [float(m.group(1)) for m in RSS.finditer(text)]
    return max(values) if values else None
