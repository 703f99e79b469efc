"""Validate a bundle's artifacts for one or more target profiles: accuracy on the artifact's own
runtime against the fp32 reference, speed (measured where the runtime runs here, else the
bandwidth roofline), device fit, gates, and the report files."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamaship.export.checkpoint import Checkpoint
from llamaship.export.model import build_model
from llamaship.quantize.scheme import QuantScheme
from llamaship.targets import accuracy
from llamaship.targets.fit import predict_fit
from llamaship.targets.profile import Profile

REPORT_SCHEMA = 1
SPEED_PROMPT_TOKENS = 128
SPEED_GEN_TOKENS = 128


RUNTIMES = {"executorch": "ExecuTorch's runtime", "onnx": "onnxruntime (CPU EP)",
            "coreml": "Core ML on macOS, else the MIL reference evaluator (NumPy)",
            "executorch_coreml": "its Core ML program (extracted from the .pte) on Core ML on macOS, else "
                                 "the MIL reference evaluator (NumPy)",
            "qnn": "onnxruntime-qnn on the QNN HTP backend (its x86_64 simulator here)"}
APPLE_ONLY = ("coreml", "executorch_coreml")


def artifact_bytes(folder: Path, art: dict[str, Any]) -> int:
    """An ONNX model is its graph plus its external weights file; an .mlpackage is a folder."""
    paths = [folder / art["path"]] + ([folder / art["external_data"]] if art.get("external_data") else [])
    total = 0
    for p in paths:
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.exists():
            total += p.stat().st_size
    return total


def _load_module(folder: Path, art: dict[str, Any]) -> Any:
    if art["format"] in APPLE_ONLY:
        from llamaship.targets.coreml_runtime import load_module

        return load_module(folder / art["path"], art["format"])
    if art["format"] == "qnn":
        from llamaship.targets.qnn_runtime import QnnModule

        return QnnModule(folder, art)
    if art["format"] == "onnx":
        from llamaship.targets.onnx_runtime import OnnxModule

        return OnnxModule(folder / art["folder"])
    from llamaship.targets.executorch_runtime import PteModule

    return PteModule(folder / art["path"])


def _speed(folder: Path, art: dict[str, Any], manifest: dict[str, Any], ckpt: Checkpoint,
           prompt_ids: list[int], n_gen: int) -> dict[str, Any]:
    from llamaship.targets.speed import benchmark, benchmark_onnx

    spec = ckpt.spec
    if art["format"] == "onnx":
        bos = [spec.bos_id] if spec.add_bos and spec.bos_id is not None else []
        return benchmark_onnx(folder / art["folder"], bos + prompt_ids, gen_tokens=n_gen)
    return benchmark(folder / art["path"], folder / manifest["tokenizer"]["path"],
                     ckpt.tokenizer.decode(prompt_ids), gen_tokens=n_gen,
                     num_bos=1 if spec.add_bos and spec.bos_id is not None else 0)


def _npu_accuracy(ckpt: Checkpoint, folder: Path, manifest: dict[str, Any], art: dict[str, Any], module: Any,
                  profiles: list[Profile], progress: Callable[[str], None]) -> dict[str, Any]:
    """The NPU graph on the HTP simulator, scored on a short slice (one prompt chunk takes ~35 s for
    SmolLM2 there): windows of two chunks, the second chunk scored with the first in the cache. The
    bundle's XNNPACK .pte is scored on the same slice, so the gate can compare the two."""
    chunk = art["max_seq_len"]
    n_tokens = min(p.npu_eval_tokens for p in profiles)
    npu_slice = accuracy.make_slice(ckpt.tokenizer, n_tokens, 2 * chunk)
    progress(f"NPU accuracy slice: {npu_slice.describe()} (HTP simulator: ~{npu_slice.n_windows * 2} chunk calls)")
    ref_model = build_model(ckpt.spec, ckpt.state, max_context=npu_slice.window, impl="torch", full_logits=True)
    reference = accuracy.reference_logprobs(ref_model, npu_slice, ckpt.sha256(), progress)
    del ref_model
    acc = accuracy.evaluate_chunked(module.forward, npu_slice, reference, progress).to_json()
    cpu = next((a for a in manifest.get("artifacts", []) if a["format"] == "executorch"), None)
    if cpu is not None and cpu["max_context"] >= npu_slice.window:
        progress(f"accuracy of {cpu['path']} on the NPU slice, for the NPU/CPU comparison")
        cpu_acc = accuracy.evaluate_stepwise(_load_module(folder, cpu).forward, npu_slice, reference, progress)
        acc["cpu_artifact"] = {"path": cpu["path"], **cpu_acc.to_json()}
        acc["kld_ratio_vs_cpu"] = acc["mean_kld"] / max(cpu_acc.mean_kld, 1e-9)
    return acc


def scheme_from_manifest(quant: dict[str, Any]) -> QuantScheme | None:
    if quant.get("name") == "fp32":
        return None
    fields = {k: quant[k] for k in ("bits", "group_size", "symmetric", "activations",
                                    "embedding_bits", "lm_head_bits") if k in quant}
    return QuantScheme(**fields)


def check_gates(profile: Profile, acc: dict[str, Any] | None, speed_tok_s: float | None,
                predicted_tok_s: float, fits: bool) -> list[dict[str, Any]]:
    """Each gate with its limit, the measured value, pass/fail and by how much."""
    values = {
        "max_kld": acc and acc["mean_kld"],
        "min_top1": acc and acc["top1_agreement"],
        "max_ppl_ratio": acc and acc["ppl_ratio"],
        "min_decode_tok_s": speed_tok_s,
        "min_predicted_decode_tok_s": predicted_tok_s,
        "max_kld_ratio_vs_cpu": acc and acc.get("kld_ratio_vs_cpu"),
    }
    gates = []
    for name, limit in profile.gates.items():
        value = values.get(name)
        if value is None:
            continue
        passed = value <= limit if name.startswith("max_") else value >= limit
        gates.append({"gate": name, "limit": limit, "value": round(float(value), 4), "passed": passed,
                      "by": round(float(value - limit), 4)})
    gates.append({"gate": "ram_budget", "limit": profile.ram_budget_gb, "value": None,
                  "passed": fits, "by": None})
    return gates


def eval_slice_for(ckpt: Checkpoint, artifacts: list[dict[str, Any]], profiles: list[Profile],
                   eval_tokens: int | None) -> accuracy.EvalSlice:
    """The slice every artifact of the bundle is scored on: windows fit every artifact's KV cache
    (the NPU graph is scored on a slice of its own)."""
    window = min([p.eval_window for p in profiles] + [a["max_context"] for a in artifacts if a["format"] != "qnn"])
    n_tokens = eval_tokens or max(p.eval_tokens for p in profiles)
    return accuracy.make_slice(ckpt.tokenizer, n_tokens, window)


def reference_for(ckpt: Checkpoint, eval_slice: accuracy.EvalSlice, progress: Callable[[str], None]) -> Any:
    ref_model = build_model(ckpt.spec, ckpt.state, max_context=eval_slice.window, impl="torch", full_logits=True)
    reference = accuracy.reference_logprobs(ref_model, eval_slice, ckpt.sha256(), progress)
    del ref_model
    return reference


def artifact_accuracy(ckpt: Checkpoint, folder: Path, manifest: dict[str, Any], art: dict[str, Any],
                      profiles: list[Profile], eval_slice: accuracy.EvalSlice, reference: Any,
                      progress: Callable[[str], None]) -> dict[str, Any]:
    how = "prompt chunks, app-side cache" if art["format"] == "qnn" else "token by token, KV cache"
    progress(f"accuracy of {art['path']} on {RUNTIMES[art['format']]} ({how})")
    module = _load_module(folder, art)
    if art["format"] == "qnn":
        acc = _npu_accuracy(ckpt, folder, manifest, art, module, profiles, progress)
    else:
        acc = accuracy.evaluate_stepwise(module.forward, eval_slice, reference, progress).to_json()
    if hasattr(module, "close"):
        module.close()  # the QNN module's child process
    del module
    return acc


def validate(
    ckpt: Checkpoint,
    folder: Path,
    manifest: dict[str, Any],
    profiles: list[Profile],
    eval_tokens: int | None = None,
    measure_speed: bool = True,
    progress: Callable[[str], None] = print,
    accuracies: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Returns the report dict (and writes nothing); `folder` holds the bundle's files.
    `accuracies` (artifact path -> `artifact_accuracy` result) were measured already, on the slice
    this computes (the pipeline scores some artifacts while the .pte is still lowering)."""
    spec = ckpt.spec
    scheme = scheme_from_manifest(manifest.get("quant", {}))
    artifacts = [a for a in manifest.get("artifacts", []) if a["format"] in RUNTIMES]
    eval_slice = eval_slice_for(ckpt, artifacts, profiles, eval_tokens)
    progress(f"accuracy slice: {eval_slice.describe()}")
    reference = reference_for(ckpt, eval_slice, progress)
    ref_ppl = accuracy.evaluate_reference_self(eval_slice, reference)

    results: list[dict[str, Any]] = []
    for art in artifacts:
        acc = (accuracies or {}).get(art["path"]) or artifact_accuracy(
            ckpt, folder, manifest, art, profiles, eval_slice, reference, progress)
        speed = None
        if art["format"] in APPLE_ONLY:
            progress(f"speed of {art['path']}: not measured (no Apple hardware here); the Apple "
                     "profile reports the bandwidth roofline")
        elif art["format"] == "qnn":
            progress(f"speed of {art['path']}: not measured (the HTP here is a simulator); the Qualcomm "
                     "profile reports the bandwidth roofline, and profiling/ measures it on a phone")
        elif measure_speed and any(p.measured_here for p in profiles):
            # 128 + 128 tokens, or what the artifact's context allows
            n_prompt = min(SPEED_PROMPT_TOKENS, art["max_context"] // 2)
            n_gen = min(SPEED_GEN_TOKENS, art["max_context"] - n_prompt - 8)
            progress(f"speed of {art['path']}: {n_prompt}-token prompt, {n_gen} new tokens, "
                     "1 warm-up + 3 runs")
            speed = _speed(folder, art, manifest, ckpt, list(eval_slice.tokens[:n_prompt]), n_gen)
        results.append({"format": art["format"], "path": art["path"],
                        "scheme": art.get("scheme", scheme.name if scheme else "fp32"),
                        "size_bytes": artifact_bytes(folder, art), "accuracy": acc, "speed": speed})

    targets = []
    for profile in profiles:
        fit = predict_fit(spec, scheme, profile)
        for res in results:
            if not profile.gates_format(res["format"]):
                continue
            measured = res["speed"]["decode_tok_s"]["median"] if (res["speed"] and profile.measured_here) else None
            gates = check_gates(profile, res["accuracy"], measured, fit.decode_ceiling_tok_s, fit.fits)
            targets.append({
                "profile": profile.name, "device": profile.device, "artifact": res["path"],
                "ships": (f"yes: the {profile.name} profile ships {', '.join(profile.formats)}"
                          if res["format"] in profile.formats else
                          f"opt-in: the {profile.name} profile ships {', '.join(profile.formats)} by default and "
                          f"gates {res['format']} when a bundle has it"),
                "speed_source": "measured on this host" if profile.measured_here else
                f"roofline prediction for {profile.device} (no such device here)",
                "fit": fit.to_json(), "gates": gates, "passed": all(g["passed"] for g in gates),
            })
    return {
        "schema_version": REPORT_SCHEMA,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": spec.name,
        "source_sha256": manifest.get("model", {}).get("source_sha256"),
        "slice": eval_slice.describe(),
        "reference": {"format": "fp32 PyTorch module", "ppl": ref_ppl},
        "artifacts": results,
        "targets": targets,
        "passed": all(t["passed"] for t in targets),
    }
