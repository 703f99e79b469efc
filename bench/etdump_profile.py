"""Where a .pte spends its time: ExecuTorch's own ETDump profiler, per operator (XNNPACK reports each
of its kernels), for one 128-token prefill and the mean of 40 decode steps after it.

    python bench/etdump_profile.py BUNDLE/model.pte [--threads 2] [--context-pos 128]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time

import torch

DECODE_STEPS = 40


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pte", help="the .pte to profile (token/pos forward, as llamaship exports)")
    ap.add_argument("--threads", type=int, default=2, help="ExecuTorch threadpool size (default 2)")
    args = ap.parse_args()

    from llamaship.targets.executorch_runtime import load_kernels

    load_kernels()
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(args.threads)
    module = portable_lib._load_for_executorch(args.pte, enable_etdump=True)
    prompt = torch.randint(100, 40000, (1, 128))
    t = time.perf_counter()
    module.forward((prompt, torch.tensor([0])))
    prefill_ms = (time.perf_counter() - t) * 1000
    steps = []
    for i in range(DECODE_STEPS):
        t = time.perf_counter()
        module.forward((torch.tensor([[123]]), torch.tensor([128 + i])))
        steps.append((time.perf_counter() - t) * 1000)
    print(f"threads {args.threads}: prefill 128 tokens {prefill_ms:.1f} ms, decode step median "
          f"{statistics.median(steps[5:]):.2f} ms (wall, with profiling on)")
    with tempfile.NamedTemporaryFile(suffix=".etdp") as dump:
        module.write_etdump_result_to_file(dump.name)
        inspector = Inspector(etdump_path=dump.name)
    runs = 1 + DECODE_STEPS
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        prefill: collections.Counter[str] = collections.Counter()
        decode: collections.Counter[str] = collections.Counter()
        for ev in block.events:
            if ev.perf_data is None:
                continue
            raw = list(ev.perf_data.raw)
            key = f"[{ev.name}]" if ev.name in ("Method::execute", "DELEGATE_CALL", "OPERATOR_CALL") else ev.name
            per_run = max(len(raw) // runs, 1)  # the first execution is the prefill
            prefill[key] += sum(raw[:per_run])
            decode[key] += sum(raw[per_run:]) / DECODE_STEPS
        for label, counts in (("prefill (128 tokens)", prefill), ("decode step (mean)", decode)):
            total = counts["[Method::execute]"]
            print(f"{label}: {total:.2f} ms in Method::execute")
            for name, ms in counts.most_common(14):
                print(f"  {name[:60]:60s} {ms:9.3f} ms {ms / total:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
