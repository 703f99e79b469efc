"""Quantization algorithm x group size x format on SmolLM2-135M: each artifact scored on its own
runtime against the fp32 reference on WikiText-2 *test* (calibration reads *validation* only).

How each row is made: the quantize stage runs once per (algorithm, group) with the scheme the CLI
would use (8da4w, int4 embedding, int8 lm_head, symmetric), its time is the "quant s" column;
then each format packs those same codes (`export_pte` / `export_onnx` / `export_coreml` with
`quantized=`), and the artifact is scored token by token through its KV cache, exactly as
`llamaship validate` does. Bytes are the artifact's own files.

The .pte and ONNX run at a few ms per token; the Core ML reference evaluator at ~0.3 s per token
(the evaluator-speed issue), so Core ML rows are scored on a shorter slice (`--coreml-tokens`),
named in the row. Results are appended to the JSON as each row finishes, and rows already there
are skipped: a re-run resumes.

    python bench/quant_algos.py --algos rtn,hqq,gptq,awq --groups 32,64 --formats executorch,onnx
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "quant_algos.json"
ARTIFACT = {"executorch": "model.pte", "onnx": "onnx", "coreml": "model.mlpackage"}


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export(fmt: str, ckpt: Any, scheme: Any, quantized: Any, out: Path, ctx: int) -> None:
    quiet = lambda s: None  # noqa: E731
    if fmt == "executorch":
        from llamaship.export.executorch import export_pte

        export_pte(ckpt.spec, ckpt.state, scheme, out, max_context=ctx, max_seq_len=128, progress=quiet,
                   quantized=quantized)
    elif fmt == "onnx":
        from llamaship.export.onnx import export_onnx

        export_onnx(ckpt.spec, ckpt.state, ckpt.tokenizer, scheme, out, max_context=ctx, progress=quiet,
                    quantized=quantized)
    else:
        from llamaship.export.coreml import export_coreml

        export_coreml(ckpt.spec, ckpt.state, scheme, out, max_context=ctx, max_seq_len=128, progress=quiet,
                      quantized=quantized)


def score(fmt: str, work: Path, ckpt: Any, n_tokens: int, window: int) -> dict[str, Any]:
    from llamaship import backends
    from llamaship.targets import accuracy
    from llamaship.targets.validate import reference_for

    sl = accuracy.make_slice(ckpt.tokenizer, n_tokens, window)
    ref = reference_for(ckpt, sl, lambda s: None)
    art = {"format": fmt, "path": ARTIFACT[fmt], "folder": ARTIFACT[fmt]}
    module = backends.get(fmt).load_module(work, art)
    try:
        return accuracy.evaluate_stepwise(module.forward, sl, ref, lambda s: None).to_json()
    finally:
        close = getattr(module, "close", None)
        if close is not None:
            close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default="rtn,hqq,gptq,awq")
    ap.add_argument("--groups", default="32,64")
    ap.add_argument("--formats", default="executorch,onnx,coreml")
    ap.add_argument("--eval-tokens", type=int, default=32768, help="WikiText-2 test tokens (.pte, ONNX)")
    ap.add_argument("--coreml-tokens", type=int, default=2048, help="tokens for the Core ML evaluator's rows")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamaship-quant-algos"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    torch.set_num_threads(2)
    from llamaship.export.llama.load import load_checkpoint
    from llamaship.pipeline import default_model
    from llamaship.quantize.scheme import QuantScheme
    from llamaship.quantize.stage import quantize_checkpoint
    from llamaship.quiet import quiet_library_warnings

    quiet_library_warnings()
    ckpt = load_checkpoint(default_model())
    results = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    done = {(r["algorithm"], r["group_size"], r["format"], r["slice_tokens"]) for r in results["rows"]}
    for algo in args.algos.split(","):
        for group in map(int, args.groups.split(",")):
            formats = [f for f in args.formats.split(",")
                       if (algo, group, f, args.coreml_tokens if f == "coreml" else args.eval_tokens) not in done]
            if not formats:
                continue
            scheme = QuantScheme(group_size=group, algorithm=algo, calibration_tokens=args.calibration_tokens)
            codes = args.work / f"{algo}-g{group}" / "codes"
            shutil.rmtree(codes, ignore_errors=True)
            t = time.perf_counter()
            quantized = quantize_checkpoint(ckpt.spec, ckpt.state, ckpt.tokenizer, scheme, codes, lambda s: None)
            quant_s = time.perf_counter() - t
            print(f"{algo} g{group}: quantize stage {quant_s:.1f} s", flush=True)
            for fmt in formats:
                n_tokens = args.coreml_tokens if fmt == "coreml" else args.eval_tokens
                work = args.work / f"{algo}-g{group}" / fmt
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                t = time.perf_counter()
                export(fmt, ckpt, scheme, quantized, work / ARTIFACT[fmt], args.window)
                export_s = time.perf_counter() - t
                t = time.perf_counter()
                acc = score(fmt, work, ckpt, n_tokens, args.window)
                row = {"algorithm": algo, "group_size": group, "format": fmt, "scheme": scheme.name,
                       "quant_s": round(quant_s, 1), "export_s": round(export_s, 1),
                       "eval_s": round(time.perf_counter() - t, 1),
                       "bytes": folder_bytes(work / ARTIFACT[fmt]), "slice_tokens": n_tokens,
                       "kld": round(acc["mean_kld"], 4), "top1": round(acc["top1_agreement"], 4),
                       "ppl_ratio": round(acc["ppl_ratio"], 4), "ppl": round(acc["ppl"], 3), "slice": acc["slice"],
                       "calibration": quantized.record.get("calibration")}
                results["rows"].append(row)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))
                print(f"  {fmt:10s} KLD {row['kld']:.4f} top-1 {row['top1']:.4f} PPL x{row['ppl_ratio']:.3f} "
                      f"{row['bytes'] / 1e6:.1f} MB ({n_tokens} tokens)", flush=True)
                shutil.rmtree(work, ignore_errors=True)
    print(table(results["rows"]))
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| algorithm | group | format | slice tokens | KLD | top-1 | PPL ratio | MB | quant s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["format"], r["group_size"], r["kld"])):
        lines.append(f"| {r['algorithm']} | {r['group_size']} | {r['format']} | {r['slice_tokens']} | {r['kld']:.3f} "
                     f"| {r['top1']:.3f} | {r['ppl_ratio']:.3f} | {r['bytes'] / 1e6:.1f} | {r['quant_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
