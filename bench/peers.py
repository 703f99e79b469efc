"""llamaship against its peers on both axes at once, in one run: accuracy and size beside prefill,
decode and time to first token, each row through its own runtime, on the embedded
SmolLM2-135M-Instruct (how each artifact is built, and cached: bench/peer_artifacts.py).

Accuracy: KLD, top-1 agreement and PPL against the same fp32 reference (validation's, streamed),
on the same WikiText-2 *test* slice (`--eval-tokens`, windows of 512, the second half of each
window scored). The .pte and ONNX rows run token by token through their KV caches, as `llamaship
validate` does; llama.cpp runs each window as one batch with logits for every position.

Speed: 128-token WikiText-2 prompt, 128 new tokens, 2 threads, rounds of 1 warm-up + N runs that
alternate between the runtimes (this shared 2-core machine has slow spells), medians. TTFT is the
128-token prefill plus one decode step, from the measured rates. The roofline: decode reads each
stored weight once per token, so tok/s <= copy bandwidth / stored bytes (the embedding table is
counted though only one row is read, so the ceiling is a little low for all rows alike).

    python bench/peers.py [--algos gptq,hqq,awq,rtn] [--llama-cpp-python PY] [--eval-tokens 4096]
                          [--cache ~/.cache/llamaship/peers] [--runs 3] [--rounds 4]

llama.cpp rows need llama-cpp-python (`pip install llama-cpp-python`, a ~10 min source build on
2 cores); without it they are skipped and the script says so. Writes bench/results/peers.json and
the Pareto chart bench/results/pareto.png (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import peer_artifacts  # noqa: E402
from peer_artifacts import Peer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHILDREN = Path(__file__).parent / "peer_children.py"


def stored_bytes(peer: Peer, n_params: int) -> int:
    if peer.kind == "eager":
        return 4 * n_params
    if peer.path.is_file():
        return peer.path.stat().st_size
    return sum(f.stat().st_size for f in peer.path.glob("model.onnx*"))


def child(args: list[str], python: str) -> Any:
    res = subprocess.run([python, str(CHILDREN), *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def accuracy_of(peer: Peer, ckpt: Any, sl: Any, ref: Any, python: str) -> dict[str, Any]:
    from llamaship.targets import accuracy
    from llamaship.targets.executorch_runtime import PteModule
    from llamaship.targets.onnx_runtime import OnnxModule

    quiet = lambda s: None  # noqa: E731
    if peer.kind == "eager":  # our module in fp32, a whole window per call (not the streamed reference code)
        from llamaship.export.llama.model import build_model

        model = build_model(ckpt.spec, ckpt.state, max_context=512, full_logits=True)
        with torch.no_grad():
            return accuracy.evaluate_chunked(lambda toks, pos: model(torch.tensor([toks]), torch.tensor([pos]))[0],
                                             sl, ref, quiet).to_json()
    if peer.kind == "pte":
        return accuracy.evaluate_stepwise(PteModule(peer.path).forward, sl, ref, quiet).to_json()
    if peer.kind == "onnx":
        return accuracy.evaluate_stepwise(OnnxModule(peer.path).forward, sl, ref, quiet).to_json()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "windows.json").write_text(json.dumps(list(sl.windows())))
        child(["llama_cpp_logits", str(peer.path), str(Path(tmp) / "windows.json"), str(sl.first_scored), tmp],
              python)
        per_window = iter([np.load(Path(tmp) / f"{w}.npy") for w in range(sl.n_windows)])
        # evaluate_chunked slices [first_scored:] itself: pad the unscored head back in
        return accuracy.evaluate_chunked(
            lambda toks, pos: torch.from_numpy(np.concatenate(
                [np.zeros((sl.first_scored, ckpt.spec.vocab_size), np.float32), next(per_window)])),
            sl, ref, quiet).to_json()


def speed_of(peer: Peer, ckpt: Any, ids: list[int], runs: int, python: str) -> tuple[float, float]:
    from llamaship.targets.speed import benchmark, benchmark_onnx

    if peer.kind == "pte":
        with tempfile.TemporaryDirectory() as tmp:
            tok = ckpt.tokenizer.write_runner_file(Path(tmp))
            sp = benchmark(peer.path, tok, ckpt.tokenizer.decode(ids), gen_tokens=128, runs=runs, threads=peer.threads)
        return sp["prefill_tok_s"]["median"], sp["decode_tok_s"]["median"]
    if peer.kind == "onnx":
        sp = benchmark_onnx(peer.path, ids, gen_tokens=128, runs=runs)
        return sp["prefill_tok_s"]["median"], sp["decode_tok_s"]["median"]
    got = (child(["llama_cpp_speed", str(peer.path), ckpt.tokenizer.decode(ids), "128", "1", str(runs)], python)
           if peer.kind == "gguf" else child(["eager_speed", json.dumps(ids), "128", "1", str(runs)], sys.executable))
    return (statistics.median(g["prefill_tok_s"] for g in got), statistics.median(g["decode_tok_s"] for g in got))


def build_peers(args: argparse.Namespace, ckpt: Any, progress: Callable[[str], None]) -> list[Peer]:
    from llamaship.pipeline import default_model

    peers: list[Peer] = []
    for algo in args.algos.split(","):
        peers += peer_artifacts.ours(ckpt, algo, args.cache, progress)
    peers += peer_artifacts.export_llama(ckpt, args.cache, progress)
    peers += peer_artifacts.llama_cpp(default_model(), args.llama_cpp_python, args.cache, progress)
    peers += peer_artifacts.builder(ckpt, args.cache, progress)
    peers.append(Peer("PyTorch eager fp32 (1 thread)", "eager", Path("-"), False,
                      "llamaship's module, unquantized (the reference's model)", "eager"))
    print("  optimum-executorch 8da4w: not measured (optimum-executorch 1.1.0 pins transformers==5.0.0rc1; this "
          "environment has the 5.x onnxruntime-genai's builder needs: it would take a venv of its own)")
    return peers


def measure_speed(peers: list[Peer], rows: dict[str, dict[str, Any]], ckpt: Any, ids: list[int],
                  args: argparse.Namespace) -> None:
    """Rounds alternate the runtimes so a slow spell hits all of them alike; each figure is the
    median over rounds of each round's median run."""
    samples: dict[str, list[tuple[float, float]]] = {p.name: [] for p in peers}
    for r in range(args.rounds):
        print(f"speed round {r + 1}/{args.rounds}", flush=True)
        for p in peers:
            try:
                got = speed_of(p, ckpt, ids, args.runs, args.llama_cpp_python)
            except Exception as exc:  # one runtime failing must not lose the others' figures
                print(f"  {p.name}: speed failed ({exc})", flush=True)
                continue
            samples[p.name].append(got)
            print(f"  {p.name}: prefill {got[0]:.1f} tok/s, decode {got[1]:.1f} tok/s", flush=True)
    for name, got in samples.items():
        if got:
            prefill = statistics.median(g[0] for g in got)
            decode = statistics.median(g[1] for g in got)
            rows[name] |= {"prefill_tok_s": round(prefill, 1), "decode_tok_s": round(decode, 1),
                           "decode_min_max": [round(min(g[1] for g in got), 1), round(max(g[1] for g in got), 1)],
                           "ttft_ms": round(1000 * (len(ids) / prefill + 1 / decode), 1)}


def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["kld"] <= b["kld"] and a["size_mb"] <= b["size_mb"] and a["decode_tok_s"] > b["decode_tok_s"])


def goals(rows: dict[str, dict[str, Any]], default_algo: str) -> list[str]:
    """The Pareto issue's goals, each met or missed with its figure."""
    pte, onnx = rows.get(f"llamaship .pte ({default_algo})"), rows.get(f"llamaship ONNX ({default_algo})")
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"{'met   ' if ok else 'MISSED'} {text}")

    def ratio(a: dict[str, Any] | None, b: str, key: str, goal: float) -> None:
        if a is None or b not in rows or key not in a or key not in rows[b]:
            out.append(f"n/a    {key} vs {b}: not measured")
            return
        x = a[key] / rows[b][key]
        line(x >= goal, f"{key} x{x:.2f} of {b} (goal x{goal})")

    if pte and "decode_tok_s" in pte:
        for name, r in rows.items():
            if r["family"] in ("executorch", "llama.cpp") and not r["ours"] and "decode_tok_s" in r:
                why = (f"KLD {pte['kld']:.3f} vs {r['kld']:.3f}, {pte['size_mb']} vs {r['size_mb']} MB, "
                       f"decode {pte['decode_tok_s']} vs {r['decode_tok_s']} tok/s")
                line(dominates(pte, r), f".pte dominates {name}: {why}")
        ratio(pte, "llama.cpp Q4_0", "decode_tok_s", 1.5)
        ratio(pte, "ExecuTorch export_llama (8da4w g32 HQQ, emb 4,32)", "decode_tok_s", 1.25)
        line(pte["roofline_share"] >= 0.8, f".pte at {pte['roofline_share']:.0%} of its decode roofline (goal 80%)")
        ratio(pte, "llama.cpp Q4_0", "prefill_tok_s", 1.5)
    if onnx and "decode_tok_s" in onnx:
        for name, r in rows.items():
            if r["family"] == "onnx" and not r["ours"] and "decode_tok_s" in r:
                why = (f"KLD {onnx['kld']:.3f} vs {r['kld']:.3f}, {onnx['size_mb']} vs {r['size_mb']} MB, "
                       f"decode {onnx['decode_tok_s']} vs {r['decode_tok_s']} tok/s")
                line(dominates(onnx, r), f"ONNX dominates {name}: {why}")
        ratio(onnx, "onnxruntime-genai builder int4 (defaults)", "decode_tok_s", 1.0)
    return out


def table(result: dict[str, Any]) -> str:
    lines = [f"SmolLM2-135M-Instruct; accuracy on {result['slice']}; speed: {result['prompt_tokens']}-token "
             f"prompt, {result['new_tokens']} new tokens, 2 threads, median of {result['rounds']} rounds x "
             f"{result['runs']} runs; copy bandwidth {result['copy_bandwidth_gbs']} GB/s", "",
             "| row | KLD | top-1 | PPL ratio | MB | prefill tok/s | decode tok/s | TTFT ms | roofline share |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(result["rows"].items(), key=lambda kv: kv[1]["kld"]):
        bold = "**" if r["ours"] else ""
        speed = (f"{r['prefill_tok_s']} | {r['decode_tok_s']} | {r['ttft_ms']} | {r['roofline_share']:.0%}"
                 if "decode_tok_s" in r else " | | ")
        lines.append(f"| {bold}{name}{bold} | {max(r['kld'], 0.0):.3f} | {r['top1']:.3f} | {r['ppl_ratio']:.3f} "
                     f"| {r['size_mb']} | {speed} |")
    return "\n".join(lines)


def write_chart(result: dict[str, Any], path: Path) -> bool:
    """KLD against decode tok/s, marker area proportional to bytes, our rows in one colour."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  chart skipped: matplotlib is not installed (pip install matplotlib)")
        return False
    rows = {n: r for n, r in result["rows"].items() if "decode_tok_s" in r and r["family"] != "eager"}
    fig, ax = plt.subplots(figsize=(11, 7))
    biggest = max(r["size_mb"] for r in rows.values())
    for name, r in rows.items():
        ax.scatter(r["decode_tok_s"], r["kld"], s=900 * r["size_mb"] / biggest, alpha=0.6,
                   color="tab:green" if r["ours"] else "tab:gray", edgecolors="black", linewidths=0.5)
        ax.annotate(f"{name}\n{r['size_mb']:.0f} MB", (r["decode_tok_s"], r["kld"]), fontsize=6.5,
                    xytext=(6, 4), textcoords="offset points")
    front, best = [], float("inf")  # the Pareto front: no other row both faster and more accurate
    for r in sorted(rows.values(), key=lambda r: -r["decode_tok_s"]):
        if r["kld"] < best:
            front.append((r["decode_tok_s"], r["kld"]))
            best = r["kld"]
    ax.step([x for x, _ in front], [y for _, y in front], where="post", color="tab:green", alpha=0.4,
            linestyle="--", label="Pareto front (faster and more accurate than everything beyond it)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("decode tok/s, 128-token prompt + 128 new tokens, 2 threads (higher is better)")
    ax.set_ylabel("mean KLD vs fp32, log scale (lower is better)")
    ax.set_title(f"SmolLM2-135M-Instruct, this 2-core x86 host; accuracy on the {result['slice']}\n"
                 "marker area = bytes on disk; green = llamaship; fp32 eager (the reference) not drawn",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default="gptq,hqq,awq,rtn,gptq+head4",
                    help="llamaship rows: one .pte and one ONNX folder per quantize-stage algorithm, `+head4` for "
                    "a 4-bit lm_head (the first is the CLI's default, the one the goals are checked for)")
    ap.add_argument("--llama-cpp-python", default=sys.executable,
                    help="python that has llama-cpp-python installed (default: this one)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="WikiText-2 test tokens scored (windows of 512)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llamaship" / "peers",
                    help="where the built artifacts are kept between runs (delete a row's folder to rebuild it)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up, per round (default 3)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="rounds over all runtimes, alternating (default 4: with 2, structurally identical "
                    ".pte rows spread 130-154 tok/s here)")
    ap.add_argument("--build-only", action="store_true", help="build (or find cached) every artifact, then stop")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peers.json",
                    help="JSON results; pareto.png goes beside it")
    args = ap.parse_args()

    from bandwidth import copy_bandwidth_gbs

    from llamaship.export.llama.load import load_checkpoint
    from llamaship.pipeline import default_model
    from llamaship.quiet import quiet_library_warnings
    from llamaship.targets import accuracy
    from llamaship.targets.validate import reference_for

    quiet_library_warnings()
    torch.set_num_threads(2)
    ckpt = load_checkpoint(default_model(), progress=lambda s: None)
    n_params = sum(t.numel() for t in ckpt.state.values())
    peers = build_peers(args, ckpt, lambda s: print(s, flush=True))
    if args.build_only:
        return 0

    sl = accuracy.make_slice(ckpt.tokenizer, args.eval_tokens, 512)
    ref = reference_for(ckpt, sl, lambda s: None)
    rows: dict[str, dict[str, Any]] = {}
    for p in peers:
        try:
            acc = accuracy_of(p, ckpt, sl, ref, args.llama_cpp_python)
        except Exception as exc:  # a peer that cannot run is reported, not fatal
            print(f"  {p.name}: accuracy failed ({exc})", flush=True)
            continue
        rows[p.name] = {"ours": p.ours, "family": p.family, "how": p.how, "size_mb": round(
            stored_bytes(p, n_params) / 1e6, 1), "kld": round(acc["mean_kld"], 4),
            "top1": round(acc["top1_agreement"], 4), "ppl": round(acc["ppl"], 3),
            "ppl_ratio": round(acc["ppl_ratio"], 4)}
        print(f"  {p.name}: KLD {acc['mean_kld']:.4f}, top-1 {acc['top1_agreement']:.3f}, "
              f"PPL x{acc['ppl_ratio']:.3f}, {rows[p.name]['size_mb']} MB", flush=True)

    ids = list(sl.tokens[:128])
    measure_speed([p for p in peers if p.name in rows], rows, ckpt, ids, args)
    bandwidth = copy_bandwidth_gbs(1.0, 2)
    for r in rows.values():
        if "decode_tok_s" in r:
            r["roofline_decode_tok_s"] = round(bandwidth * 1e9 / (r["size_mb"] * 1e6), 1)
            r["roofline_share"] = round(r["decode_tok_s"] / r["roofline_decode_tok_s"], 3)
    result = {"slice": sl.describe(), "prompt_tokens": len(ids), "new_tokens": 128, "runs": args.runs,
              "rounds": args.rounds, "copy_bandwidth_gbs": round(bandwidth, 1), "rows": rows}
    result["goals"] = goals(rows, args.algos.split(",")[0])
    print("\n" + table(result) + "\n")
    print("\n".join(result["goals"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    chart = args.out.with_name("pareto.png")
    if write_chart(result, chart):
        print(f"chart: {chart}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
