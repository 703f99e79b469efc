"""Decode/prefill speed of a llamaship ExecuTorch bundle against its peers on this machine, one
run each, same model (the embedded SmolLM2-135M-Instruct), 128-token WikiText-2 prompt, 128 new
tokens, 1 warm-up + N runs, medians and ratios:

- llamaship .pte on ExecuTorch's C++ runner (2 threads: the runner's default here);
- ExecuTorch's own export_llama .pte for the same model and quantization (--export-llama-pte; it
  takes ~11 min to produce on 2 cores, so it is an input, made with the command in EXPORT_LLAMA from
  a Meta-layout copy of the GGUF's weights; --max_seq_length 128 makes a .pte whose runner fails a
  128-token prompt with "Generation failed", hence 256);
- llama.cpp through llama-cpp-python on the shipped Q4_1 GGUF, 2 threads (skipped if not installed);
- PyTorch eager fp32, 1 thread (2 threads oversubscribe this machine: ~9x slower).

    python bench/peers.py --bundle DIR [--export-llama-pte FILE] [--runs 3] [--out bench/results/peers.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXPORT_LLAMA = (
    "python -m executorch.examples.models.llama.export_llama --checkpoint consolidated.00.pth "
    "--params params.json -kv --use_sdpa_with_kv_cache -X -qmode 8da4w --group_size 32 -d fp32 "
    "--embedding-quantize 4,32 --max_seq_length 256 --max_context_length 2048 "
    "--metadata '{\"get_bos_id\":1,\"get_eos_ids\":[2,0]}'"
)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def llama_cpp_child(gguf: str, prompt: str, gen: int, warmup: int, runs: int) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, n_threads=2, n_threads_batch=2, n_ctx=512, verbose=False)
    out = []
    for i in range(warmup + runs):
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        llm.create_completion(prompt, max_tokens=gen, temperature=0.0)
        perf = llama_cpp.llama_perf_context(llm.ctx)
        if i >= warmup:
            out.append({"prefill_tok_s": perf.n_p_eval * 1000 / max(perf.t_p_eval_ms, 1e-9),
                        "decode_tok_s": perf.n_eval * 1000 / max(perf.t_eval_ms, 1e-9)})
    print(json.dumps(out))


def eager_child(prompt_ids: list[int], gen: int, warmup: int, runs: int) -> None:
    import torch

    from llamaship.export.checkpoint import load_checkpoint
    from llamaship.export.model import build_model
    from llamaship.pipeline import default_model

    torch.set_num_threads(1)
    ckpt = load_checkpoint(default_model(), progress=lambda s: None)
    model = build_model(ckpt.spec, ckpt.state, max_context=512)
    out = []
    with torch.no_grad():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            logits = model(torch.tensor([prompt_ids]), torch.tensor([0]))
            t1 = time.perf_counter()
            for j in range(gen):
                logits = model(logits.argmax(-1).view(1, 1), torch.tensor([len(prompt_ids) + j]))
            t2 = time.perf_counter()
            if i >= warmup:
                out.append({"prefill_tok_s": len(prompt_ids) / (t1 - t0), "decode_tok_s": gen / (t2 - t1)})
    print(json.dumps(out))


def run_child(args: list[str], python: str = sys.executable) -> list[dict[str, float]] | None:
    res = subprocess.run([python, __file__, *args], capture_output=True, text=True)
    if res.returncode != 0:
        print(f"  failed: {res.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="llamaship bundle with model.pte")
    ap.add_argument("--export-llama-pte", help="ExecuTorch export_llama .pte of the same model (see EXPORT_LLAMA)")
    ap.add_argument("--llama-cpp-python", default=sys.executable,
                    help="python that has llama-cpp-python installed (default: this one)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="bench/results/peers.json")
    args = ap.parse_args()

    from llamaship.export.checkpoint import load_checkpoint
    from llamaship.pipeline import default_model
    from llamaship.targets import accuracy
    from llamaship.targets.speed import benchmark

    ckpt = load_checkpoint(default_model(), progress=lambda s: None)
    ids = list(accuracy.make_slice(ckpt.tokenizer, 4096, 512).tokens[:128])
    prompt = ckpt.tokenizer.decode(ids)
    bundle = Path(args.bundle)
    tok = bundle / "tokenizer.json"
    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, prefill: float, decode: float, extra: dict[str, Any]) -> None:
        rows[name] = {"prefill_tok_s": round(prefill, 1), "decode_tok_s": round(decode, 1), **extra}
        print(f"  {name}: prefill {prefill:.1f} tok/s, decode {decode:.1f} tok/s", flush=True)

    for name, pte in (("llamaship .pte (8da4w g32, emb4, head8)", bundle / "model.pte"),
                      ("ExecuTorch export_llama .pte (8da4w g32, emb 4,32)",
                       Path(args.export_llama_pte) if args.export_llama_pte else None)):
        if pte is None:
            print(f"  {name}: skipped (no --export-llama-pte)")
            continue
        sp = benchmark(pte, tok, prompt, gen_tokens=128, runs=args.runs)
        add(name, sp["prefill_tok_s"]["median"], sp["decode_tok_s"]["median"],
            {"size_mb": round(pte.stat().st_size / 1e6, 1), "peak_rss_mb": round(sp["peak_rss_mb"])})
    gguf = str(default_model())
    got = run_child(["llama_cpp", gguf, prompt, "128", "1", str(args.runs)], args.llama_cpp_python)
    if got:
        add("llama.cpp (llama-cpp-python, shipped Q4_1 GGUF)", _median([g["prefill_tok_s"] for g in got]),
            _median([g["decode_tok_s"] for g in got]), {"size_mb": round(Path(gguf).stat().st_size / 1e6, 1)})
    got = run_child(["eager", json.dumps(ids), "128", "1", str(args.runs)])
    if got:
        add("PyTorch eager fp32 (1 thread)", _median([g["prefill_tok_s"] for g in got]),
            _median([g["decode_tok_s"] for g in got]), {})

    ours = rows["llamaship .pte (8da4w g32, emb4, head8)"]["decode_tok_s"]
    print("\n| runtime | prefill tok/s | decode tok/s | llamaship decode ratio |")
    print("| --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['prefill_tok_s']} | {row['decode_tok_s']} | x{ours / row['decode_tok_s']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompt_tokens": 128, "new_tokens": 128, "runs": args.runs, "rows": rows,
                               "export_llama_command": EXPORT_LLAMA}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "llama_cpp":
        llama_cpp_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif len(sys.argv) > 1 and sys.argv[1] == "eager":
        eager_child(json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main())
