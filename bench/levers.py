"""The decode and prefill levers of the Pareto issue, each measured with its KLD beside its speed, in
one run, against its own base row (same runtime, same slice, same rounds as bench/peers.py).

On the embedded SmolLM2-135M-Instruct, --quant-algo gptq (the CLI's default scheme unless a row
says otherwise), max context 2048:

- `.pte` (ExecuTorch runner, XNNPACK): the base; 1 thread instead of one per core; a 4-bit
  lm_head; prefill chunk (the `max_seq_len` one forward call takes) 32 and 64 instead of 128.
- ExecuTorch's own export_llama: its base, with `--quantize_kv_cache` (int8 per-token KV cache,
  ExecuTorch's quantized-KV SDPA), and without `--use_sdpa_with_kv_cache` (attention as aten
  ops instead of the fused `custom_sdpa`). These levers are measured in ExecuTorch's own pipeline,
  on its row, because that is where they are implemented today.
- ONNX (onnxruntime-genai): the folder as exported before this bench's change (zero points stored
  for symmetric blocks) and now (dropped); 1 thread; `accuracy_level` 1 (fp32 activations in
  MatMulNBits) instead of 4 (int8); an int8 KV cache (the builder's `kv_cache_quant_scheme=
  int8_per_channel`, with static scales calibrated here on WikiText-2 validation: on the CPU the
  builder takes no per-token KV quantization, that needs CUDA PagedAttention).

    python bench/levers.py [--rows a,b] [--eval-tokens 4096] [--rounds 4] [--runs 3]
                           [--cache ~/.cache/llamaship/peers] [--out bench/results/levers.json]

Artifacts are built once into the peers' cache (the gptq codes, two .pte exports, two
export_llama exports of ~8 min each, two ONNX exports); variants that only change a runtime
setting or a graph attribute are folders hard-linking their base's weights. Writes bench/results/levers.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peer_artifacts  # noqa: E402
import peers  # noqa: E402
from peer_artifacts import MAX_CONTEXT, Peer, cached  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def codes(ckpt: Any, cache: Path, progress: Callable[[str], None]) -> Any:
    from llamaship.quantize.checkpoint import QuantizedCheckpoint
    from llamaship.quantize.scheme import QuantScheme
    from llamaship.quantize.stage import quantize_checkpoint

    scheme = QuantScheme(group_size=32, algorithm="gptq")
    folder = cached(cache / "levers-codes-gptq", lambda tmp: quantize_checkpoint(
        ckpt.spec, ckpt.state, ckpt.tokenizer, scheme, tmp, lambda s: None), progress)
    return scheme, QuantizedCheckpoint(folder)


def pte_chunk(ckpt: Any, scheme: Any, quantized: Any, chunk: int, cache: Path, progress: Callable[[str], None]) -> Path:
    from llamaship.export.executorch import export_pte

    folder = cached(cache / f"levers-pte-chunk{chunk}", lambda tmp: export_pte(
        ckpt.spec, ckpt.state, scheme, tmp / "model.pte", max_context=MAX_CONTEXT, max_seq_len=chunk,
        progress=lambda s: None, quantized=quantized), progress)
    return folder / "model.pte"


def onnx_export(ckpt: Any, scheme: Any, quantized: Any, name: str, extra: dict[str, str], cache: Path,
                progress: Callable[[str], None]) -> Path:
    """Our ONNX export, with `extra` builder options added to the ones it passes."""
    from llamaship.export.onnx import export_onnx

    return cached(cache / f"levers-onnx-{name}", lambda tmp: export_onnx(
        ckpt.spec, ckpt.state, ckpt.tokenizer, scheme, tmp / "onnx", max_context=MAX_CONTEXT,
        progress=lambda s: None, quantized=quantized, builder_extra=extra), progress) / "onnx"


def kv_scale_file(ckpt: Any, path: Path, n_tokens: int = 4096) -> Path:
    """Per-layer, per-channel int8 KV scales (max |k| and |v| after RoPE / 127) from the fp32 model
    on WikiText-2 *validation* (the quantize stage's calibration text), in the JSON the builder's
    `kv_cache_scale_file` reads. On the CPU the builder quantizes the KV cache only with such
    static scales (per token needs CUDA PagedAttention)."""
    from llamaship.export.llama.model import build_model
    from llamaship.quantize.stage import calibration

    if path.exists():
        return path
    calib = calibration(ckpt.tokenizer, n_tokens)
    model = build_model(ckpt.spec, ckpt.state, max_context=calib.tokens.shape[1])
    amax = [[torch.zeros(ckpt.spec.n_kv_heads * ckpt.spec.head_dim) for _ in range(2)] for _ in model.layers]
    with torch.no_grad():
        for window in calib.tokens:
            model.reset_cache()
            model(window[None], torch.tensor([0]))
            for layer, seen in zip(model.layers, amax, strict=True):
                for i, cache in enumerate((layer.attention.k_cache, layer.attention.v_cache)):
                    seen[i] = torch.maximum(seen[i], cache[0].abs().amax(0).flatten())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"qmax": 127, "scales": {
        "k_scales": [(k.clamp_min(1e-6) / 127).tolist() for k, _ in amax],
        "v_scales": [(v.clamp_min(1e-6) / 127).tolist() for _, v in amax]}}))
    return path


def linked_onnx(base: Path, folder: Path, edit: Callable[[Path], None], progress: Callable[[str], None]) -> Path:
    """A copy of the ONNX folder `base` whose weights file is a hard link to the base's, then `edit`ed."""

    def build(tmp: Path) -> None:
        out = tmp / "onnx"
        out.mkdir()
        for f in base.iterdir():
            if f.name.endswith(".data"):  # a hard link: onnxruntime refuses data paths that leave the folder
                (out / f.name).hardlink_to(f)
            else:
                shutil.copy2(f, out / f.name)
        edit(out)

    return cached(folder, build, progress) / "onnx"


def one_thread(folder: Path) -> None:
    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=1))


def accuracy_level(level: int) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        import onnx

        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)  # keeps the data file reference
        for node in model.graph.node:
            for a in node.attribute:
                if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                    a.i = level
        onnx.save_model(model, str(folder / "model.onnx"))

    return edit


def build_rows(ckpt: Any, cache: Path, progress: Callable[[str], None]) -> list[Peer]:
    scheme, quantized = codes(ckpt, cache, progress)
    how = f"llamaship quantize stage --quant-algo gptq, scheme {scheme.name}"
    base = peer_artifacts.ours(ckpt, "gptq", cache, progress)  # built by bench/peers.py (same cache)
    pte = base[0]
    head4 = peer_artifacts.ours(ckpt, "gptq+head4", cache, progress)[0]
    rows = [replace(pte, name=".pte base (chunk 128, threads per core)", family="pte"),
            replace(pte, name=".pte 1 thread", family="pte", threads=1),
            replace(head4, name=".pte 4-bit lm_head", family="pte")]
    for chunk in (32, 64):
        rows.append(Peer(f".pte prefill chunk {chunk}", "pte", pte_chunk(ckpt, scheme, quantized, chunk, cache,
                                                                          progress), True, how, "pte"))
    for variant in ("", "kv8", "sdpa"):
        et = peer_artifacts.export_llama(ckpt, cache, progress, variant)[0]
        rows.append(replace(et, name=et.name.replace("ExecuTorch export_llama", "export_llama"), family="export_llama"))
    onnx_now = onnx_export(ckpt, scheme, quantized, "gptq", {}, cache, progress)
    kv_json = cache / "levers-kv-scales.json"
    rows += [replace(base[1], name="ONNX zero points stored (before)", family="onnx"),
             Peer("ONNX base (zero points dropped)", "onnx", onnx_now, True, how, "onnx"),
             Peer("ONNX 1 thread", "onnx", linked_onnx(onnx_now, cache / "levers-onnx-1thread", one_thread, progress),
                  True, how + ", intra_op_num_threads 1", "onnx"),
             Peer("ONNX accuracy_level 1 (fp32 activations)", "onnx", linked_onnx(
                 onnx_now, cache / "levers-onnx-acc1", accuracy_level(1), progress), True, how, "onnx"),
             Peer("ONNX int8 KV cache (per channel, calibrated)", "onnx", onnx_export(
                 ckpt, scheme, quantized, "kv8", {"kv_cache_quant_scheme": "int8_per_channel",
                                                  "kv_cache_scale_file": str(kv_scale_file(ckpt, kv_json))},
                 cache, progress), True,
                  how + ", builder kv_cache_quant_scheme=int8_per_channel with scales from WikiText-2 validation",
                  "onnx")]
    return rows


# export_llama without its fused SDPA attends over all 2048 cache slots with a mask at every step:
# scoring 4096 tokens one by one ran past 18 minutes here. Its attention is the same fp32 math.
SPEED_ONLY = {"export_llama (8da4w g32 HQQ, emb 4,32, aten SDPA)": "token-by-token scoring ran past 18 min: "
              "every step attends over all 2048 cache slots; same weights and fp32 attention math as its base"}

BASES = {"pte": ".pte base (chunk 128, threads per core)",
         "export_llama": "export_llama (8da4w g32 HQQ, emb 4,32)", "onnx": "ONNX base (zero points dropped)"}


def table(result: dict[str, Any]) -> str:
    lines = [f"SmolLM2-135M-Instruct; accuracy on {result['slice']}; speed: 128-token prompt, 128 new tokens, "
             f"median of {result['rounds']} rounds x {result['runs']} runs, rounds alternating", "",
             "| lever | KLD | top-1 | MB | prefill tok/s | decode tok/s | prefill vs base | decode vs base |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = result["rows"]
    for name, r in rows.items():
        b = rows.get(BASES[r["family"]], {})
        rel = [f"x{r[k] / b[k]:.2f}" if k in r and k in b else "-" for k in ("prefill_tok_s", "decode_tok_s")]
        acc = f"{r['kld']:.4f} | {r['top1']:.3f}" if "kld" in r else "not measured | -"
        lines.append(f"| {name} | {acc} | {r['size_mb']} | {r.get('prefill_tok_s', '-')} "
                     f"| {r.get('decode_tok_s', '-')} | {rel[0]} | {rel[1]} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="", help="comma-separated substrings: measure only rows whose name holds one "
                    "(their bases are always measured too)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="WikiText-2 test tokens scored (windows of 512)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llamaship" / "peers",
                    help="where built artifacts are kept (shared with bench/peers.py)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up, per round")
    ap.add_argument("--rounds", type=int, default=4, help="rounds over all rows, alternating")
    ap.add_argument("--build-only", action="store_true", help="build (or find cached) every artifact, then stop")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "levers.json", help="JSON results")
    args = ap.parse_args()
    args.llama_cpp_python = sys.executable  # peers.measure_speed's field; no llama.cpp row here

    from llamaship.export.llama.load import load_checkpoint
    from llamaship.pipeline import default_model
    from llamaship.quiet import quiet_library_warnings
    from llamaship.targets import accuracy
    from llamaship.targets.validate import reference_for

    quiet_library_warnings()
    torch.set_num_threads(2)
    ckpt = load_checkpoint(default_model(), progress=lambda s: None)
    rows = build_rows(ckpt, args.cache, lambda s: print(s, flush=True))
    wanted = [w for w in args.rows.split(",") if w]
    if wanted:
        rows = [r for r in rows if r.name in BASES.values() or any(w in r.name for w in wanted)]
    if args.build_only:
        return 0
    sl = accuracy.make_slice(ckpt.tokenizer, args.eval_tokens, 512)
    ref = reference_for(ckpt, sl, lambda s: None)
    result_rows: dict[str, dict[str, Any]] = {}
    scored = args.cache / "levers-accuracy.json"  # accuracy per artifact and slice: a re-run only times
    known = json.loads(scored.read_text()) if scored.exists() else {}
    for p in rows:
        row = {"family": p.family, "how": p.how, "threads": p.threads,
               "size_mb": round(peers.stored_bytes(p, 0) / 1e6, 1)}
        result_rows[p.name] = row
        if p.name in SPEED_ONLY:
            print(f"  {p.name}: accuracy not measured ({SPEED_ONLY[p.name]})", flush=True)
            continue
        key = f"{p.path}|{p.path.stat().st_mtime_ns}|{args.eval_tokens}"
        if key not in known:
            acc = peers.accuracy_of(p, ckpt, sl, ref, sys.executable)
            known[key] = {"kld": round(acc["mean_kld"], 4), "top1": round(acc["top1_agreement"], 4),
                          "ppl": round(acc["ppl"], 3)}
            scored.write_text(json.dumps(known, indent=1))
        row |= known[key]
        print(f"  {p.name}: KLD {row['kld']:.4f}, top-1 {row['top1']:.3f}, {row['size_mb']} MB", flush=True)
    peers.measure_speed(rows, result_rows, ckpt, list(sl.tokens[:128]), args)
    result = {"slice": sl.describe(), "runs": args.runs, "rounds": args.rounds, "rows": result_rows}
    print("\n" + table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
