"""Speed of an artifact on the runtime an app would use: a .pte through ExecuTorch's C++ LLM runner,
an ONNX folder through onnxruntime-genai's Generator. Prefill and decode tok/s, TTFT, model load
time and peak RSS, for a fixed prompt and generation length, after warm-up, over repeated runs.

The measurement runs in a child process so its peak RSS is the runner's alone (not the exporter's
or the reference model's); the child prints one JSON line that the parent aggregates.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from llamaship.errors import RuntimeFailure
from llamaship.runtime.memory import peak_rss_mb  # noqa: F401  (re-exported: the speed children report it)


def _child(pte: str, tokenizer: str, prompt: str, gen_tokens: int, warmup: int, runs: int, num_bos: int,
           threads: int) -> None:
    from llamaship.targets.executorch_runtime import load_kernels

    load_kernels()
    if threads > 0:  # the runner shares the pybindings' XNNPACK threadpool (one libexecutorch_threadpool.so)
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    runner = TextLLMRunner(pte, tokenizer)
    config = GenerationConfig(echo=False, max_new_tokens=gen_tokens, temperature=0.0, num_bos=num_bos)
    results = []
    stats: list[str] = []
    for i in range(warmup + runs):
        runner.reset()
        runner.generate(prompt, config, None, lambda st: stats.append(st.to_json_string()))
        if i >= warmup and stats:
            results.append(json.loads(stats[-1]))
        stats.clear()
    print(json.dumps({"runs": results, "peak_rss_mb": peak_rss_mb()}))


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def benchmark(
    pte: Path, tokenizer: Path, prompt: str, gen_tokens: int = 128, warmup: int = 1, runs: int = 3,
    num_bos: int = 0, threads: int | None = None,
) -> dict[str, Any]:
    """`threads`: the XNNPACK threadpool's size (default: the runtime's own choice, one per core)."""
    cmd = [sys.executable, "-m", "llamaship.targets.speed", str(pte), str(tokenizer), prompt,
           str(gen_tokens), str(warmup), str(runs), str(num_bos), str(threads or 0)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in reversed(res.stdout.splitlines()) if ln.startswith("{\"runs\"")), None)
    if res.returncode != 0 or line is None:
        raise RuntimeFailure(f"{pte}: speed run failed: {res.stderr.strip().splitlines()[-1:]}")
    data = json.loads(line)
    if not data["runs"]:
        raise RuntimeFailure(f"{pte}: the runner reported no stats")
    return summarize_runner_stats(data["runs"], "ExecuTorch TextLLMRunner (C++), this x86_64 host", warmup,
                                  data["peak_rss_mb"])


def runner_rates(stat: dict[str, Any]) -> dict[str, float]:
    """One run's rates from the runner's stats (the `PyTorchObserver {...}` JSON), with the
    runner's own formulas; a 0 ms phase counts as 1 ms instead of dividing by zero."""
    prompt_ms = max(stat["prompt_eval_end_ms"] - stat["inference_start_ms"], 1)
    decode_ms = max(stat["inference_end_ms"] - stat["prompt_eval_end_ms"], 1)
    return {
        "prefill_tok_s": stat["prompt_tokens"] * 1000 / prompt_ms,
        "decode_tok_s": stat["generated_tokens"] * 1000 / decode_ms,
        "ttft_ms": stat.get("first_token_ms", stat["prompt_eval_end_ms"]) - stat["inference_start_ms"],
        "load_ms": stat["model_load_end_ms"] - stat["model_load_start_ms"],
    }


def summarize_runner_stats(stats: list[dict[str, Any]], runtime: str, warmup: int,
                           peak_rss_mb: float | None) -> dict[str, Any]:
    """The report's speed entry, shared by host validation and on-device profiling."""
    measured = [runner_rates(s) for s in stats]
    return {
        "runtime": runtime,
        "prompt_tokens": stats[0]["prompt_tokens"],
        "generated_tokens": stats[0]["generated_tokens"],
        "warmup_runs": warmup,
        "runs": len(measured),
        **{k: _summary([m[k] for m in measured]) for k in measured[0]},
        "peak_rss_mb": peak_rss_mb,
    }


def _child_onnx(folder: str, prompt_ids: str, gen_tokens: int, warmup: int, runs: int) -> None:
    """onnxruntime-genai reports no stats of its own: time the Generator loop (the first new token
    ends the prefill, as in the runner's stats). Generation is forced to `gen_tokens` by ignoring
    EOS through min_length, so every run decodes the same number of tokens."""
    import time

    from llamaship.targets.onnx_runtime import generate_ids, load_genai

    t = time.perf_counter()
    model = load_genai(Path(folder))
    load_ms = (time.perf_counter() - t) * 1000
    ids = json.loads(prompt_ids)
    results = []
    for i in range(warmup + runs):
        _, st = generate_ids(model, ids, gen_tokens, min_length=len(ids) + gen_tokens)
        if i >= warmup:
            results.append(st | {"load_ms": load_ms})
    print(json.dumps({"runs": results, "peak_rss_mb": peak_rss_mb()}))


def benchmark_onnx(folder: Path, prompt_ids: list[int], gen_tokens: int = 128, warmup: int = 1,
                   runs: int = 3) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "llamaship.targets.speed", "onnx", str(folder), json.dumps(prompt_ids),
           str(gen_tokens), str(warmup), str(runs)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in reversed(res.stdout.splitlines()) if ln.startswith("{\"runs\"")), None)
    if res.returncode != 0 or line is None:
        raise RuntimeFailure(f"{folder}: speed run failed: {res.stderr.strip().splitlines()[-1:]}")
    data = json.loads(line)
    measured = data["runs"]
    keys = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "load_ms")
    return {
        "runtime": "onnxruntime-genai Generator (CPU EP), this x86_64 host",
        "prompt_tokens": measured[0]["prompt_tokens"],
        "generated_tokens": measured[0]["generated_tokens"],
        "warmup_runs": warmup,
        "runs": len(measured),
        **{k: _summary([m[k] for m in measured]) for k in keys},
        "peak_rss_mb": data["peak_rss_mb"],
    }


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "onnx":
        _child_onnx(a[1], a[2], int(a[3]), int(a[4]), int(a[5]))
    else:
        _child(a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]), int(a[6]), int(a[7]))
