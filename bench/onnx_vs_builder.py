"""Decode/prefill speed (and accuracy) of llamaship's ONNX export against onnxruntime-genai's model
builder run with its own defaults, on the same model and this machine.

    python bench/onnx_vs_builder.py [--model PATH] [--runs 3] [--out bench/results/onnx_vs_builder.json]

Both graphs come from the same weights (the embedded SmolLM2-135M-Instruct by default): the peer is
`python -m onnxruntime_genai.models.builder -p int4 -e cpu` with no extra options (int4 block 32,
symmetric, accuracy level 4, embedding and lm_head sharing one int4 matrix); llamaship's adds an int8
lm_head, its own int4 embedding and a pruned prefill lm_head. Speed: onnxruntime-genai's Generator,
128-token WikiText-2 prompt, 128 new tokens, 1 warm-up + N runs, in a child process each. Accuracy:
the 4096-token WikiText-2 slice of `llamaship validate`, token by token through the KV cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from llamaship.export.hf_folder import write_hf_folder
from llamaship.export.llama.load import load_checkpoint
from llamaship.export.llama.model import build_model
from llamaship.export.onnx import describe_quantization, export_onnx, run_builder
from llamaship.pipeline import default_model
from llamaship.quantize.scheme import QuantScheme
from llamaship.targets import accuracy
from llamaship.targets.onnx_runtime import OnnxModule
from llamaship.targets.speed import benchmark_onnx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (default 3)")
    ap.add_argument("--no-accuracy", action="store_true", help="speed only")
    ap.add_argument("--out", default="bench/results/onnx_vs_builder.json", help="JSON results file")
    args = ap.parse_args()

    ckpt = load_checkpoint(args.model or default_model())
    tok = ckpt.tokenizer
    eval_slice = accuracy.make_slice(tok, 4096, 512)
    prompt = list(eval_slice.tokens[:128])
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as work:
        work_dir = Path(work)
        ours = work_dir / "llamaship"
        t = time.perf_counter()
        export_onnx(ckpt.spec, ckpt.state, tok, QuantScheme(), ours, max_context=2048, progress=print)
        ours_s = time.perf_counter() - t
        peer = work_dir / "builder"
        t = time.perf_counter()
        hf = write_hf_folder(ckpt.spec.replace(max_context=2048), ckpt.state, tok, work_dir / "hf")
        run_builder(hf, peer, "int4", {}, work_dir / "builder.log", work_dir / "cache")
        peer_s = time.perf_counter() - t

        reference = None
        if not args.no_accuracy:
            ref_model = build_model(ckpt.spec, ckpt.state, max_context=512, impl="torch", full_logits=True)
            reference = accuracy.reference_logprobs(ref_model, eval_slice, ckpt.sha256(), print)
            del ref_model
        rows = {}
        for name, folder, secs in (("llamaship onnx", ours, ours_s), ("onnxruntime-genai builder int4", peer, peer_s)):
            print(f"speed: {name}", flush=True)
            speed = benchmark_onnx(folder, prompt, gen_tokens=128, runs=args.runs)
            row = {
                "size_mb": round(sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 1e6, 1),
                "export_s": round(secs, 1),
                "quantization": sorted(describe_quantization(folder / "model.onnx")["quantized_ops"]),
                "speed": speed,
            }
            if reference is not None:
                print(f"accuracy: {name}", flush=True)
                acc = accuracy.evaluate_stepwise(OnnxModule(folder).forward, eval_slice, reference, lambda s: None)
                row["accuracy"] = acc.to_json()
            rows[name] = row

    ours_row, peer_row = rows["llamaship onnx"], rows["onnxruntime-genai builder int4"]
    ratio = {k: ours_row["speed"][k]["median"] / peer_row["speed"][k]["median"]
             for k in ("prefill_tok_s", "decode_tok_s")}
    result = {"model": ckpt.spec.name, "machine": f"{os.cpu_count()} cores", "prompt_tokens": 128,
              "new_tokens": 128, "runs": args.runs, "rows": rows, "ratio_llamaship_over_builder": ratio}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{ckpt.spec.name}, 128-token prompt, 128 new tokens, median of {args.runs} runs:")
    print("| graph | size MB | prefill tok/s | decode tok/s | TTFT ms | peak RSS MB | PPL | KLD | top-1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        sp, acc = row["speed"], row.get("accuracy")
        accs = (f"{acc['ppl']:.3f} | {acc['mean_kld']:.4f} | {acc['top1_agreement']:.3f}" if acc else "- | - | -")
        print(f"| {name} | {row['size_mb']} | {sp['prefill_tok_s']['median']:.1f} | "
              f"{sp['decode_tok_s']['median']:.1f} | {sp['ttft_ms']['median']:.0f} | "
              f"{sp['peak_rss_mb']:.0f} | {accs} |")
    print(f"ratio llamaship / builder: prefill x{ratio['prefill_tok_s']:.2f}, decode x{ratio['decode_tok_s']:.2f}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
