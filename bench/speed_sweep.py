"""Where the ExecuTorch bundle's decode time goes, knob by knob: exports the embedded SmolLM2-135M
once per variant (XNNPACK .pte, same code path as `llamaship export`) and measures each on
ExecuTorch's C++ runner (128-token WikiText-2 prompt, 128 new tokens, 1 warm-up + N runs, median)
and on the 4096-token accuracy slice of `llamaship export` (KLD / top-1 vs fp32), so every speed
gain is shown with what it costs.

    python bench/speed_sweep.py [--variants base,g64,head4,g64-head4,emb8] [--runs 3]
                                [--out bench/results/speed_sweep.json]

Each export takes ~2-4 min on 2 cores; the default set runs in ~20 min.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from llamaship.export.executorch import export_pte
from llamaship.export.llama.load import load_checkpoint
from llamaship.export.llama.model import build_model
from llamaship.pipeline import default_model
from llamaship.quantize.scheme import QuantScheme
from llamaship.targets import accuracy
from llamaship.targets.executorch_runtime import PteModule
from llamaship.targets.speed import benchmark

BASE = QuantScheme()
VARIANTS = {
    "base": BASE,
    "g64": replace(BASE, group_size=64),
    "head4": replace(BASE, lm_head_bits=4),
    "g64-head4": replace(BASE, group_size=64, lm_head_bits=4),
    "emb8": replace(BASE, embedding_bits=8),
    "w-only-int4": replace(BASE, activations="none"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="base,g64,head4,g64-head4",
                    help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (default 3)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="accuracy slice (0: speed only)")
    ap.add_argument("--out", default="bench/results/speed_sweep.json", help="JSON results file")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    ckpt = load_checkpoint(default_model(), progress=lambda s: None)
    tok = ckpt.tokenizer
    prompt_ids = list(accuracy.make_slice(tok, 4096, 512).tokens[:128])
    prompt = tok.decode(prompt_ids)
    eval_slice = reference = None
    if args.eval_tokens:
        eval_slice = accuracy.make_slice(tok, args.eval_tokens, 512)
        ref_model = build_model(ckpt.spec, ckpt.state, max_context=512, impl="torch", full_logits=True)
        reference = accuracy.reference_logprobs(ref_model, eval_slice, ckpt.sha256(), print)
        del ref_model
    rows = {}
    with tempfile.TemporaryDirectory(prefix="llamaship-sweep-") as work:
        tok_file = tok.write_runner_file(Path(work))
        for name in names:
            scheme = VARIANTS[name]
            pte = Path(work) / f"{name}.pte"
            print(f"{name} ({scheme.name}): exporting", flush=True)
            t = time.perf_counter()
            export_pte(ckpt.spec, ckpt.state, scheme, pte, max_context=2048, max_seq_len=128,
                       progress=lambda s: None)
            row = {"scheme": scheme.name, "export_s": round(time.perf_counter() - t, 1),
                   "size_mb": round(pte.stat().st_size / 1e6, 1)}
            sp = benchmark(pte, tok_file, prompt, gen_tokens=128, runs=args.runs)
            row |= {"prefill_tok_s": round(sp["prefill_tok_s"]["median"], 1),
                    "decode_tok_s": round(sp["decode_tok_s"]["median"], 1)}
            if eval_slice is not None and reference is not None:
                acc = accuracy.evaluate_stepwise(PteModule(pte).forward, eval_slice, reference, lambda s: None)
                row |= {"ppl": round(acc.ppl, 3), "kld": round(acc.mean_kld, 4), "top1": round(acc.top1_agreement, 3)}
            rows[name] = row
            print(f"  {row}", flush=True)
            pte.unlink()

    base = rows.get("base")
    print(f"\nSmolLM2-135M .pte variants, 128-token prompt, 128 new tokens, median of {args.runs} runs")
    print("| variant | scheme | size MB | prefill tok/s | decode tok/s | decode vs base | PPL | KLD | top-1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        ratio = f"x{r['decode_tok_s'] / base['decode_tok_s']:.2f}" if base else "-"
        print(f"| {name} | {r['scheme']} | {r['size_mb']} | {r['prefill_tok_s']} | {r['decode_tok_s']} | {ratio} | "
              f"{r.get('ppl', '-')} | {r.get('kld', '-')} | {r.get('top1', '-')} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": ckpt.spec.name, "prompt_tokens": 128, "new_tokens": 128,
                               "runs": args.runs, "eval_tokens": args.eval_tokens, "rows": rows}, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
