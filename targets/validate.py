"""Validate a bundle's artifacts for one or more target profiles: accuracy on the artifact's own
runtime against the fp32 reference, speed (measured where the runtime runs here, else the
bandwidth roofline), device fit, gates, and the report files."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaship import backends
from llamaship.export.llama.checkpoint import Checkpoint
from llamaship.quantize.scheme import QuantScheme
from llamaship.targets import accuracy
from llamaship.targets.fit import predict_fit, predict_sizes
from llamaship.targets.profile import Profile

REPORT_SCHEMA = 1
SPEED_PROMPT_TOKENS = 128
SPEED_GEN_TOKENS = 128


def artifact_bytes(folder: Path, art: dict[str, Any]) -> int:
    """An ONNX model is its graph plus its external weights file; an .mlpackage is a folder; the NPU
    artifact is the files a phone loads (`device_files`), not the source graphs beside them."""
    paths = [folder / art["path"]] + ([folder / art["external_data"]] if art.get("external_data") else [])
    if art.get("device_files"):
        paths = [folder / f for f in art["device_files"]]
    total = 0
    for p in paths:
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.exists():
            total += p.stat().st_size
    return total


@dataclass
class Scoring:
    """What a backend's accuracy() may use: the bundle, the shared slice and its fp32 reference."""

    ckpt: Checkpoint
    folder: Path
    manifest: dict[str, Any]
    profiles: list[Profile]
    eval_slice: accuracy.EvalSlice
    reference: Any
    progress: Callable[[str], None]

    @staticmethod
    def backend_of(art: dict[str, Any]) -> backends.Backend:
        return backends.get(art["format"])


def scheme_from_manifest(quant: dict[str, Any]) -> QuantScheme | None:
    if quant.get("name") == "fp32":
        return None
    fields = {k: quant[k] for k in ("bits", "group_size", "symmetric", "activations", "embedding_bits",
                                    "lm_head_bits", "algorithm", "calibration_tokens") if k in quant}
    return QuantScheme(**fields)


def check_gates(profile: Profile, acc: dict[str, Any] | None, speed_tok_s: float | None,
                predicted_tok_s: float, fits: bool) -> list[dict[str, Any]]:
    """Each gate with its limit, the measured value, pass/fail and by how much."""
    values: dict[str, float | None] = {
        "max_kld": acc["mean_kld"] if acc else None,
        "min_top1": acc["top1_agreement"] if acc else None,
        "max_ppl_ratio": acc["ppl_ratio"] if acc else None,
        "min_decode_tok_s": speed_tok_s,
        "min_predicted_decode_tok_s": predicted_tok_s,
        "max_kld_ratio_vs_cpu": acc.get("kld_ratio_vs_cpu") if acc else None,
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
    (an artifact scored on a slice of its own, like the NPU graph, does not count)."""
    window = min([p.eval_window for p in profiles] + [a["max_context"] for a in artifacts
                                                      if backends.get(a["format"]).shares_eval_slice])
    shared = [a["format"] for a in artifacts if backends.get(a["format"]).shares_eval_slice]
    n_tokens = eval_tokens or default_eval_tokens(ckpt.spec, profiles, window, shared)
    return accuracy.make_slice(ckpt.tokenizer, n_tokens, window)


# Validation of one artifact should take about half an hour on this 2-core class of machine. From
# 1B parameters up, the profile's full slice would take hours, so the default slice is cut to what
# the budget allows: the streamed fp32 reference (0.13 s per token at Llama 3 8B, bench/fullsize.py)
# plus the slowest artifact scored on the slice (its backend's `eval_s_per_token_8b`), scaled by
# parameters for other sizes.
LARGE_MODEL_PARAMS = 1_000_000_000
VALIDATE_BUDGET_S = 1800
REFERENCE_S_PER_TOKEN_8B = 0.13


def default_eval_tokens(spec: Any, profiles: list[Profile], window: int, formats: list[str] | None = None) -> int:
    """The profile's slice, or for a model of 1B parameters and more the whole windows that fit
    the half-hour budget (at least two) for the slowest of `formats`."""
    full = max(p.eval_tokens for p in profiles)
    params = spec.param_count()
    if params < LARGE_MODEL_PARAMS:
        return full
    rates = [backends.get(f).eval_s_per_token_8b for f in formats or []]
    slowest = max(rates or [backends.Backend.eval_s_per_token_8b])
    per_token = (REFERENCE_S_PER_TOKEN_8B + slowest) * params / 8.03e9
    fits = int(VALIDATE_BUDGET_S / per_token) // window * window
    return min(full, max(2 * window, fits))


def reference_for(ckpt: Checkpoint, eval_slice: accuracy.EvalSlice, progress: Callable[[str], None]) -> Any:
    """The fp32 reference, one block at a time over every window (targets/reference.py): one
    block's weights in memory, never the whole fp32 model (32 GB for 8B)."""
    from llamaship.targets.reference import streamed_logprobs

    return streamed_logprobs(ckpt.spec, ckpt.state, eval_slice, ckpt.sha256(), progress)


def artifact_accuracy(ckpt: Checkpoint, folder: Path, manifest: dict[str, Any], art: dict[str, Any],
                      profiles: list[Profile], eval_slice: accuracy.EvalSlice, reference: Any,
                      progress: Callable[[str], None]) -> dict[str, Any]:
    backend = backends.get(art["format"])
    how = "token by token, KV cache" if backend.shares_eval_slice else "prompt chunks, app-side cache"
    progress(f"accuracy of {art['path']} on {backend.runtime} ({how})")
    start = time.perf_counter()
    acc = backend.accuracy(Scoring(ckpt, folder, manifest, profiles, eval_slice, reference, progress), art)
    seconds = time.perf_counter() - start
    acc["eval_seconds"] = round(seconds, 1)
    full = max(p.eval_tokens for p in profiles)
    if backend.shares_eval_slice and len(eval_slice.tokens) < full:  # what the profile's full slice would cost
        acc["full_slice"] = {"tokens": full, "estimated_seconds": round(seconds * full / len(eval_slice.tokens))}
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
    artifacts = [a for a in manifest.get("artifacts", []) if a["format"] in backends.names()]
    eval_slice = eval_slice_for(ckpt, artifacts, profiles, eval_tokens)
    progress(f"accuracy slice: {eval_slice.describe()}")
    reference = reference_for(ckpt, eval_slice, progress)
    ref_ppl = accuracy.evaluate_reference_self(eval_slice, reference)

    results: list[dict[str, Any]] = []
    predicted_sizes = predict_sizes(spec, scheme)  # what `llamaship fit` says, beside what was written
    for art in artifacts:
        acc = (accuracies or {}).get(art["path"]) or artifact_accuracy(
            ckpt, folder, manifest, art, profiles, eval_slice, reference, progress)
        speed = None
        backend = backends.get(art["format"])
        if backend.speed_elsewhere:
            progress(f"speed of {art['path']}: {backend.speed_elsewhere}")
        elif measure_speed and any(p.measured_here for p in profiles):
            # 128 + 128 tokens, or what the artifact's context allows
            n_prompt = min(SPEED_PROMPT_TOKENS, art["max_context"] // 2)
            n_gen = min(SPEED_GEN_TOKENS, art["max_context"] - n_prompt - 8)
            progress(f"speed of {art['path']}: {n_prompt}-token prompt, {n_gen} new tokens, "
                     "1 warm-up + 3 runs")
            speed = backend.speed(folder, art, manifest, ckpt, list(eval_slice.tokens[:n_prompt]), n_gen)
        results.append({"format": art["format"], "path": art["path"],
                        "scheme": art.get("scheme", scheme.name if scheme else "fp32"),
                        "size_bytes": artifact_bytes(folder, art),
                        "predicted_size_bytes": predicted_sizes.get(art["format"]), "accuracy": acc, "speed": speed}
                       | ({"parts": {k: art[k] for k in ("part_bytes", "qnn_sdk_version", "graphs") if k in art}}
                          if "part_bytes" in art else {}))

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
