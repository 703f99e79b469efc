"""`llamaship profile`: measure a bundle's .pte on a phone with ExecuTorch's llama_main.

Push the .pte, tokenizer and the user's llama_main binary (built for the phone's ABI; it is not
downloadable here) to /data/local/tmp/llama/, run warm-up + N generations with a fixed prompt,
generation length and thread count, read each run's `PyTorchObserver` stats, record device facts
and the thermal state before and after, and write report.json/.md in the host validation format
so device and host figures sit side by side."""

from __future__ import annotations

import datetime as dt
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamaship.bundle import artifact_path, read_manifest
from llamaship.errors import RuntimeFailure
from llamaship.profiling.adb import Adb
from llamaship.profiling.device import device_facts, thermal_snapshot
from llamaship.profiling.observer import parse_stats, peak_rss_mib
from llamaship.targets.speed import summarize_runner_stats

REMOTE_DIR = "/data/local/tmp/llama"
DEFAULT_PROMPT = ("The capital of France is Paris. It is known for the Eiffel Tower, the Louvre and its "
                  "cafes. Write a short travel guide for a first-time visitor:")


def runner_command(runner: str, pte: str, tokenizer: str, prompt: str, seq_len: int, threads: int,
                   warmup: bool = False) -> str:
    """One llama_main invocation as a device shell string (flags of executorch's
    examples/models/llama/main.cpp); greedy so every run decodes the same tokens."""
    args = [f"./{runner}", "--model_path", pte, "--tokenizer_path", tokenizer, "--prompt", prompt,
            "--seq_len", str(seq_len), "--temperature", "0", "--cpu_threads", str(threads)]
    if warmup:
        args.append("--warmup")
    return f"cd {REMOTE_DIR} && " + shlex.join(args)


def profile_bundle(
    bundle: Path, adb: Adb, runner: Path, runs: int = 3, warmup: int = 1, threads: int = 4,
    prompt: str = DEFAULT_PROMPT, gen_tokens: int = 128, push: bool = True,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Returns a report dict in the host validation format, with a `device` section."""
    manifest = read_manifest(bundle)
    pte = artifact_path(bundle, manifest, "executorch")
    tokenizer = bundle / manifest["tokenizer"]["path"]
    adb.check_device()
    facts = device_facts(adb)
    progress(f"device {adb.serial}: {facts.get('manufacturer')} {facts.get('model')}, SoC "
             f"{facts.get('soc_model') or facts.get('board')}, Android {facts.get('android')}")
    if push:
        adb.shell(f"mkdir -p {REMOTE_DIR}")
        for local in (pte, tokenizer, runner):
            progress(f"push {local.name}")
            adb.push(local, f"{REMOTE_DIR}/{local.name}")
        adb.shell(f"chmod +x {REMOTE_DIR}/{shlex.quote(runner.name)}")
    n_prompt = len(prompt.split())  # only for seq_len headroom; the runner counts real tokens
    seq_len = min(int(manifest["artifacts"][0].get("max_context", 2048)), 4 * n_prompt + gen_tokens + 64)
    before = thermal_snapshot(adb)
    stats: list[dict[str, Any]] = []
    rss: list[float] = []
    for i in range(warmup + runs):
        cmd = runner_command(runner.name, pte.name, tokenizer.name, prompt, seq_len, threads)
        progress(f"run {i + 1}/{warmup + runs}{' (warm-up)' if i < warmup else ''}: {cmd}")
        out = adb.shell(cmd + " 2>&1")
        found = parse_stats(out)
        if not found:
            tail = " | ".join(out.strip().splitlines()[-3:])
            raise RuntimeFailure(f"llama_main printed no PyTorchObserver stats: {tail}")
        if i >= warmup:
            stats.append(found[-1])
            peak = peak_rss_mib(out)
            if peak is not None:
                rss.append(peak)
    after = thermal_snapshot(adb)
    speed = summarize_runner_stats(stats, f"ExecuTorch llama_main on {facts.get('model')} ({adb.serial}), "
                                   f"{threads} threads", warmup, max(rss) if rss else None)
    return {
        "schema_version": 1,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": manifest["model"]["name"],
        "source_sha256": manifest["model"].get("source_sha256"),
        "slice": None,
        "reference": None,
        "artifacts": [{"format": "executorch", "path": pte.name, "scheme": manifest["quant"]["name"],
                       "size_bytes": pte.stat().st_size, "accuracy": None, "speed": speed}],
        "targets": [],
        "device": facts | {"thermal_before": before, "thermal_after": after,
                           "throttled": (after["thermal_status"] or 0) > (before["thermal_status"] or 0)},
        "passed": None,  # no gates on device runs: the figures are for comparison
    }
