"""Full-size Llama 2 7B / Llama 3 8B export on this 24 GB, 2-core machine.

Writes a random-weight checkpoint with the real config and tokenizer in a real layout (Meta:
consolidated.00.pth + params.json + tokenizer.model; Hugging Face: sharded bf16 safetensors +
index + config.json + tokenizer.model), then runs `llamaship export` on it in a child process per
format and group size, and records wall time, the export's peak RSS (its own ru_maxrss, from the
manifest; it counts the pages of memory-mapped files it touched, which are reclaimable), peak
anonymous memory (sampled each second: what the OOM killer counts, there being no swap), artifact
size, and `llamaship fit`'s prediction.

    python bench/fullsize.py --model llama3-8b --layout meta --format executorch --group-size 32
    python bench/fullsize.py --model llama2-7b --layout hf --layers 2      # a 2-layer slice, quick

    python bench/fullsize.py --model llama3-8b --layout hf --reference-tokens 1024    # validation's reference
    python bench/fullsize.py --model llama3-8b --layout hf --format executorch --quant-algo rtn --validate-tokens 512

Random weights: the figures are about time, memory and size, not accuracy. The smoke generation
still runs the artifact; `--validate-tokens` also runs `llamaship validate` on the bundle (its
accuracy figures are meaningless with random weights; the run shows that validation of an 8B
artifact, the streamed fp32 reference included, fits this machine, and how long it takes per
token). Results are appended to bench/results/fullsize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "configs"
sys.path.insert(0, str(ROOT))
from tests.checkpoints import LLAMA2_TOKENIZER, LLAMA3_TOKENIZER  # noqa: E402  (the real files the tests use)

MODELS = {  # name: (Meta params folder, HF config folder, tokenizer file)
    "llama2-7b": ("llama-2-7b", "llama-2-7b-hf", LLAMA2_TOKENIZER),
    "llama3-8b": ("meta-llama-3-8b", "meta-llama-3-8b-hf", LLAMA3_TOKENIZER),
    "llama3.1-8b": ("llama-3.1-8b", "llama-3.1-8b-instruct-hf", LLAMA3_TOKENIZER),
}
SHARD_BYTES = 5 * 1024**3  # what Hugging Face's Llama repos use
SMOKE_TOKENS = {"coreml": 4,  # the MIL reference evaluator dequantizes an 8B model's weights per call
                "qnn": 3}  # the HTP simulator: one prefill call through every part, then decode calls


def random_state(spec, seed: int = 0):  # type: ignore[no-untyped-def]
    """Yield (name, bf16 tensor) in our (= Meta) naming; norms are ones, the rest N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    for name, shape in spec.expected_shapes().items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=torch.bfloat16)
        else:
            yield name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def write_meta(model: str, dest: Path, layers: int | None) -> Path:
    from llamaship.export.llama.load import load_spec

    meta_dir, _, tok = MODELS[model]
    dest.mkdir(parents=True)
    params = json.loads((CONFIGS / meta_dir / "params.json").read_text())
    if layers:
        params["n_layers"] = layers
    (dest / "params.json").write_text(json.dumps(params))
    shutil.copyfile(tok, dest / "tokenizer.model")
    spec = load_spec(dest)
    # one dict in RAM (16 GB for 8B in bf16): torch.save writes a single zip; the loader mmaps it
    state = dict(random_state(spec))
    torch.save(state, dest / "consolidated.00.pth")
    return dest


def write_hf(model: str, dest: Path, layers: int | None) -> Path:
    from safetensors.torch import save_file

    from llamaship.export.llama.load import load_spec
    from llamaship.export.llama.load_hf import hf_name

    _, hf_dir, tok = MODELS[model]
    dest.mkdir(parents=True)
    cfg = json.loads((CONFIGS / hf_dir / "config.json").read_text())
    if layers:
        cfg["num_hidden_layers"] = layers
    (dest / "config.json").write_text(json.dumps(cfg))
    shutil.copyfile(tok, dest / "tokenizer.model")
    spec = load_spec(dest / "config.json")
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    names: list[str] = []

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(dest / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        names.append(name)
        shard.clear()

    size = 0
    for name, tensor in random_state(spec):
        if spec.tied_embeddings and name == "output.weight":
            continue
        shard[hf_name(name)] = tensor
        size += tensor.numel() * 2
        if size >= SHARD_BYTES:
            flush()
            size = 0
    if shard:
        flush()
    total = len(names)
    renamed = {}
    for i, old in enumerate(names, 1):  # the real naming: model-0000i-of-0000n
        new = f"model-{i:05d}-of-{total:05d}.safetensors"
        (dest / old).rename(dest / new)
        renamed[old] = new
    index = {"metadata": {"total_size": sum((dest / n).stat().st_size for n in renamed.values())},
             "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return dest


def rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("RssAnon")), 0)
    except OSError:
        return 0


def tree_anon_kb(root: int) -> int:
    """RssAnon of a process and all its descendants: the ONNX route runs the builder as a child."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parents.items() if pp == frontier[-1]]
        frontier.pop()
        tree.update(kids)
        frontier.extend(kids)
    return sum(rss_anon_kb(p) for p in tree)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


FORMAT_NAMES = {"executorch": ".pte 8da4w, emb4, head8", "onnx": "ONNX w4, emb4, head8",
                "coreml": ".mlpackage int4 asym, emb4, head8", "executorch_coreml": "Core ML delegate .pte",
                "qnn": "NPU w4a16 LPBQ, prefill + decode parts", "reference": "validate: fp32 reference, streamed"}


def _gib(row: dict, key: str) -> str:  # type: ignore[type-arg]
    return f"{row[key]:.1f} GiB" if row.get(key) else ""


def table(rows: list[dict]) -> str:  # type: ignore[type-arg]
    """The README's markdown rows: the newest run per (model, layers, layout, format, group)."""
    newest = {(r["model"], r["layers"], r["layout"], r["format"], r["group_size"], r.get("stage", "export")): r
              for r in rows}
    lines = []
    for (model, layers, layout, fmt, group, stage), r in sorted(newest.items(), key=lambda kv: str(kv[0])):
        name = MODELS_PRETTY.get(model, model) + (f", {layers}-layer slice" if layers else "")
        name += ", Meta `consolidated.00.pth`" if layout == "meta" else ""
        name += f", `--quant-algo {r['quant_algo']}`" if r.get("quant_algo") else ""
        if fmt == "executorch" and stage == "export" and "smoke_tokens" not in r:  # rows from before this field
            name += " (run before XNNPACK blobs were spilled to files)"
        done = f"{r['wall_s'] / 60:.1f} min" if r["exit"] == 0 else f"failed (exit {r['exit']})"
        if stage == "validate" and r["exit"] == 7:  # ran through; random weights fail the accuracy gates
            done = f"{r['wall_s'] / 60:.1f} min ({r['s_per_token']} s per scored-slice token)"
        if stage == "selfcheck" and r["exit"] == 0:
            own, codes = r["artifact_vs_own_fake_quant"], r["own_fake_quant_vs_fp32"]
            done = (f"{r['wall_s'] / 60:.1f} min: KLD {own['mean_kld']:.4f}, top-1 {own['top1_agreement']:.0%} "
                    f"vs its own codes' fake-quant model (which is KLD {codes['mean_kld']:.4f} from fp32)")
        if stage == "npu_build" and r["exit"] == 0:
            peaks = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_peak_anon_gib"].items())
            done = (f"{r['wall_s'] / 60:.1f} min, context {r['max_context']}, {len(r['parts'])} parts "
                    f"({r['compiled_parts']} compiled); peak GiB per stage: {peaks}")
            r = r | {"artifact_gb": sum(b["context_binary"] for b in r["part_bytes"]) / 1e9}
        size = f"{r['artifact_gb']:.2f} GB" if r["exit"] == 0 and "artifact_gb" in r else ""
        what = FORMAT_NAMES[fmt] + {"validate": ", validate", "selfcheck": ", own fake-quant check",
                                    "npu_build": ", streamed build"}.get(stage, "") + \
            (f", {r['eval_tokens']} tokens" if "eval_tokens" in r else "")
        fit = f"{r['fit_weights_gb']:.2f} GB" if "fit_weights_gb" in r else ""
        lines.append(f"| {name} | {what} | {group or ''} | {done} | {_gib(r, 'peak_anon_gib')} "
                     f"| {_gib(r, 'peak_rss_gib')} | {size} | {fit} |")
    return "\n".join(lines)


MODELS_PRETTY = {"llama2-7b": "Llama 2 7B", "llama3-8b": "Llama 3 8B", "llama3.1-8b": "Llama 3.1 8B"}


def reference_child(ckpt: str, tokens: int) -> None:
    """The streamed fp32 reference validation computes (one block at a time over every window),
    on the first `tokens` of WikiText-2 test, into a fresh cache folder."""
    import tempfile

    os.environ["LLAMASHIP_CACHE"] = tempfile.mkdtemp(prefix="llamaship-fullsize-ref-")
    from llamaship.export.llama.load import load_checkpoint
    from llamaship.targets import accuracy
    from llamaship.targets.reference import streamed_logprobs

    c = load_checkpoint(ckpt, progress=print)
    ref = streamed_logprobs(c.spec, c.state, accuracy.make_slice(c.tokenizer, tokens, 512), c.sha256(), print)
    print(json.dumps({"shape": list(ref.shape), "finite": bool(np.isfinite(np.asarray(ref[:, :8])).all())}))
    shutil.rmtree(os.environ["LLAMASHIP_CACHE"], ignore_errors=True)


STAGE_OF = (("quantize", "quantize_stage"), ("qnn: units", "units"), ("qnn: part", "join"),
            ("qnn: compiling", "compile"))  # progress message prefix -> the stage whose memory it starts


def npu_child(ckpt: str, out: str, ctx: int, compile_parts: int, quant_algo: str, dest: str) -> None:
    """The NPU export of an 8B model (with only its first `compile_parts` parts compiled when not 0):
    every unit is calibrated and quantized and every part joined: the streamed build whose memory
    is the point. A thread samples the anonymous memory of this process and its children (the
    compile runs in one) twice a second and keeps the peak of each stage."""
    import threading

    from llamaship.export.llama.load import load_checkpoint
    from llamaship.export.qnn import export_qnn
    from llamaship.quantize.scheme import QuantScheme
    from llamaship.quantize.stage import quantize_checkpoint

    stage, peaks, done = ["load"], {}, threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peaks[stage[0]] = max(peaks.get(stage[0], 0), tree_anon_kb(os.getpid()))

    def progress(msg: str) -> None:
        print(msg, flush=True)
        stage[0] = next((name for prefix, name in STAGE_OF if msg.startswith(prefix)), stage[0])

    threading.Thread(target=sample, daemon=True).start()
    c = load_checkpoint(ckpt, progress=print)
    scheme = QuantScheme(algorithm=quant_algo)
    t = time.perf_counter()
    quantized = quantize_checkpoint(c.spec, c.state, c.tokenizer, scheme, Path(out) / "quant", progress)
    stage_s = time.perf_counter() - t
    res = export_qnn(c.spec, c.state, c.tokenizer, scheme, Path(out) / "qnn", max_context=ctx,
                     soc_model="SM8650", progress=progress, quantized=quantized, compile_parts=compile_parts or None)
    done.set()
    cfg = res["config"]
    Path(dest).write_text(json.dumps({
        "stages_s": {"quantize_stage": round(stage_s, 1)} | {k: round(v, 1) for k, v in res["timings"].items()},
        "stage_peak_anon_gib": {k: round(v / 1024**2, 2) for k, v in peaks.items()},
        "parts": [p["layers"] for p in cfg["parts"] + cfg.get("parts_not_compiled", [])],
        "compiled_parts": len(cfg["parts"]), "part_bytes": [p["bytes"] for p in cfg["parts"]],
        "qnn_sdk_version": cfg["qnn_sdk_version"]}))


def selfcheck_child(bundle: str, ckpt: str, tokens: int, dest: str) -> None:
    """The artifact against its own fake-quant reference: the bundle's quantize stage run again
    (rtn and hqq are deterministic; calibrated algorithms read the same validation text) and its
    dequantized weights streamed through validation's fp32 reference code, on one window of the
    first `tokens` of WikiText-2 test. Random weights make the fp32 figures meaningless, but an
    artifact whose packing or runtime is wrong lands far from the model its codes define; one
    that is right differs from it only by its runtime's arithmetic (fp16, int8 activations), far
    less than the codes differ from fp32. Writes the figures to `dest` as JSON."""
    import contextlib
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="llamaship-fullsize-check-"))
    os.environ["LLAMASHIP_CACHE"] = str(work)
    from llamaship import backends
    from llamaship.export.llama.load import load_checkpoint
    from llamaship.quantize.stage import stage_output
    from llamaship.targets import accuracy
    from llamaship.targets.reference import streamed_logprobs
    from llamaship.targets.validate import Scoring, scheme_from_manifest

    folder = Path(bundle)
    manifest = json.loads((folder / "manifest.json").read_text())
    (art,) = manifest["artifacts"]
    scheme = scheme_from_manifest(manifest["quant"])
    assert scheme is not None, f"{bundle}: an fp32 bundle has no fake-quant reference of its own"
    c = load_checkpoint(ckpt, progress=print)
    eval_slice = accuracy.make_slice(c.tokenizer, tokens, tokens)
    try:
        with contextlib.ExitStack() as stack:
            codes = stack.enter_context(stage_output(c.spec, c.state, scheme, None, work, print, c.tokenizer))
            own = streamed_logprobs(c.spec, codes.state(c.state), eval_slice, c.sha256() + "|fake-quant", print)
        fp32 = streamed_logprobs(c.spec, c.state, eval_slice, c.sha256(), print)
        s = eval_slice.first_scored

        def replay(tokens: list[int], pos: int) -> torch.Tensor:  # the fake-quant model, as if an artifact
            return torch.from_numpy(np.array(own[0, max(pos - s, 0)], dtype=np.float32))

        backend = backends.get(art["format"])
        out = {"slice": eval_slice.describe(),
               "own_fake_quant_vs_fp32": accuracy.evaluate_stepwise(replay, eval_slice, fp32, print).to_json()}
        for name, ref in (("artifact_vs_own_fake_quant", own), ("artifact_vs_fp32", fp32)):
            out[name] = backend.accuracy(Scoring(c, folder, manifest, [], eval_slice, ref, print), art)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(dest).write_text(json.dumps(out))


def sampled(cmd: list[str]) -> tuple[int, float, int]:
    """Run `cmd`, sampling the anonymous memory of it and its children each second: (exit code,
    wall seconds, peak KiB)."""
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd)
    anon_peak = 0
    while proc.poll() is None:  # anonymous memory (no swap here), of the process and its children
        anon_peak = max(anon_peak, tree_anon_kb(proc.pid))
        time.sleep(1)
    return proc.returncode, time.perf_counter() - t, anon_peak


def validate_row(export_row: dict, bundle: Path, ckpt: Path, tokens: int) -> dict:  # type: ignore[type-arg]
    """`llamaship validate` of the exported bundle on `tokens` of WikiText-2 test (its accuracy
    figures are meaningless with random weights; the point is time and memory, and that the
    artifact runs through its runtime against the streamed fp32 reference)."""
    cmd = [sys.executable, "-m", "llamaship.cli", "validate", str(bundle), "--model", str(ckpt),
           "--eval-tokens", str(tokens),
           "--profile", "apple" if export_row["format"] in ("coreml", "executorch_coreml") else "x86_emulator"]
    code, wall, anon_peak = sampled(cmd)
    row = {k: export_row[k] for k in ("model", "layers", "layout", "format", "group_size")}
    row |= {"stage": "validate", "exit": code, "wall_s": round(wall, 1), "eval_tokens": tokens,
            "peak_anon_gib": round(anon_peak / 1024**2, 2), "host": export_row["host"]}
    report = bundle / "report.json"
    if report.exists():
        art = json.loads(report.read_text())["artifacts"][0]
        row["accuracy_s"] = (art.get("accuracy") or {}).get("eval_seconds")
        row["s_per_token"] = round(row["accuracy_s"] / tokens, 3) if row["accuracy_s"] else None
    print(json.dumps(row), flush=True)
    return row


def selfcheck_row(export_row: dict, bundle: Path, ckpt: Path, tokens: int) -> dict:  # type: ignore[type-arg]
    """`selfcheck_child` in a child process, with its time and sampled peak anonymous memory."""
    dest = bundle.with_name(bundle.name + "-selfcheck.json")
    dest.unlink(missing_ok=True)
    code, wall, anon_peak = sampled([sys.executable, __file__, "--child-selfcheck", str(bundle), str(ckpt),
                                     str(tokens), str(dest)])
    row = {k: export_row[k] for k in ("model", "layers", "layout", "format", "group_size")}
    row |= {"stage": "selfcheck", "exit": code, "wall_s": round(wall, 1), "eval_tokens": tokens,
            "peak_anon_gib": round(anon_peak / 1024**2, 2), "host": export_row["host"]}
    if code == 0:
        row |= json.loads(dest.read_text())
        dest.unlink()
    print(json.dumps(row), flush=True)
    return row


def npu_row(args: argparse.Namespace, ckpt: Path, out: Path) -> dict:  # type: ignore[type-arg]
    """`npu_child` with its wall time, its sampled peak anonymous memory, and each stage's."""
    shutil.rmtree(out, ignore_errors=True)
    dest = out.with_name(out.name + ".json")
    dest.unlink(missing_ok=True)
    algo = args.quant_algo or "rtn"
    code, wall, anon_peak = sampled([sys.executable, __file__, "--child-npu", str(ckpt), str(out),
                                     str(args.max_context), str(args.npu), algo, str(dest)])
    row = {"model": args.model, "layers": args.layers, "layout": args.layout, "format": "qnn", "group_size": 32,
           "stage": "npu_build", "exit": code, "wall_s": round(wall, 1), "quant_algo": algo,
           "max_context": args.max_context, "peak_anon_gib": round(anon_peak / 1024**2, 2),
           "host": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    if code == 0:
        row |= json.loads(dest.read_text())
        row["source_gb"] = round(folder_bytes(out / "qnn" / "source") / 1e9, 3)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def export_row(args: argparse.Namespace, ckpt: Path, bundle: Path, fmt: str, group: int) -> dict:  # type: ignore[type-arg]
    """`llamaship export` of one format and group size, with its wall time and sampled memory."""
    shutil.rmtree(bundle, ignore_errors=True)
    fit = json.loads(subprocess.run(
        [sys.executable, "-m", "llamaship.cli", "fit", "--model", str(ckpt), "--group-size", str(group),
         "--profile", "qualcomm", "--context", str(args.max_context), "--json"],
        capture_output=True, text=True, check=False).stdout.splitlines()[0])
    cmd = [sys.executable, "-m", "llamaship.cli", "export", "--model", str(ckpt), "--out", str(bundle),
           "--format", fmt, "--group-size", str(group), "--max-context", str(args.max_context),
           "--no-validate", "--ignore-fit", "--prompt", "The capital of France is",
           "--smoke-tokens", str(SMOKE_TOKENS.get(fmt, 32)),
           *(["--quant-algo", args.quant_algo] if args.quant_algo else [])]
    code, wall, anon_peak = sampled(cmd)
    row = {"model": args.model, "layers": args.layers, "layout": args.layout, "format": fmt,
           "group_size": group, "exit": code, "wall_s": round(wall, 1), "quant_algo": args.quant_algo,
           "smoke_tokens": SMOKE_TOKENS.get(fmt, 32),
           "peak_anon_gib": round(anon_peak / 1024**2, 2),
           "fit_weights_gb": round(fit["weight_bytes"] / 1e9, 2),
           "fit": fit, "host": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    if code == 0:
        manifest = json.loads((bundle / "manifest.json").read_text())
        (art,) = manifest["artifacts"]
        path = bundle / (art.get("folder") or art["path"])
        row |= {"artifact_gb": round(folder_bytes(path) / 1e9, 3), "stages_s": manifest["export"]["stages_s"],
                "peak_rss_gib": round(manifest["export"]["peak_rss_mb"] / 1024, 2),
                "smoke_text": (art.get("smoke_test") or {}).get("text"),
                "zero_points_dropped": (art.get("quantization") or {}).get("zero_points_dropped")}
        if fmt == "qnn":  # what the phone loads, per part, and how the smoke test's calls went
            row |= {"artifact_gb": round(sum((bundle / f).stat().st_size for f in art["device_files"]) / 1e9, 3),
                    "source_gb": round(sum((bundle / f).stat().st_size for f in art["source_files"]) / 1e9, 3),
                    "parts": art["parts"], "part_bytes": art["part_bytes"],
                    "qnn_sdk_version": art["qnn_sdk_version"], "smoke_calls": (art.get("smoke_test") or {}).get(
                        "stats", {}).get("graph_calls")}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    if sys.argv[1:2] == ["--child-reference"]:
        reference_child(sys.argv[2], int(sys.argv[3]))
        return 0
    if sys.argv[1:2] == ["--child-npu"]:
        npu_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7])
        return 0
    if sys.argv[1:2] == ["--child-selfcheck"]:
        selfcheck_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="store_true", help="print the results as the README's markdown rows")
    ap.add_argument("--model", choices=list(MODELS), default="llama3-8b")
    ap.add_argument("--layout", choices=["meta", "hf"], default="meta")
    ap.add_argument("--format", action="append", choices=["executorch", "onnx", "coreml", "executorch_coreml", "qnn"],
                    help="formats to export, one run each (default: executorch)")
    ap.add_argument("--group-size", action="append", type=int, choices=[32, 64, 128, 256],
                    help="repeatable (default: 32)")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (a slice)")
    ap.add_argument("--quant-algo", default=None, help="the quantize stage's algorithm (default: the CLI's)")
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--validate-tokens", type=int, default=0,
                    help="after each export, `llamaship validate` the bundle on this many tokens (needs --keep "
                    "semantics internally: the bundle is removed afterwards unless --keep)")
    ap.add_argument("--reference-tokens", type=int, default=0,
                    help="measure validation's streamed fp32 reference on this many WikiText-2 test tokens "
                    "(windows of 512) instead of, or before, the --format exports")
    ap.add_argument("--check-tokens", type=int, default=0,
                    help="after each export, score the artifact on one window of this many WikiText-2 test tokens "
                    "against its own fake-quant reference (the quantize stage run again, dequantized) and fp32")
    ap.add_argument("--existing", action="store_true",
                    help="reuse a bundle kept by an earlier --keep run instead of exporting it again")
    ap.add_argument("--npu", type=int, default=-1, metavar="N",
                    help="the NPU build of the model, with each stage's peak memory; N > 0 compiles only the first "
                         "N parts (all are quantized and joined), 0 compiles them all")
    ap.add_argument("--work", default="/tmp/llamaship-fullsize", help="where checkpoints and bundles go")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and bundles")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fullsize.json"))
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())["rows"]))
        return 0
    work = Path(args.work)
    name = f"{args.model}{f'-{args.layers}l' if args.layers else ''}-{args.layout}"
    ckpt = work / name
    if not ckpt.exists():
        t = time.perf_counter()
        print(f"writing a random-weight {args.layout} checkpoint for {args.model} at {ckpt}", flush=True)
        (write_meta if args.layout == "meta" else write_hf)(args.model, ckpt, args.layers)
        print(f"  {folder_bytes(ckpt) / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    if args.reference_tokens:
        code, wall, anon_peak = sampled([sys.executable, __file__, "--child-reference", str(ckpt),
                                         str(args.reference_tokens)])
        rows.append({"model": args.model, "layers": args.layers, "layout": args.layout, "format": "reference",
                     "group_size": None, "exit": code, "wall_s": round(wall, 1),
                     "eval_tokens": args.reference_tokens, "peak_anon_gib": round(anon_peak / 1024**2, 2),
                     "host": {"cpus": os.cpu_count(), "torch": torch.__version__}})
        print(json.dumps(rows[-1]), flush=True)
    if args.npu >= 0:
        rows.append(npu_row(args, ckpt, work / f"{name}-npu"))
    for fmt in ([] if (args.reference_tokens or args.npu >= 0) and not args.format
                else args.format or ["executorch"]):
        for group in args.group_size or [32]:
            bundle = work / f"{name}-{fmt}-g{group}"
            if args.existing and (bundle / "manifest.json").exists():
                row = {"model": args.model, "layers": args.layers, "layout": args.layout, "format": fmt,
                       "group_size": group, "exit": 0, "host": {"cpus": os.cpu_count(), "torch": torch.__version__}}
            else:
                row = export_row(args, ckpt, bundle, fmt, group)
                rows.append(row)
            code = row["exit"]
            if code == 0 and args.validate_tokens:
                rows.append(validate_row(row, bundle, ckpt, args.validate_tokens))
            if code == 0 and args.check_tokens:
                rows.append(selfcheck_row(row, bundle, ckpt, args.check_tokens))
            if not args.keep:
                shutil.rmtree(bundle, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    out = Path(args.out)
    old = json.loads(out.read_text())["rows"] if out.exists() else []
    out.write_text(json.dumps({"rows": old + rows}, indent=1) + "\n")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
