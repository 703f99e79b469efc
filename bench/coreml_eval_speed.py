"""The Core ML reference evaluator before and after compiling the program: the op-by-op NumPy
interpreter (`MilModel(engine="reference")`, what validation ran until 2026-12) against the compiled
plan (`engine="plan"`, what it runs now), side by side in one run on the same packages and the
same WikiText-2 *test* slice: seconds per token, KLD / top-1 / PPL against the fp32 reference for
each, their differences, and the largest logit difference between the two engines.

    python bench/coreml_eval_speed.py [--package model.mlpackage ...] [--eval-tokens 4096]
                                      [--engines reference,plan] [--profile 32]

Without `--package` it exports the embedded SmolLM2-135M twice with `llamaship export --format coreml
--no-validate` (the default int4 g32 gptq program and the fp16 one, `--quant fp32`) into
`--work` (kept, so a re-run skips the exports). A `.pte` package is a Core ML-delegate .pte: its
extracted program is evaluated. `--profile N` prints cProfile's top functions for N decode steps
per engine. Read ratios, not absolute times: the machine is shared.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llamaship.export.llama.load import load_checkpoint
from llamaship.export.llama.model import build_model
from llamaship.pipeline import default_model
from llamaship.targets import accuracy
from llamaship.targets.coreml_runtime import CoreMLModule, CoreMLPteModule

DEFAULT_PACKAGES = {"int4 g32 gptq (default)": [], "fp16": ["--quant", "fp32"]}


def export_defaults(work: Path) -> dict[str, Path]:
    out = {}
    for i, (name, flags) in enumerate(DEFAULT_PACKAGES.items()):
        bundle = work / f"bundle{i}"
        if not (bundle / "model.mlpackage").exists():
            cli = Path(sys.executable).with_name("llamaship")  # the console script of this environment
            subprocess.run([str(cli), "export", "--format", "coreml", "--no-validate",
                            "--out", str(bundle), "--force", *flags], check=True)
        out[name] = bundle / "model.mlpackage"
    return out


def module_for(path: Path, engine: str) -> CoreMLModule:
    return CoreMLPteModule(path, engine) if path.suffix == ".pte" else CoreMLModule(path, engine)


def profile(module: CoreMLModule, steps: int) -> str:
    module.reset()
    module.forward(list(range(1000, 1064)), 0)
    pr = cProfile.Profile()
    pr.enable()
    for i in range(steps):
        module.forward([2000 + i], 64 + i)
    pr.disable()
    import io

    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(8)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", action="append", default=[], help="NAME=PATH or PATH of a .mlpackage or Core ML "
                    "delegate .pte (repeatable; default: export the embedded model's int4 and fp16 programs)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="WikiText-2 test tokens (windows of 512)")
    ap.add_argument("--engines", default="reference,plan", help="comma-separated: reference, plan")
    ap.add_argument("--profile", type=int, default=0, help="print cProfile's top functions over N decode steps")
    ap.add_argument("--work", default="/tmp/llamaship-coreml-eval", help="where default exports are kept")
    ap.add_argument("--out", default="bench/results/coreml_eval_speed.json", help="JSON results file")
    args = ap.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    torch.set_num_threads(2)

    packages: dict[str, Path] = {}
    for item in args.package:
        name, _, path = item.rpartition("=")
        packages[name or Path(path).name] = Path(path)
    if not packages:
        packages = export_defaults(Path(args.work))

    ckpt = load_checkpoint(default_model(), progress=lambda s: None)
    eval_slice = accuracy.make_slice(ckpt.tokenizer, args.eval_tokens, 512)
    full = build_model(ckpt.spec, ckpt.state, max_context=512, impl="torch", full_logits=True)
    reference = accuracy.reference_logprobs(full, eval_slice, ckpt.sha256(), print)
    del full
    calls = eval_slice.n_windows * (eval_slice.window - 1)

    rows: dict[str, dict[str, dict[str, float]]] = {}
    profiles: dict[str, str] = {}
    for name, path in packages.items():
        rows[name] = {}
        first: dict[str, np.ndarray] = {}
        for engine in engines:
            t = time.perf_counter()
            module = module_for(path, engine)
            load_s = time.perf_counter() - t
            if args.profile:
                profiles[f"{name} / {engine}"] = profile(module, args.profile)
            module.reset()
            first[engine] = np.stack([module.forward([tok], i).numpy()[0]
                                      for i, tok in enumerate(eval_slice.tokens[:64])])
            module.reset()
            t = time.perf_counter()
            acc = accuracy.evaluate_stepwise(module.forward, eval_slice, reference, print)
            eval_s = time.perf_counter() - t
            rows[name][engine] = {"load_s": round(load_s, 1), "eval_s": round(eval_s, 1),
                                  "s_per_token": round(eval_s / calls, 4), "kld": round(acc.mean_kld, 4),
                                  "top1": round(acc.top1_agreement, 4), "ppl": round(acc.ppl, 3),
                                  "ref_ppl": round(acc.ref_ppl, 3)}
            print(f"{name} / {engine}: {rows[name][engine]}", flush=True)
            del module
        if {"reference", "plan"} <= set(engines):
            ref_row, plan_row = rows[name]["reference"], rows[name]["plan"]
            d = np.abs(first["plan"] - first["reference"])
            rows[name]["compare"] = {
                "speedup": round(ref_row["eval_s"] / plan_row["eval_s"], 2),
                "kld_diff": round(plan_row["kld"] - ref_row["kld"], 4),
                "top1_diff": round(plan_row["top1"] - ref_row["top1"], 4),
                "max_abs_logit_diff_first_64": round(float(d.max()), 4),
                "logit_range_first_64": round(float(np.abs(first["reference"]).max()), 2),
                "argmax_agree_first_64": round(float((first["plan"].argmax(1)
                                                      == first["reference"].argmax(1)).mean()), 3),
            }
    for key, text in profiles.items():
        print(f"--- profile: {key} ({args.profile} decode steps after a 64-token prefill)\n{text}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": ckpt.spec.name, "slice": eval_slice.describe(), "threads": 2,
                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")
    print(f"\nslice: {eval_slice.describe()}")
    print("| package | engine | s/token | eval s | KLD | top-1 | PPL |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, by_engine in rows.items():
        for engine in engines:
            r = by_engine[engine]
            print(f"| {name} | {engine} | {r['s_per_token']} | {r['eval_s']} | {r['kld']} | {r['top1']} | {r['ppl']} |")
        if "compare" in by_engine:
            c = by_engine["compare"]
            print(f"| {name} | plan vs reference | x{c['speedup']} faster | | {c['kld_diff']:+} "
                  f"| {c['top1_diff']:+} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
