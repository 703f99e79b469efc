"""Decode/prefill speed of llamaship's bundle against its peers on this machine, same model (the
embedded SmolLM2-135M-Instruct), 128-token WikiText-2 prompt, 128 new tokens, rounds of 1 warm-up +
N runs that alternate between the runtimes (this shared 2-core machine has slow spells: the same
.pte measured 204 and 159 decode tok/s an hour apart), medians, ratios and each runtime's share of
the memory-bandwidth roofline:

- llamaship .pte on ExecuTorch's C++ runner (2 threads: the runner's default here);
- ExecuTorch's own export_llama .pte for the same model and quantization (--export-llama-pte; it
  takes ~11 min to produce on 2 cores, so it is an input, made with the command in EXPORT_LLAMA from
  a Meta-layout copy of the GGUF's weights; --max_seq_length 128 makes a .pte whose runner fails a
  128-token prompt with "Generation failed", hence 256);
- llama.cpp through llama-cpp-python, 2 threads: the shipped Q4_1 GGUF and a Q4_0 requantized from it
  with llama.cpp's own quantizer (llama_model_quantize, allow_requantize), skipped if not installed;
- llamaship's ONNX folder and onnxruntime-genai's model builder int4 defaults on the same weights, both
  on onnxruntime-genai's Generator (the builder graph is built here unless --builder-onnx is given);
- PyTorch eager fp32, 1 thread (2 threads oversubscribe this machine: ~9x slower).

The roofline: decode reads each stored weight once per token, so tok/s <= copy bandwidth / bytes per
token, with bytes per token taken as the artifact's stored size (the embedding table is in it but only
one row is read, so the ceiling is a little low for all rows alike).

    python bench/peers.py --bundle DIR [--export-llama-pte FILE] [--llama-cpp-python PY]
                          [--builder-onnx DIR] [--runs 3] [--rounds 3] [--out bench/results/peers.json]

Writes the JSON and a PNG chart beside it (the chart needs matplotlib: `pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXPORT_LLAMA = (
    "python -m executorch.examples.models.llama.export_llama --checkpoint consolidated.00.pth "
    "--params params.json -kv --use_sdpa_with_kv_cache -X -qmode 8da4w --group_size 32 -d fp32 "
    "--embedding-quantize 4,32 --max_seq_length 256 --max_context_length 2048 "
    "--metadata '{\"get_bos_id\":1,\"get_eos_ids\":[2,0]}'"
)
OURS = "llamaship .pte (8da4w g32, emb4, head8)"


def llama_cpp_quantize_child(src: str, dst: str, ftype: str) -> None:
    """llama.cpp's own quantizer; from an already-quantized GGUF it needs allow_requantize."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    print(json.dumps({"ok": True}))


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

    from llamaship.export.llama.load import load_checkpoint
    from llamaship.export.llama.model import build_model
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


def run_child(args: list[str], python: str = sys.executable) -> Any:
    res = subprocess.run([python, __file__, *args], capture_output=True, text=True)
    if res.returncode != 0:
        print(f"  failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_chart(rows: dict[str, dict[str, Any]], ceiling_of: dict[str, float], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  chart skipped: matplotlib is not installed (pip install matplotlib)")
        return False
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.6 * len(names) + 1.8), sharey=True)
    for ax, key, title in ((axes[0], "decode_tok_s", "decode tok/s (bar) and roofline (|)"),
                           (axes[1], "prefill_tok_s", "prefill tok/s")):
        values = [rows[n][key] for n in names]
        colors = ["tab:green" if n.startswith("llamaship") else "tab:gray" for n in names]
        ax.barh(names, values, color=colors)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
        if key == "decode_tok_s":
            for y, n in enumerate(names):
                if n in ceiling_of:
                    ax.plot([ceiling_of[n]] * 2, [y - 0.4, y + 0.4], color="black")
        ax.set_title(title)
    axes[0].invert_yaxis()  # shared y: inverting once puts the first row on top
    fig.suptitle("SmolLM2-135M, 128-token prompt, 128 new tokens, 2 cores (median of rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="llamaship bundle with model.pte (and onnx/ for the ONNX rows)")
    ap.add_argument("--export-llama-pte", help="ExecuTorch export_llama .pte of the same model (see EXPORT_LLAMA)")
    ap.add_argument("--llama-cpp-python", default=sys.executable,
                    help="python that has llama-cpp-python installed (default: this one)")
    ap.add_argument("--builder-onnx", help="onnxruntime-genai builder int4 folder of the same model "
                    "(default: build it here, ~40 s)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up, per round (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all runtimes, alternating (default 3)")
    ap.add_argument("--out", default="bench/results/peers.json", help="JSON results; the PNG goes beside it")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from bandwidth import copy_bandwidth_gbs

    from llamaship.export.hf_folder import write_hf_folder
    from llamaship.export.llama.load import load_checkpoint
    from llamaship.export.onnx import run_builder
    from llamaship.pipeline import default_model
    from llamaship.targets import accuracy
    from llamaship.targets.speed import benchmark, benchmark_onnx

    ckpt = load_checkpoint(default_model(), progress=lambda s: None)
    ids = list(accuracy.make_slice(ckpt.tokenizer, 4096, 512).tokens[:128])
    prompt = ckpt.tokenizer.decode(ids)
    bundle = Path(args.bundle)
    work = Path(tempfile.mkdtemp(prefix="llamaship-peers-"))

    def onnx_bytes(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.glob("model.onnx*"))

    # name -> (stored bytes, one measurement returning [(prefill, decode)] or None)
    peers: dict[str, tuple[int, Callable[[], list[tuple[float, float]] | None]]] = {}

    def pte_peer(pte: Path) -> Callable[[], list[tuple[float, float]] | None]:
        def measure() -> list[tuple[float, float]]:
            sp = benchmark(pte, bundle / "tokenizer.json", prompt, gen_tokens=128, runs=args.runs)
            return [(sp["prefill_tok_s"]["median"], sp["decode_tok_s"]["median"])]
        return measure

    def onnx_peer(folder: Path) -> Callable[[], list[tuple[float, float]] | None]:
        def measure() -> list[tuple[float, float]]:
            sp = benchmark_onnx(folder, ids, gen_tokens=128, runs=args.runs)
            return [(sp["prefill_tok_s"]["median"], sp["decode_tok_s"]["median"])]
        return measure

    def child_peer(child_args: list[str], python: str) -> Callable[[], list[tuple[float, float]] | None]:
        def measure() -> list[tuple[float, float]] | None:
            got = run_child(child_args, python)
            if not got:
                return None
            return [(statistics.median(g["prefill_tok_s"] for g in got),
                     statistics.median(g["decode_tok_s"] for g in got))]
        return measure

    peers[OURS] = ((bundle / "model.pte").stat().st_size, pte_peer(bundle / "model.pte"))
    if args.export_llama_pte:
        pte = Path(args.export_llama_pte)
        peers["ExecuTorch export_llama .pte (8da4w g32, emb 4,32)"] = (pte.stat().st_size, pte_peer(pte))
    else:
        print("  ExecuTorch export_llama: skipped (no --export-llama-pte)")
    gguf = default_model()
    q4_0 = work / "smollm2-q4_0.gguf"
    if run_child(["llama_cpp_quantize", str(gguf), str(q4_0), "Q4_0"], args.llama_cpp_python) is None:
        print("  llama.cpp Q4_0: requantization failed or llama-cpp-python missing; skipped")
    for name, path in (("llama.cpp Q4_0 (requantized with llama.cpp)", q4_0),
                       ("llama.cpp Q4_1 (shipped GGUF)", gguf)):
        if path.exists():
            peers[name] = (path.stat().st_size, child_peer(
                ["llama_cpp", str(path), prompt, "128", "1", str(args.runs)], args.llama_cpp_python))
    onnx_ours = bundle / "onnx"
    builder = Path(args.builder_onnx) if args.builder_onnx else work / "builder"
    if onnx_ours.is_dir() and not args.builder_onnx:
        print("  building the onnxruntime-genai builder int4 graph (its defaults)", flush=True)
        hf = write_hf_folder(ckpt.spec.replace(max_context=2048), ckpt.state, ckpt.tokenizer, work / "hf")
        run_builder(hf, builder, "int4", {}, work / "builder.log", work / "cache")
    algo = json.loads((bundle / "manifest.json").read_text())["quant"].get("algorithm", "rtn")
    for name, folder in ((f"llamaship onnx (w4 g32 {algo}, emb4, head8)", onnx_ours),
                         ("onnxruntime-genai builder int4 (defaults)", builder)):
        if folder.is_dir():
            peers[name] = (onnx_bytes(folder), onnx_peer(folder))
    n_params = sum(t.numel() for t in ckpt.state.values())
    peers["PyTorch eager fp32 (1 thread)"] = (4 * n_params, child_peer(
        ["eager", json.dumps(ids), "128", "1", str(args.runs)], sys.executable))

    # Rounds alternate the runtimes so a slow spell of this shared machine hits all of them alike;
    # each figure is the median over rounds of each round's median run.
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in peers}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for name, (_, measure) in peers.items():
            got = measure()
            if got:
                samples[name] += got
                print(f"  {name}: prefill {got[0][0]:.1f} tok/s, decode {got[0][1]:.1f} tok/s", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for name, got in samples.items():
        if got:
            decode = [d for _, d in got]
            rows[name] = {"prefill_tok_s": round(statistics.median(p for p, _ in got), 1),
                          "decode_tok_s": round(statistics.median(decode), 1),
                          "decode_min_max": [round(min(decode), 1), round(max(decode), 1)],
                          "size_mb": round(peers[name][0] / 1e6, 1)}

    bandwidth = copy_bandwidth_gbs(1.0, 2)
    print(f"  copy bandwidth: {bandwidth:.1f} GB/s (2 threads)", flush=True)
    ceiling_of = {n: bandwidth * 1e9 / (r["size_mb"] * 1e6) for n, r in rows.items()}
    ours = rows[OURS]["decode_tok_s"]
    print(f"\nSmolLM2-135M, 128-token prompt, 128 new tokens, median of {args.rounds} rounds x {args.runs} runs, "
          f"copy bandwidth {bandwidth:.1f} GB/s")
    print("| runtime | size MB | prefill tok/s | decode tok/s | roofline tok/s | share | llamaship .pte decode ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        row["roofline_decode_tok_s"] = round(ceiling_of[name], 1)
        row["roofline_share"] = round(row["decode_tok_s"] / ceiling_of[name], 3)
        print(f"| {name} | {row['size_mb']} | {row['prefill_tok_s']} | {row['decode_tok_s']} | "
              f"{row['roofline_decode_tok_s']} | {row['roofline_share']:.0%} | x{ours / row['decode_tok_s']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompt_tokens": len(ids), "new_tokens": 128, "runs": args.runs,
                               "rounds": args.rounds, "copy_bandwidth_gbs": round(bandwidth, 1), "rows": rows,
                               "export_llama_command": EXPORT_LLAMA}, indent=1) + "\n")
    chart = out.with_suffix(".png")
    if write_chart(rows, ceiling_of, chart):
        print(f"chart: {chart}")
    print(f"results: {out}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "llama_cpp_quantize":
        llama_cpp_quantize_child(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "llama_cpp":
        llama_cpp_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif len(sys.argv) > 1 and sys.argv[1] == "eager":
        eager_child(json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main())
