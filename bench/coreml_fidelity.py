"""Core ML artifact fidelity on the embedded SmolLM2-135M, measured on Linux with the MIL reference
evaluator: size of the fp16 and int4 .mlpackage, their logits against the fp32 PyTorch module
(cosine, max |Δ|) over a prefill and decode steps through the program's KV-cache state, and
KLD / top-1 / PPL on the WikiText-2 slice `llamaship export` uses.

    python bench/coreml_fidelity.py [--eval-tokens 1024] [--bundle DIR] [--out bench/results/coreml_fidelity.json]

The evaluator runs ~0.1 s per token here, so the default slice is 1024 tokens; `--bundle` scores the
bundle's .pte and ONNX folder on the same slice, side by side. The ExecuTorch Core ML-delegate .pte
rows run the Core ML program extracted from the .pte. `--only NAME` (repeatable) picks programs and
`--merge` keeps the other rows already in the results file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from llamaship.export.coreml import export_coreml
from llamaship.export.executorch_coreml import export_pte_coreml
from llamaship.export.llama.load import load_checkpoint
from llamaship.export.llama.model import build_model
from llamaship.pipeline import default_model
from llamaship.quantize.scheme import QuantScheme
from llamaship.targets import accuracy
from llamaship.targets.coreml_runtime import CoreMLModule, CoreMLPteModule

VARIANTS = {  # name: (container, scheme)
    "fp16": ("mlpackage", None),
    "int4 g32 asymmetric": ("mlpackage", QuantScheme(symmetric=False)),
    "int4 g32 symmetric": ("mlpackage", QuantScheme()),
    "ExecuTorch Core ML delegate fp16": ("pte", None),
    "ExecuTorch Core ML delegate int4 g32 (emb4, head8)": ("pte", QuantScheme()),
}


def package_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-tokens", type=int, default=1024, help="accuracy slice (0: logits only)")
    ap.add_argument("--bundle", help="also score this bundle's model.pte and onnx/ on the same slice")
    ap.add_argument("--out", default="bench/results/coreml_fidelity.json", help="JSON results file")
    ap.add_argument("--only", action="append", choices=list(VARIANTS), help="programs to build (default: all)")
    ap.add_argument("--merge", action="store_true", help="keep the results file's other rows")
    args = ap.parse_args()
    ckpt = load_checkpoint(default_model(), progress=lambda s: None)
    tok = ckpt.tokenizer
    prompt = tok.encode("The capital of France is")
    ref_model = build_model(ckpt.spec, ckpt.state, max_context=512)
    with torch.no_grad():
        ref = [ref_model(torch.tensor([prompt]), torch.tensor([0]))]
        greedy = [int(ref[0].argmax(-1))]
        for i in range(7):
            ref.append(ref_model(torch.tensor([[greedy[-1]]]), torch.tensor([len(prompt) + i])))
            greedy.append(int(ref[-1].argmax(-1)))
    del ref_model
    eval_slice = reference = None
    if args.eval_tokens:
        eval_slice = accuracy.make_slice(tok, args.eval_tokens, 512)
        full = build_model(ckpt.spec, ckpt.state, max_context=512, impl="torch", full_logits=True)
        reference = accuracy.reference_logprobs(full, eval_slice, ckpt.sha256(), print)
        del full
    rows = {}
    with tempfile.TemporaryDirectory(prefix="llamaship-coreml-") as work:
        for name in args.only or list(VARIANTS):
            container, scheme = VARIANTS[name]
            pkg = Path(work) / f"variant{list(VARIANTS).index(name)}.{container}"
            t = time.perf_counter()
            export = export_coreml if container == "mlpackage" else export_pte_coreml
            res = export(ckpt.spec, ckpt.state, scheme, pkg, max_context=512, max_seq_len=128, progress=print)
            size = package_bytes(pkg) if pkg.is_dir() else pkg.stat().st_size
            row = {"export_s": round(time.perf_counter() - t, 1), "size_mb": round(size / 1e6, 1),
                   "timings": {k: round(v, 1) for k, v in res["timings"].items()}}
            module = CoreMLModule(pkg) if container == "mlpackage" else CoreMLPteModule(pkg)
            # the fp32 module's greedy path, teacher-forced: same inputs for both
            got = [module.forward(prompt, 0)]
            for i, tid in enumerate(greedy[:-1]):
                got.append(module.forward([tid], len(prompt) + i))
            cos = [torch.nn.functional.cosine_similarity(g, r).item() for g, r in zip(got, ref, strict=True)]
            # SmolLM2's logits share a large offset that quantization shifts (the .pte's raw cosine on
            # this prompt is 0.002 while it answers correctly): the centred cosine is the telling one
            ccos = [torch.nn.functional.cosine_similarity(g - g.mean(), r - r.mean()).item()
                    for g, r in zip(got, ref, strict=True)]
            max_abs = max((g - r).abs().max().item() for g, r in zip(got, ref, strict=True))
            row |= {"min_cosine": round(min(cos), 5), "min_centred_cosine": round(min(ccos), 5),
                    "max_abs": round(max_abs, 4),
                    "logit_range": round(max(r.abs().max().item() for r in ref), 2),
                    "greedy_agrees": sum(int(g.argmax(-1)) == t for g, t in zip(got, greedy, strict=True)),
                    "steps": len(got)}
            new = []
            module.reset()
            logits = module.forward(prompt, 0)
            for i in range(12):
                new.append(int(logits.argmax(-1)))
                logits = module.forward([new[-1]], len(prompt) + i)
            row["continuation"] = tok.decode(new)
            if eval_slice is not None and reference is not None:
                t = time.perf_counter()
                module.reset()
                acc = accuracy.evaluate_stepwise(module.forward, eval_slice, reference, print)
                row |= {"ppl": round(acc.ppl, 3), "ref_ppl": round(acc.ref_ppl, 3), "kld": round(acc.mean_kld, 4),
                        "top1": round(acc.top1_agreement, 3), "eval_s": round(time.perf_counter() - t, 1)}
            rows[name] = row
            print(f"{name}: {row}", flush=True)
    if args.bundle and eval_slice is not None and reference is not None:
        from llamaship.targets.executorch_runtime import PteModule
        from llamaship.targets.onnx_runtime import OnnxModule

        for name, path, make in (("ExecuTorch .pte (bundle)", Path(args.bundle) / "model.pte", PteModule),
                                 ("ONNX (bundle)", Path(args.bundle) / "onnx", OnnxModule)):
            if path.exists():
                acc = accuracy.evaluate_stepwise(make(path).forward, eval_slice, reference, print)
                size = package_bytes(path) if path.is_dir() else path.stat().st_size
                rows[name] = {"size_mb": round(size / 1e6, 1),
                              "ppl": round(acc.ppl, 3), "ref_ppl": round(acc.ref_ppl, 3),
                              "kld": round(acc.mean_kld, 4), "top1": round(acc.top1_agreement, 3)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.exists():
        rows = json.loads(out.read_text())["rows"] | rows
    out.write_text(json.dumps({"model": ckpt.spec.name, "prompt": "The capital of France is",
                               "eval_tokens": args.eval_tokens, "rows": rows}, indent=1) + "\n")
    print("| program | size MB | min cosine vs fp32 (centred) | max abs Δ (logit range) | greedy agrees | PPL | KLD "
          "| top-1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        logits = (f"{r['min_cosine']} ({r['min_centred_cosine']}) | {r['max_abs']} ({r['logit_range']}) | "
                  f"{r['greedy_agrees']}/{r['steps']}" if "min_cosine" in r else "- | - | -")
        print(f"| {name} | {r['size_mb']} | {logits} | {r.get('ppl', '-')} | "
              f"{r.get('kld', '-')} | {r.get('top1', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
