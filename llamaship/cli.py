"""`llamaship` command line: a thin layer over llamaship.pipeline / bundle / targets.

Exit codes: 0 success; 1 internal error (a llamaship bug: rerun with --debug for the traceback and
report it); 2 bad checkpoint or missing evaluation/calibration text; 3 unsupported request; 4 bundle
invalid, or output exists or may not be replaced; 5 export failed; 6 runtime failed; 7 a validation
gate failed (the bundle and its report are written); 8 `profile --hub`: an AI Hub job failed or
timed out (the other devices' reports are written); 64 usage error (a flag or value the command
does not take); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). Nothing is left half-written
on 1, 2-6, 130 or 143.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from llamaship import __version__, backends
from llamaship.errors import LlamashipError
from llamaship.progress import Reporter
from llamaship.quiet import quiet_library_warnings

EXIT_CODES = __doc__.split("Exit codes:", 1)[1].strip()
EVAL_MIN, EVAL_MAX = 256, 262_144  # two windows at least; the WikiText-2 test text holds about 300k tokens


USAGE_EXIT = 64  # sysexits' EX_USAGE: not 2, which means "bad checkpoint" here
_INTERRUPTED = 0  # the signal number that stopped us, once one did


def _on_signal(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: raise KeyboardInterrupt as Python does for Ctrl-C, and remember it. Some
    library code (import fallbacks in the torch stack) catches BaseException; a test once saw an
    export carry on to exit 0 after SIGINT. Every progress line re-raises a remembered interrupt."""
    global _INTERRUPTED
    _INTERRUPTED = signum
    raise KeyboardInterrupt


def _check_interrupt() -> None:
    if _INTERRUPTED:
        raise KeyboardInterrupt


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message}\n")


def _number_in(kind: type, lo: float, hi: float) -> Callable[[str], Any]:
    """An argparse type: an int or float in [lo, hi], so that -1 or 0 cannot mean 'the whole
    corpus' and NaN is refused."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not lo <= value <= hi:  # NaN fails this too
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {lo}..{hi}")
        return value
    parse.__name__ = "integer" if kind is int else "number"
    return parse


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    return _number_in(int, lo, hi)


def _float_in(lo: float, hi: float) -> Callable[[str], float]:
    return _number_in(float, lo, hi)


def _text(text: str) -> str:
    """Text a tokenizer will see: argv that is not valid UTF-8 arrives with surrogate escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8 text") from None
    if "\x00" in text:
        raise argparse.ArgumentTypeError("holds a NUL character")
    return text


def _reporter() -> Reporter:
    """Progress on stderr: timestamped lines, plus a live heartbeat / bar with ETA on a terminal."""
    return Reporter(sys.stderr, check=_check_interrupt)


def cmd_export(args: argparse.Namespace) -> int:
    from llamaship.pipeline import export_bundle
    from llamaship.quantize.scheme import QuantScheme

    if not args.out.strip():
        from llamaship.errors import BundleError

        raise BundleError("--out is empty; name the bundle folder to create, e.g. --out bundles/my-model")
    scheme = None
    if args.quant != "fp32":
        scheme = QuantScheme(
            bits=4 if args.quant == "8da4w" else 8,
            group_size=args.group_size,
            symmetric=not args.asymmetric,
            embedding_bits=args.embedding_bits,
            lm_head_bits=args.lm_head_bits,
            algorithm=args.quant_algo,
            calibration_tokens=args.calibration_tokens,
        )
    with _reporter() as progress:
        manifest = export_bundle(
            args.model,
            Path(args.out),
            scheme=scheme,
            formats=tuple(args.format) if args.format else None,
            max_context=args.max_context,
            max_seq_len=args.max_seq_len,
            force=args.force,
            smoke_prompt=None if args.no_smoke else args.prompt,
            smoke_tokens=args.smoke_tokens,
            targets=tuple(args.target or ["x86_emulator"]),
            validate=not args.no_validate,
            eval_tokens=args.eval_tokens,
            ignore_fit=args.ignore_fit,
            progress=progress,
            **backend_options(args),
        )
    from llamaship.bundle import bundle_digest

    files = manifest["files"]
    size = sum(f["size"] for f in files.values())
    print(f"bundle written: {args.out} ({len(files)} files, {size / 1e6:.1f} MB)")
    print(f"bundle digest: sha256:{bundle_digest(Path(args.out))} (keep it; `llamaship verify --digest` checks it)")
    for name, entry in files.items():
        print(f"  {name:24s} {entry['size'] / 1e6:9.1f} MB  sha256 {entry['sha256'][:16]}…")
    print(f"export: {manifest['export']['seconds']} s, peak RSS {manifest['export']['peak_rss_mb']} MB")
    for art in manifest["artifacts"]:
        smoke = art.get("smoke_test")
        if not smoke:
            continue
        if "skipped" in smoke:
            print(f"smoke test of {art['path']} not run: {smoke['skipped']}")
            continue
        st = smoke["stats"]
        print(f"smoke test ({smoke['runtime']}): {smoke['prompt']!r} -> {smoke['text']!r}")
        if "note" in st:  # the NPU graph on the HTP simulator
            print(f"  TTFT {st['ttft_ms'] / 1000:.1f} s, {st['generated_tokens']} tokens ({st['note']})")
            continue
        print(
            f"  prefill {st.get('prefill_token_per_sec', 0):.1f} tok/s, "
            f"decode {st.get('decode_token_per_sec', 0):.1f} tok/s "
            f"({st.get('prompt_tokens')} prompt / {st.get('generated_tokens')} generated tokens)"
        )
    validation = manifest.get("validation")
    if validation:
        print_validation(Path(args.out))
        return 0 if validation["passed"] else 7
    return 0


def print_validation(bundle: Path) -> None:
    report = json.loads((bundle / "report.json").read_text())
    print(f"validation ({report['slice']}), fp32 reference PPL {report['reference']['ppl']:.3f}:")
    for a in report["artifacts"]:
        acc, sp = a["accuracy"], a.get("speed")
        speed = (f"; prefill {sp['prefill_tok_s']['median']:.1f} tok/s, decode "
                 f"{sp['decode_tok_s']['median']:.1f} tok/s, TTFT {sp['ttft_ms']['median']:.0f} ms, "
                 f"peak RSS {sp['peak_rss_mb']:.0f} MB" if sp else "")
        own = ""
        if acc.get("slice") and acc["slice"] != report["slice"]:
            cpu = acc.get("cpu_artifact")
            own = f" on its own slice ({acc['slice']})" + (
                f"; {cpu['path']} there: KLD {cpu['mean_kld']:.4f}, top-1 {cpu['top1_agreement']:.3f}" if cpu else "")
        print(f"  {a['path']} [{a['scheme']}]: PPL {acc['ppl']:.3f} (x{acc['ppl_ratio']:.3f}), "
              f"KLD {acc['mean_kld']:.4f}, top-1 {acc['top1_agreement']:.3f}{speed}{own}")
    for t in report["targets"]:
        failed = [g for g in t["gates"] if not g["passed"]]
        verdict = "PASS" if not failed else "FAIL: " + ", ".join(
            f"{g['gate']} {g['value']} vs limit {g['limit']}" + (f" (by {g['by']:+})" if g["by"] is not None else "")
            for g in failed)
        print(f"  target {t['profile']}, {t['artifact']} ({t['speed_source']}; ceiling "
              f"{t['fit']['decode_ceiling_tok_s']:.1f} tok/s): {verdict}")
    print(f"  report: {bundle / 'report.md'}")


def cmd_validate(args: argparse.Namespace) -> int:
    from llamaship.bundle import read_manifest, updating, write_manifest
    from llamaship.errors import BundleError
    from llamaship.export.llama.load import load_checkpoint
    from llamaship.pipeline import run_validation
    from llamaship.targets.profile import load_profile

    bundle = Path(args.bundle)
    _verified(bundle)
    manifest = read_manifest(bundle)
    profiles = [load_profile(p) for p in args.profile or ["x86_emulator"]]
    source = args.model or manifest.get("model", {}).get("source")
    if not isinstance(source, str) or not source:
        raise BundleError(f"{bundle}: the manifest does not name its source checkpoint; pass --model")
    with _reporter() as progress, updating(bundle) as staged:  # a failure leaves the bundle as it was
        ckpt = load_checkpoint(source, progress=progress)
        if ckpt.sha256() != manifest["model"].get("source_sha256"):
            raise BundleError(f"{source}: not the checkpoint this bundle was exported from (sha256 differs)")
        meta = {k: v for k, v in manifest.items() if k not in ("files", "schema_version")}
        meta["validation"] = run_validation(ckpt, staged, meta, profiles, args.eval_tokens, progress)
        write_manifest(staged, meta)
    print_validation(bundle)
    return 0 if meta["validation"]["passed"] else 7


def _verified(bundle: Path, hashes: bool = True) -> None:
    """Every command that uses a bundle checks it first: paths, the manifest's digest and (unless
    `hashes` is off) every file's sha256."""
    from llamaship.bundle import verify_bundle
    from llamaship.errors import BundleError

    problems = verify_bundle(bundle, hashes=hashes)
    if problems:
        raise BundleError(f"{bundle}: refusing to use a damaged or altered bundle ({'; '.join(problems[:3])}); "
                          "re-export or re-copy it (`llamaship verify` lists every problem)")


def cmd_fit(args: argparse.Namespace) -> int:
    from llamaship.export.llama.load import load_spec
    from llamaship.export.llama.presets import PRESETS
    from llamaship.pipeline import default_model
    from llamaship.quantize.scheme import QuantScheme
    from llamaship.targets.fit import predict_fit
    from llamaship.targets.fit_report import matrix_table, plot_matrix
    from llamaship.targets.profile import BUILTIN, load_profile

    if args.list:
        for p in PRESETS.values():
            spec = p.spec()
            print(f"{p.key:14s} {p.title:14s} {spec.param_count() / 1e9:5.2f}B params, {spec.n_layers} layers, "
                  f"context {spec.max_context}; also: {', '.join(p.hub_ids)}")
        return 0
    models = list(PRESETS) if args.all else (args.model or [str(default_model())])
    profiles = [load_profile(name) for name in (args.profile or list(BUILTIN))]
    if args.all:
        schemes: list[QuantScheme | None] = [QuantScheme(group_size=g, lm_head_bits=h)
                                             for g in (32, 128) for h in (8, 4)]
    else:
        schemes = [None if args.quant == "fp32" else QuantScheme(bits=4 if args.quant == "8da4w" else 8,
                                                                  group_size=args.group_size,
                                                                  lm_head_bits=args.lm_head_bits)]
    fits = [predict_fit(spec, scheme, profile, context=args.context)
            for spec in (load_spec(m) for m in models) for profile in profiles for scheme in schemes]
    if args.json:
        for f in fits:
            print(json.dumps(f.to_json()))
    elif len(fits) == 1:
        f = fits[0]
        print(f.summary())
        print("predicted file size: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in f.sizes_bytes.items()))
    else:
        print(matrix_table(fits))
    if args.plot:
        plot_matrix(fits, Path(args.plot))
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0 if args.all or all(f.fits for f in fits) else 3


def cmd_generate(args: argparse.Namespace) -> int:
    from llamaship.bundle import read_manifest
    from llamaship.errors import BundleError
    from llamaship.generation import artifact_entry, generate

    bundle = Path(args.bundle)
    _verified(bundle, hashes=not args.no_verify)
    manifest = read_manifest(bundle)
    art = artifact_entry(manifest, args.format)
    tok = manifest.get("tokenizer") or {}
    prompt = args.prompt
    if args.chat:
        from llamaship.chat import ChatTemplateError
        from llamaship.export.llama.tokenizer import render_chat

        try:
            prompt = render_chat(tok.get("chat_template"), [{"role": "user", "content": prompt}],
                                 str(tok.get("bos_token") or ""), str(tok.get("eos_token") or ""))
        except ChatTemplateError as exc:
            raise BundleError(f"{bundle / 'manifest.json'}: {exc}; run without --chat") from exc
    stop_texts = set(tok.get("stop_tokens") or [])

    def show(piece: str) -> None:  # the runner passes the stop token itself through: hide it
        if piece not in stop_texts:
            print(piece, end="", flush=True)

    gen = generate(bundle, manifest, art["format"], prompt, args.max_new_tokens, args.temperature, on_text=show)
    print()
    summary = {"format": art["format"], **gen.summary()}
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"[{summary['prompt_tokens']} prompt tokens, {summary['generated_tokens']} generated; "
            f"TTFT {summary['ttft_ms']:.0f} ms, prefill {summary['prefill_tok_s']:.1f} tok/s, "
            f"decode {summary['decode_tok_s']:.1f} tok/s; {gen.runtime}]",
            file=sys.stderr,
        )
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from llamaship.errors import UnsupportedError
    from llamaship.profiling.adb import Adb
    from llamaship.profiling.run import profile_bundle
    from llamaship.targets.report import write_report

    if args.hub:
        return cmd_profile_hub(args)
    _verified(Path(args.bundle))
    if len(args.device or []) != 1 or not args.runner or args.device_attr or args.hub_format:
        raise UnsupportedError("over adb, give one --device SERIAL and --runner (--device-attr and --hub-format "
                               "are for --hub)")
    device = args.device[0]
    runner = Path(args.runner)
    if not runner.is_file():
        raise UnsupportedError(f"{runner}: llama_main not found; build it for the phone (ExecuTorch's "
                               "examples/models/llama, Android ABI arm64-v8a) and pass its path with --runner")
    with _reporter() as progress:
        report = profile_bundle(Path(args.bundle), Adb(device, adb=args.adb), runner, runs=args.runs,
                                warmup=args.warmup, threads=args.threads, gen_tokens=args.gen_tokens,
                                push=not args.no_push, progress=progress)
    out = Path(args.out or f"profile-{device}")
    out.mkdir(parents=True, exist_ok=True)
    fit = _predicted_for(Path(args.bundle), args.profile)
    report["prediction"] = {"profile": args.profile, **fit.to_json()}
    write_report(report, out)
    sp = report["artifacts"][0]["speed"]
    print(f"{report['device']['model']}: prefill {sp['prefill_tok_s']['median']:.1f} tok/s, decode "
          f"{sp['decode_tok_s']['median']:.1f} tok/s measured vs a {fit.decode_ceiling_tok_s:.1f} tok/s roofline "
          f"ceiling predicted for the {args.profile} profile, TTFT {sp['ttft_ms']['median']:.0f} ms "
          f"(median of {sp['runs']}); report: {out / 'report.md'}")
    return 0


def cmd_profile_hub(args: argparse.Namespace) -> int:
    """`profile --hub`: the bundle's NPU and ONNX artifacts on AI Hub's devices (profiling/hub.py)."""
    from llamaship.bundle import read_manifest, staged_output
    from llamaship.errors import BundleError, UnsupportedError
    from llamaship.export.llama.load import load_checkpoint
    from llamaship.profiling import hub
    from llamaship.targets import accuracy
    from llamaship.targets.report import write_report

    bundle = Path(args.bundle)
    _verified(bundle)
    if args.runner or args.no_push:
        raise UnsupportedError("--runner and --no-push are for adb; AI Hub runs the bundle's own artifacts")
    if not args.device and not args.device_attr:
        raise UnsupportedError("--hub needs --device NAME (repeatable) or --device-attr ATTRIBUTE (a family, e.g. "
                               "chipset:qualcomm-snapdragon-8gen3); `qai-hub list-devices` lists both")
    manifest = read_manifest(bundle)
    present = [a["format"] for a in manifest["artifacts"] if a["format"] in hub.FORMATS]
    formats = args.hub_format or present
    missing = [f for f in formats if f not in present]
    if not formats or missing:
        raise UnsupportedError(f"{bundle}: no {', '.join(missing or list(hub.FORMATS))} artifact to run on AI Hub "
                               "(export with --format qnn and/or --format onnx)")
    out = Path(args.out or "profile-hub")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (args.force and any(out.glob("*/*/job.json"))):
        raise UnsupportedError(f"{out}: exists and is not empty; pick another --out (--force replaces only an "
                               "earlier `profile --hub` output)")
    source = args.model or manifest.get("model", {}).get("source")
    print(f"note: {hub.NEEDS_NETWORK}", file=sys.stderr)
    with _reporter() as progress:
        client, redact = hub.make_client()
        devices = hub.resolve_devices(client, args.device or [], args.device_attr or [], redact)
        progress(f"AI Hub devices: {', '.join(d.name for d in devices)}")
        if not isinstance(source, str) or not source:
            raise BundleError(f"{bundle}: the manifest does not name its source checkpoint; pass --model")
        ckpt = load_checkpoint(source, progress=progress)
        if ckpt.sha256() != manifest["model"].get("source_sha256"):
            raise BundleError(f"{source}: not the checkpoint this bundle was exported from (sha256 differs)")
        window = list(accuracy.make_slice(ckpt.tokenizer, 512, 512).windows().__next__())
        jobs = hub.plan_jobs(bundle, manifest, devices, formats, window)
        hub.submit(client, bundle, manifest, jobs, redact, progress, options=args.hub_options)
        hub.collect(jobs, redact, progress, timeout_s=args.hub_timeout * 60)
        ref, why = hub.reference_logprobs(ckpt, window[: hub.PROMPT_TOKENS + 2])
        if why:
            progress(f"accuracy: {why}")
    prediction = {"profile": args.profile, **_predicted_for(bundle, args.profile).to_json()}
    slice_text = (f"the first {hub.PROMPT_TOKENS} (+1 decoded) tokens of WikiText-2 test, the first validation "
                  "window, replayed on each device")
    reports = hub.device_reports(bundle, manifest, jobs, ref, window, slice_text, prediction)
    with staged_output(out) as staged:
        for j in jobs:
            hub.save_recording(j, staged / hub.slug(j.device.name) / f"{j.fmt}-{j.kind}")
        for device, report in reports.items():
            write_report(report, staged / hub.slug(device))
    _print_hub_results(reports, slice_text, prediction)
    print(f"reports and the raw results: {out}/<device>/")
    return 0 if all(j.status == "done" for j in jobs) else 8


def _print_hub_results(reports: dict[str, Any], slice_text: str, prediction: dict[str, Any]) -> None:
    """Each device's figures next to the roofline prediction, or why it has none."""
    ceiling = prediction["decode_ceiling_tok_s"]
    print(f"AI Hub results ({slice_text}); predicted decode ceiling for the {prediction['profile']} profile: "
          f"{ceiling:.1f} tok/s (a roofline, not a measurement)")
    for device, report in reports.items():
        for a in report["artifacts"]:
            sp, acc = a.get("speed"), a.get("accuracy")
            if sp:
                figures = (f"prefill {sp['prefill_tok_s']['median']:.1f} tok/s, decode "
                           f"{sp['decode_tok_s']['median']:.1f} tok/s (predicted ceiling {ceiling:.1f}), TTFT "
                           f"{sp['ttft_ms']['median']:.0f} ms"
                           + (f", peak {sp['peak_rss_mb']:.0f} MB" if sp.get("peak_rss_mb") else "")
                           + (f", KLD {acc['mean_kld']:.4f}, top-1 {acc['top1_agreement']:.3f}" if acc else ""))
            else:
                figures = "; ".join(f"{j['kind']} {j['status']}: {j['message']}" for j in a["hub_jobs"])
            print(f"  {device}: {a['path']} ({a['format']}): {figures}")


def _predicted_for(bundle: Path, profile: str) -> Any:
    """`llamaship fit`'s prediction for the bundle's model and scheme on `profile`."""
    from llamaship.bundle import read_manifest
    from llamaship.export.llama.spec import ModelSpec
    from llamaship.targets.fit import predict_fit
    from llamaship.targets.profile import load_profile
    from llamaship.targets.validate import scheme_from_manifest

    manifest = read_manifest(bundle)
    spec = ModelSpec.from_json(manifest["model"]["spec"])
    return predict_fit(spec, scheme_from_manifest(manifest.get("quant", {})), load_profile(profile))


def cmd_verify(args: argparse.Namespace) -> int:
    from llamaship.bundle import bundle_digest, verify_bundle

    problems = verify_bundle(Path(args.bundle), digest=args.digest)
    if problems:
        for p in problems:
            print(f"FAIL {p}", file=sys.stderr)
        print(f"{args.bundle}: {len(problems)} problem(s); do not ship this bundle", file=sys.stderr)
        return 4
    pinned = "matches the digest you gave" if args.digest else "recorded in manifest.json.sha256"
    print(f"{args.bundle}: OK, every file matches its sha256; bundle digest sha256:{bundle_digest(Path(args.bundle))} "
          f"({pinned})")
    return 0


def _profile_formats() -> str:
    from llamaship.targets.profile import BUILTIN, load_profile

    return "; ".join(f"{name}: {' + '.join(load_profile(name).formats)}" for name in BUILTIN)


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """The values of the flags backends added (their dests), for ExportJob.options."""
    return {dest: getattr(args, dest) for dest in args.backend_options}


def build_parser() -> argparse.ArgumentParser:
    from llamaship.pipeline import SMOKE_PROMPT
    from llamaship.profiling.hub import FORMATS as HUB_FORMATS
    from llamaship.quantize import algorithms
    from llamaship.quantize.scheme import GROUP_SIZES, QuantScheme

    parser = _Parser(
        prog="llamaship",
        description="Export Llama checkpoints to validated on-device bundles.",
        epilog="exit codes: " + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llamaship {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the libraries' warnings and the runtimes' native log lines "
                        "(ExecuTorch's C++ runner, tokenizers), which are hidden by default; put it "
                        "before the command: llamaship --verbose export ...")
    parser.add_argument("--debug", action="store_true",
                        help="on an internal error, show the Python traceback (hidden by default: it is a "
                        "llamaship bug to report, not something to act on); put it before the command")
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("export", help="export a checkpoint into a device bundle",
                        description="Load a checkpoint, quantize, export, smoke-test on this host "
                        "with ExecuTorch's LLM runner, and write a bundle atomically.")
    ex.add_argument("--model", default=None,
                    help="HF folder (config.json + safetensors), Meta folder (params.json + "
                    "consolidated.00.pth), .gguf file, or Hub id; default: the embedded "
                    "SmolLM2-135M-Instruct GGUF")
    ex.add_argument("--out", required=True,
                    help="bundle folder to create (must not exist; with --force, an existing bundle or empty "
                    "folder is replaced, never the working folder, home, / or a folder holding the checkpoint)")
    ex.add_argument("--format", action="append", choices=backends.names(),
                    help="artifact format(s), repeatable: " + "; ".join(f"{b.name}: {b.help}" for b in
                                                                         backends.REGISTRY.values())
                    + "; default: every format the --target profiles list (" + _profile_formats() + ")")
    ex.add_argument("--quant", choices=["8da4w", "8da8w", "fp32"], default="8da4w",
                    help="linear layers: int8 dynamic activations x int4 (default) or int8 "
                    "weights per group, or fp32")
    ex.add_argument("--group-size", type=int, default=QuantScheme.group_size, choices=GROUP_SIZES,
                    help="weights per quantization group (default 32); must divide the model's "
                    "hidden and FFN sizes")
    ex.add_argument("--asymmetric", action="store_true",
                    help="asymmetric weight groups (scale + zero point); formats whose kernels cannot hold "
                    "them refuse it before any work, and say so")
    ex.add_argument("--quant-algo", choices=list(algorithms.REGISTRY), default=algorithms.DEFAULT,
                    help="how the quantize stage picks each matrix's codes, once for every format: "
                    + "; ".join(f"{a.name}: {a.help}" for a in algorithms.REGISTRY.values())
                    + f" (default {algorithms.DEFAULT}: measured best, README 'Quantization algorithms')")
    ex.add_argument("--calibration-tokens", type=_int_in(512, 1 << 20), default=QuantScheme.calibration_tokens,
                    help="WikiText-2 *validation* tokens the calibrated algorithms (gptq, awq) run through the "
                    f"model (default {QuantScheme.calibration_tokens}; the test split is never used)")
    ex.add_argument("--embedding-bits", type=int, default=4, choices=[0, 4, 8],
                    help="quantize the token embedding per group to 4 or 8 bits (0 keeps fp32)")
    ex.add_argument("--lm-head-bits", type=int, default=8, choices=[0, 4, 8],
                    help="output projection weights: 8 (default: it is the most error-sensitive "
                    "matrix), 4 (smaller, faster, less accurate) or 0 (fp32)")
    common = {a.dest for a in ex._actions}
    for backend in backends.REGISTRY.values():
        backend.add_options(ex)
    ex.set_defaults(backend_options=[a.dest for a in ex._actions if a.dest not in common])
    ex.add_argument("--max-context", type=_int_in(16, 1 << 20), default=2048,
                    help="KV cache length = longest prompt + generation (default 2048, capped at "
                    "the model's own)")
    ex.add_argument("--max-seq-len", type=_int_in(1, 8192), default=128,
                    help="most tokens per forward call (the runner prefills longer prompts in chunks "
                    "of this size); activation memory scales with it (default 128)")
    ex.add_argument("--prompt", type=_text, default=SMOKE_PROMPT, help=f"smoke-test prompt (default {SMOKE_PROMPT!r})")
    ex.add_argument("--no-smoke", action="store_true", help="skip the smoke generation")
    ex.add_argument("--smoke-tokens", type=_int_in(1, 4096), default=32, metavar="N",
                    help="tokens the smoke generation makes (default 32)")
    ex.add_argument("--force", action="store_true",
                    help="replace --out if it is an existing llamaship bundle or an empty folder")
    ex.add_argument("--target", action="append", metavar="PROFILE",
                    help="validate for this target: x86_emulator (default), qualcomm, apple, or a "
                    "profile .toml; repeatable")
    ex.add_argument("--no-validate", action="store_true",
                    help="skip accuracy/speed validation (no report in the bundle)")
    ex.add_argument("--eval-tokens", type=_int_in(EVAL_MIN, EVAL_MAX), default=4096,
                    help=f"WikiText-2 test tokens for the accuracy check during export, {EVAL_MIN}..{EVAL_MAX} "
                    "(default 4096; "
                    "`llamaship validate` uses the profile's 32768)")
    ex.add_argument("--ignore-fit", action="store_true",
                    help="export even when the predicted RAM exceeds a target's budget")
    ex.set_defaults(func=cmd_export)

    gen = sub.add_parser("generate", help="generate text from a bundle on this host",
                         description="Run the bundle's .pte with ExecuTorch's C++ LLM runner "
                         "(the code the Android app links), or its ONNX model with onnxruntime-genai, "
                         "and print the stats.")
    gen.add_argument("bundle", help="bundle folder")
    gen.add_argument("--prompt", required=True, type=_text, help="prompt text (UTF-8)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt in the model's chat template as a user turn")
    gen.add_argument("--max-new-tokens", type=_int_in(1, 1 << 16), default=64,
                     help="tokens to generate, 1..65536 (default 64; the artifact's context length caps it)")
    gen.add_argument("--temperature", type=_float_in(0.0, 10.0), default=0.0, help="0 = greedy (default), up to 10")
    gen.add_argument("--format", choices=backends.names(), default=None,
                     help="which artifact to run (default: the bundle's first), each on the runtime an app "
                     "would use, on this host: " + "; ".join(f"{b.name}: {b.runtime}" for b in
                                                              backends.REGISTRY.values()))
    gen.add_argument("--json", action="store_true", help="print stats as one JSON line")
    gen.add_argument("--no-verify", action="store_true",
                     help="skip re-checking every file's sha256 before loading (faster on multi-GB bundles); "
                     "paths, sizes and the manifest's digest are still checked")
    gen.set_defaults(func=cmd_generate)

    ver = sub.add_parser("verify", help="re-check every file of a bundle against its sha256",
                         description="Exit 0 when every file matches the manifest and the manifest "
                         "matches its digest; 4 otherwise (flipped byte, missing or extra file, unsafe path or "
                         "symlink, edited manifest, newer schema).")
    ver.add_argument("bundle", help="bundle folder")
    ver.add_argument("--digest", metavar="SHA256",
                     help="the bundle digest export printed (sha256:...); the check fails unless manifest.json "
                     "still hashes to it, which catches a manifest edited together with manifest.json.sha256")
    ver.set_defaults(func=cmd_verify)

    val = sub.add_parser("validate", help="measure a bundle's accuracy and speed for target profiles",
                         description="Accuracy (PPL, KLD, top-1, RMS dp vs the fp32 reference) on each "
                         "artifact's own runtime, speed, device fit and gates; writes report.json/md/png "
                         "into the bundle. Exit 7 when a gate fails.")
    val.add_argument("bundle", help="bundle folder")
    val.add_argument("--profile", action="append",
                     help="x86_emulator (default), qualcomm, apple, or a .toml file; repeatable")
    val.add_argument("--model", help="source checkpoint, if it moved since export (sha256 is checked)")
    val.add_argument("--eval-tokens", type=_int_in(EVAL_MIN, EVAL_MAX), default=None,
                     help=f"evaluation slice length, {EVAL_MIN}..{EVAL_MAX} (default: the profile's, 32768; "
                     "from 1B parameters up, the whole windows one artifact's validation fits in about 30 "
                     "minutes here, e.g. 6144 for a Llama 3 8B .pte, 1536 for its .mlpackage, and the report "
                     "says what 32768 would take)")
    val.set_defaults(func=cmd_validate)

    prof = sub.add_parser("profile", help="measure a bundle on real phones: one over adb, or many on Qualcomm AI Hub",
                          description="Over adb (default): push the bundle's .pte, tokenizer and your llama_main "
                          "build to /data/local/tmp/llama/, run warm-up + N greedy generations with pinned "
                          "threads, read the runner's PyTorchObserver stats, record device facts and thermal state "
                          "before/after. With --hub: upload the bundle's NPU context binary and/or ONNX model to "
                          "Qualcomm AI Hub, run profile+inference jobs on every --device at once (replaying the "
                          "first 128 tokens of the validation slice), and score the device's logits against the "
                          "fp32 reference. Either way: report.json/md/png in the host validation format, measured "
                          "next to the roofline prediction. Needs a phone with USB debugging, or network access and "
                          "an AI Hub API token; nothing on this machine can stand in for either.")
    prof.add_argument("bundle", help="bundle folder")
    prof.add_argument("--device", action="append", metavar="SERIAL|NAME",
                      help="adb serial (see `adb devices`); with --hub an AI Hub device name, repeatable "
                      "(`qai-hub list-devices`, e.g. \"Samsung Galaxy S24 (Family)\")")
    prof.add_argument("--runner",
                      help="adb: llama_main built for the phone (ExecuTorch examples/models/llama, arm64-v8a)")
    prof.add_argument("--hub", action="store_true",
                      help="run on Qualcomm AI Hub's devices instead of adb; the API token comes from "
                      "$QAI_HUB_API_TOKEN, else the qai-hub client's own config (~/.qai_hub/client.ini from "
                      "`qai-hub configure`); it is never written to the report or printed")
    prof.add_argument("--device-attr", action="append", metavar="ATTRIBUTE",
                      help="--hub: every device with this attribute (a family, e.g. chipset:qualcomm-snapdragon-8gen3 "
                      "or framework:qnn); repeatable")
    prof.add_argument("--hub-format", action="append", choices=list(HUB_FORMATS),
                      help=f"--hub: artifacts to run (default: the bundle's {' and '.join(HUB_FORMATS)} artifacts)")
    prof.add_argument("--hub-timeout", type=_int_in(1, 24 * 60), default=60,
                      help="--hub: minutes to wait for the jobs (default 60); a job still running is reported "
                      "as timed out and the others are kept")
    prof.add_argument("--hub-options", default="",
                      help="--hub: options passed to every AI Hub job as given (e.g. \"--max_profiler_iterations 10\")")
    prof.add_argument("--model", help="--hub: the source checkpoint, for the fp32 reference the device's logits are "
                      "scored against (default: the one the manifest names)")
    prof.add_argument("--force", action="store_true", help="--hub: write into a non-empty --out")
    prof.add_argument("--runs", type=_int_in(1, 1000), default=3, help="timed runs (default 3)")
    prof.add_argument("--warmup", type=_int_in(0, 100), default=1, help="untimed warm-up runs first (default 1)")
    prof.add_argument("--threads", type=_int_in(1, 64), default=4,
                      help="--cpu_threads for llama_main (default 4: the performance cores of most SoCs)")
    prof.add_argument("--gen-tokens", type=_int_in(1, 1 << 16), default=128,
                      help="tokens to generate per run (default 128)")
    prof.add_argument("--adb", default="adb", help="adb executable (default: adb on PATH)")
    prof.add_argument("--no-push", action="store_true", help="files are already on the device")
    prof.add_argument("--out", help="report folder (default profile-SERIAL; with --hub profile-hub, one "
                      "sub-folder per device with its report and the jobs' raw results)")
    prof.add_argument("--profile", default="qualcomm",
                      help="target profile whose roofline prediction is shown next to the measurement "
                      "(default qualcomm)")
    prof.set_defaults(func=cmd_profile)

    fit = sub.add_parser("fit", help="predict RAM use, decode speed ceiling and file sizes per target",
                         description="Weights + KV cache vs each profile's RAM budget, the bandwidth roofline "
                         "(bytes read per token / memory bandwidth) and each format's file size. Reads only the "
                         "config: works on config.json / params.json alone, or on a named preset before any "
                         "download. One model and profile: a summary line; several, or --all: the matrix. Exit 3 "
                         "if a requested combination does not fit (never with --all, which is a report).")
    fit.add_argument("--model", action="append",
                     help="preset name (see --list) or a Hub id of one, checkpoint folder, config.json, params.json, "
                     ".gguf, or another Hub id (its config.json alone is fetched when the network allows); "
                     "repeatable; default: the embedded SmolLM2")
    fit.add_argument("--profile", action="append", help="profile name or .toml; repeatable (default: all built-in)")
    fit.add_argument("--all", action="store_true",
                     help="every preset x the profiles x group 32/128 x lm_head 8/4 bits")
    fit.add_argument("--list", action="store_true", help="list the named presets and exit")
    fit.add_argument("--context", type=_int_in(1, 1 << 22), default=None,
                     help="KV cache length (default: the profile's)")
    fit.add_argument("--quant", choices=["8da4w", "8da8w", "fp32"], default="8da4w", help="weight scheme")
    fit.add_argument("--group-size", type=int, default=QuantScheme.group_size, choices=GROUP_SIZES, help="group size")
    fit.add_argument("--lm-head-bits", type=int, default=8, choices=[0, 4, 8], help="lm_head bits (default 8)")
    fit.add_argument("--json", action="store_true", help="one JSON object per line, per fit (JSON Lines)")
    fit.add_argument("--plot", metavar="FILE.png", help="also draw the decode ceilings, coloured by fit")
    fit.set_defaults(func=cmd_fit)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os
    import signal

    args = build_parser().parse_args(argv)
    handlers = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if current in (signal.default_int_handler, signal.SIG_DFL):
            handlers[signum] = current
            signal.signal(signum, _on_signal)
    if args.verbose:
        os.environ["LLAMASHIP_VERBOSE"] = "1"  # read where native output is captured, and by children
    quiet_library_warnings()
    try:
        return int(args.func(args))
    except LlamashipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        # Staging folders are already removed (bundle.staging_dir / updating). Leave now with
        # 128 + signal: a CI run once saw the process die of SIGINT (-2) during interpreter shutdown
        # after this message, from native code's own signal handling, which scripts would read as a crash.
        stopped_by = int(_INTERRUPTED or signal.SIGINT)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        what = "terminated (SIGTERM)" if stopped_by == signal.SIGTERM else "interrupted"
        print(f"{what}; nothing was written", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + stopped_by)
    except Exception as exc:
        if args.debug or os.environ.get("LLAMASHIP_DEBUG"):
            raise
        where = ""
        tb = exc.__traceback__
        while tb is not None:
            where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
            tb = tb.tb_next
        print(f"error: internal error: {type(exc).__name__}: {str(exc)[:300]}{where}. This is a llamaship bug: "
              "rerun with `llamaship --debug ...` for the traceback and report it", file=sys.stderr)
        return 1
    finally:
        for signum, previous in handlers.items():
            signal.signal(signum, previous)


if __name__ == "__main__":
    sys.exit(main())
