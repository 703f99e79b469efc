"""Qualcomm AI Hub as the device farm behind `llamaship profile --hub`: the bundle's NPU context
binary and ONNX model measured on real Snapdragon phones and laptops, several at once.

Why drive qai-hub instead of our own runner: AI Hub is a hosted farm of real devices with a Python
client (`qai-hub`) that uploads a model, runs profile and inference jobs on a chosen device and
returns timings, peak memory and outputs; Qualcomm's own published tok/s come from it. We build
what is ours (the upload folder, the inputs an app would feed, the replayed window, the report) and
let the client do the rest.

One job per (device, artifact, call shape): an inference job with profiling on, so each job gives
both the device's timing and its outputs for the same inputs.
- The NPU artifact gets two: its prefill graph on the first 128 tokens of the validation slice's
  first window from an empty cache, and its decode graph on the next token, the cache computed
  here by onnxruntime's CPU EP on the same quantized graph. AI Hub compiles and runs the graphs the
  context binary was compiled from (the part's source ONNX graphs, with `--compute_unit npu`):
  one model per job, so a bundle of several parts is refused (its parts chain through the app).
- The ONNX model gets two: that prompt (empty cache), and one decoded token after it, its past
  keys/values computed here by onnxruntime on the same model.
The device's logits for the prompt are scored against the fp32 PyTorch module on the same tokens.

The API token: `QAI_HUB_API_TOKEN` if set, else what the client itself reads (the file named by
`QAIHUB_CLIENT_INI`, else ~/.qai_hub/client.ini, written by `qai-hub configure --api_token`). It
is never written anywhere, and every message that leaves this module is scrubbed of it (the
client's own config object prints it in its repr).

Nothing here can reach AI Hub from this machine (no network): the tests run the real client
against a loopback stand-in for its REST layer (tests/hub_loopback.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llamaship.errors import RuntimeFailure, UnsupportedError
from llamaship.progress import advance

TOKEN_ENV = "QAI_HUB_API_TOKEN"
FORMATS = ("qnn", "onnx")  # bundle artifacts AI Hub can run: the NPU context binary, the ONNX model
FRAMEWORK = {"qnn": "framework:qnn", "onnx": "framework:onnx"}
PROMPT_TOKENS = 128  # the NPU graph's chunk; the ONNX prompt job replays the same tokens
NEEDS_NETWORK = ("AI Hub jobs run on Qualcomm's servers: they need network access and your API token "
                 f"({TOKEN_ENV}, or `qai-hub configure --api_token ...`)")


class Redactor:
    """Scrubs the API token (and any Authorization header value) from text that leaves here."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = [s for s in secrets if s]

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "<token>")
        return re.sub(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?token\s+)\S+", r"\1<token>", text)


def make_client() -> tuple[Any, Redactor]:
    """The client with the user's token, and the redactor that knows it. Fails here, before any
    upload, when no token is configured."""
    try:
        from qai_hub.client import Client, ClientConfig
    except ImportError as exc:
        raise UnsupportedError("qai-hub is not installed: `pip install --no-deps qai-hub==0.56.0` plus "
                               "`pip install 'llamaship[hub]'` (its other dependencies)") from exc
    token = os.environ.get(TOKEN_ENV, "")
    client = Client(config=ClientConfig(api_token=token)) if token else Client()
    try:
        token = client.config.api_token
    except Exception as exc:
        raise UnsupportedError(f"no AI Hub API token: set {TOKEN_ENV}, or run `qai-hub configure --api_token "
                               "<token>` (it writes ~/.qai_hub/client.ini); the token is on your AI Hub account "
                               f"page ({type(exc).__name__})") from None
    return client, Redactor([token])


def resolve_devices(client: Any, names: list[str], attributes: list[str], redact: Redactor) -> list[Any]:
    """AI Hub devices by exact name (`qai-hub list-devices`) or by attribute (a family:
    `chipset:qualcomm-snapdragon-8gen3`), each once."""
    found: dict[str, Any] = {}
    queries = [{"name": n} for n in names] + [{"attributes": [a]} for a in attributes]
    for query in queries:
        try:
            devices = client.get_devices(**query)
        except Exception as exc:
            raise RuntimeFailure(f"AI Hub: listing devices failed ({redact(str(exc))}); AI Hub needs network access "
                                 "to workbench.aihub.qualcomm.com and a valid API token") from None
        if not devices:
            what = query.get("name") or query["attributes"][0]
            raise UnsupportedError(f"AI Hub has no device matching {what!r}; `qai-hub list-devices` lists them "
                                   "with their attributes")
        for d in devices:
            found.setdefault(d.name, d)
    return list(found.values())


@dataclass
class HubJob:
    """One call shape of one artifact on one device, and what came back."""

    device: Any  # qai_hub Device
    fmt: str
    kind: str  # "prompt" | "decode"
    inputs: dict[str, list[np.ndarray]]
    tokens: int  # tokens this call processes
    job: Any = None
    status: str = "pending"  # done | failed | timeout | error | unsupported
    message: str = ""
    profile: dict[str, Any] | None = None
    outputs: dict[str, list[np.ndarray]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _input_order(model: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(model), load_external_data=False).graph.input]


NPU_OPTIONS = "--compute_unit npu"


def qnn_inputs(bundle: Path, art: dict[str, Any], tokens: list[int]) -> tuple[dict[str, list[np.ndarray]], ...]:
    """The NPU artifact's inputs as the app builds them, in each graph's input order: the prefill
    graph's for `tokens[:-1]` (at most 128) from an empty cache, and the decode graph's for the
    last token, its cache from the prefill graph run here on the CPU."""
    from llamaship.export.qnn_build import cpu_runner
    from llamaship.targets.qnn_app import PartsRunner

    cfg = json.loads((bundle / art["config"]).read_text())
    if len(cfg.get("parts", [])) != 1:
        raise UnsupportedError(f"{bundle / art['config']}: profile --hub runs single-part NPU bundles (one model "
                               f"per AI Hub job); this one has {len(cfg.get('parts', []))} parts, which chain "
                               "through the app")
    part = cfg["parts"][0]
    folder = (bundle / art["config"]).parent
    run = cpu_runner(folder / part["source"]["prefill"])
    runner = PartsRunner(lambda k, g, f: run(f), cfg)
    prompt = tokens[:-1][: cfg["graphs"]["prefill"]["tokens_per_call"]]
    feeds = [runner.feeds(part, "prefill", prompt, None)]
    runner.forward(prompt, 0)
    feeds.append(runner.feeds(part, "decode", tokens[len(prompt) : len(prompt) + 1], None))
    return tuple({name: [np.ascontiguousarray(f[name])] for name in part["inputs"]} for f in feeds)


def onnx_inputs(folder: Path, tokens: list[int]) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]]:
    """The ONNX model's inputs for the prompt (empty cache) and for one decoded token after it (the
    next token of the window; its past keys/values from onnxruntime here, on the same model)."""
    from llamaship.targets.onnx_runtime import OnnxModule, _decoder_config

    module = OnnxModule(folder)
    order = _input_order(folder / _decoder_config(folder)["filename"])
    prompt = module.feeds(tokens[:-1], 0)
    module.forward(tokens[:-1], 0)
    decode = module.feeds(tokens[-1:], len(tokens) - 1)
    pack = lambda feed: {n: [np.ascontiguousarray(feed[n])] for n in order}  # noqa: E731
    return pack(prompt), pack(decode)


@contextmanager
def upload_folder(folder: Path, files: list[str]) -> Iterator[Path]:
    """A folder with only the files AI Hub accepts for a model directory (one .onnx, plus its .data
    or its QNN .bin): hard links where possible, so nothing large is copied."""
    with tempfile.TemporaryDirectory(prefix="llamaship-hub-") as tmp:
        out = Path(tmp) / "model"
        out.mkdir()
        for name in files:
            try:
                os.link(folder / name, out / name)
            except OSError:
                shutil.copy2(folder / name, out / name)
        yield out


def _model_files(bundle: Path, art: dict[str, Any], kind: str) -> tuple[Path, list[str]]:
    """The folder and files of the model a job of `kind` runs: the ONNX model and its .data; for the
    NPU artifact, its part's prefill (prompt) or decode source graph and their shared weights file."""
    if art["format"] == "qnn":
        part = json.loads((bundle / art["config"]).read_text())["parts"][0]
        graph = bundle / art["folder"] / part["source"]["prefill" if kind == "prompt" else "decode"]
        return graph.parent, [graph.name, Path(part["source"]["data"]).name]
    path = bundle / art["path"]
    extra = [Path(art["external_data"]).name] if art.get("external_data") else []
    return path.parent, [path.name, *extra]


def plan_jobs(bundle: Path, manifest: dict[str, Any], devices: list[Any], formats: list[str],
              window: list[int]) -> list[HubJob]:
    """Every (device, artifact, call shape) job, with the inputs packed once per artifact. A device
    without the framework an artifact needs gets an `unsupported` entry instead of a job."""
    jobs: list[HubJob] = []
    for fmt in formats:
        art = next(a for a in manifest["artifacts"] if a["format"] == fmt)
        if fmt == "qnn":
            prompt_tokens = window[:PROMPT_TOKENS]
            shapes = list(zip(("prompt", "decode"), qnn_inputs(bundle, art, window[: PROMPT_TOKENS + 1]), strict=True))
        else:  # the prompt and one decoded token must fit the model's context
            n = min(PROMPT_TOKENS, int(art.get("max_context", 2048)) - 1)
            prompt_tokens = window[:n]
            path = bundle / art["path"]
            prompt, decode = onnx_inputs(path if path.is_dir() else path.parent, window[: n + 1])
            shapes = [("prompt", prompt), ("decode", decode)]
        for device in devices:
            for kind, inputs in shapes:
                start = 0 if kind == "prompt" else len(prompt_tokens)
                job = HubJob(device, fmt, kind, inputs, len(prompt_tokens) if kind == "prompt" else 1,
                             extra={"start": start, "replayed": window[start: start + (len(prompt_tokens)
                                                                                        if kind == "prompt" else 1)]})
                if FRAMEWORK[fmt] not in device.attributes:
                    job.status, job.message = "unsupported", f"{device.name} does not list {FRAMEWORK[fmt]}"
                jobs.append(job)
    return jobs


def submit(client: Any, bundle: Path, manifest: dict[str, Any], jobs: list[HubJob], redact: Redactor,
           progress: Callable[[str], None], options: str = "") -> None:
    """Uploads each model once (the NPU artifact's prefill and decode graphs are two) and submits its
    jobs; a job the service refuses is marked, the others go on."""
    models: dict[tuple[str, ...], Any] = {}
    for j in jobs:
        if j.status != "pending":
            continue
        folder, files = _model_files(bundle, next(a for a in manifest["artifacts"] if a["format"] == j.fmt), j.kind)
        key = (str(folder), *files)
        if key not in models:
            progress(f"AI Hub: uploading {j.fmt} ({', '.join(files)})")
            try:
                with upload_folder(folder, files) as staged:
                    models[key] = client.upload_model(str(staged), name=f"{manifest['model']['name']} {j.fmt}")
            except Exception as exc:
                models[key] = exc
        if isinstance(models[key], Exception):
            j.status, j.message = "error", f"upload failed: {redact(str(models[key]))}"
            continue
        job_options = f"{options} {NPU_OPTIONS}".strip() if j.fmt == "qnn" else options
        try:
            j.job = client.submit_inference_job(models[key], j.device, inputs=j.inputs, profile=True,
                                                options=job_options, name=f"llamaship {j.fmt} {j.kind}")
            j.status = "submitted"
            progress(f"AI Hub: {j.device.name}: {j.fmt} {j.kind} job {j.job.job_id}")
        except Exception as exc:
            j.status, j.message = "error", f"submit failed: {redact(str(exc))}"


def collect(jobs: list[HubJob], redact: Redactor, progress: Callable[[str], None], timeout_s: float) -> None:
    """Waits for every submitted job at once (each in a thread: the client's wait polls), then
    fetches its profile and outputs. A failed or timed-out job is recorded and the rest kept."""
    live = [j for j in jobs if j.status == "submitted"]

    def wait(j: HubJob) -> HubJob:
        try:
            status = j.job.wait(timeout=timeout_s)
        except TimeoutError:
            j.status, j.message = "timeout", f"not finished after {timeout_s / 60:.0f} min"
            return j
        except Exception as exc:
            j.status, j.message = "error", redact(str(exc))
            return j
        if not status.success:
            j.status, j.message = "failed", redact(str(status.message or status.code))
            return j
        try:
            j.profile = j.job.download_profile()
            j.outputs = j.job.download_output_data()
            j.status = "done"
        except Exception as exc:
            j.status, j.message = "error", f"fetching results failed: {redact(str(exc))}"
        return j

    done = 0
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(live)))) as pool:
        for fut in as_completed([pool.submit(wait, j) for j in live]):
            j = fut.result()
            done += 1
            progress(f"AI Hub: {j.device.name}: {j.fmt} {j.kind}: {j.status}{': ' + j.message if j.message else ''}")
            advance(progress, "AI Hub jobs", done, len(live))


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device"


def save_recording(j: HubJob, folder: Path) -> None:
    """What the service returned, in the client's own formats: the profile dict as
    `download_profile(filename)` writes it, the outputs as the dataset .h5 `download_output_data`
    writes; job.json says what ran where."""
    from qai_hub.util.dataset_entries_converters import dataset_entries_to_h5

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"device": j.device.name, "os": j.device.os, "attributes": list(j.device.attributes),
            "format": j.fmt, "kind": j.kind, "tokens": j.tokens, "status": j.status, "message": j.message,
            "job_id": getattr(j.job, "job_id", None), "source": "Qualcomm AI Hub"}
    (folder / "job.json").write_text(json.dumps(meta, indent=1) + "\n")
    if j.profile is not None:
        (folder / "profile.json").write_text(json.dumps(j.profile, default=list) + "\n")
    if j.outputs is not None:
        import h5py

        with h5py.File(folder / "outputs.h5", "w") as h5f:
            dataset_entries_to_h5(j.outputs, h5f)


def _times_us(profile: dict[str, Any]) -> list[float]:
    summary = profile.get("execution_summary", {})
    times = [float(t) for t in summary.get("all_inference_times") or [] if t]
    if not times and summary.get("estimated_inference_time"):
        times = [float(summary["estimated_inference_time"])]
    if not times:
        raise RuntimeFailure("AI Hub profile has no inference time")
    return times


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def speed_from_profiles(prompt: dict[str, Any], decode: dict[str, Any] | None, n_prompt: int,
                        runtime: str) -> dict[str, Any]:
    """The report's speed section from AI Hub's profiles (times in microseconds, memory in bytes):
    the prompt call's time is the TTFT of an n-token prompt, the decode call's time is the time
    per decoded token (the prompt call itself where one graph serves both)."""
    tp = _times_us(prompt)
    td = _times_us(decode) if decode is not None else tp
    summary = prompt.get("execution_summary", {})
    peaks = [p for p in (summary.get("estimated_inference_peak_memory"),
                         (decode or {}).get("execution_summary", {}).get("estimated_inference_peak_memory")) if p]
    load = summary.get("first_load_time")
    return {
        "runtime": runtime, "prompt_tokens": n_prompt, "generated_tokens": 1, "warmup_runs": 0, "runs": len(td),
        "prefill_tok_s": _spread([n_prompt * 1e6 / t for t in tp]),
        "decode_tok_s": _spread([1e6 / t for t in td]),
        "ttft_ms": _spread([t / 1e3 for t in tp]),
        **({"load_ms": _spread([float(load) / 1e3])} if load else {}),
        "peak_rss_mb": max(peaks) / 1e6 if peaks else None,
    }


def scored_rows(job: HubJob, vocab: int) -> tuple[Any, list[int]]:
    """The logits a job returned and the window positions they belong to. The NPU graph returns a
    row per chunk slot (left-aligned); the ONNX model (the builder prunes its lm_head to the last
    position) returns the last position only."""
    import torch

    assert job.outputs is not None
    name = "logits" if "logits" in job.outputs else next(iter(job.outputs))
    rows = torch.from_numpy(np.asarray(job.outputs[name][0], dtype=np.float32)).reshape(-1, vocab)
    start, n = job.extra["start"], len(job.extra["replayed"])
    if len(rows) >= n:
        return rows[:n], list(range(start, start + n))
    return rows, list(range(start + n - len(rows), start + n))


def accuracy_from_jobs(jobs: list[HubJob], ref_logprobs: Any, window: list[int]) -> dict[str, Any] | None:
    """The device's logits against the fp32 reference's log-probs at the same positions of the
    replayed window: KLD, top-1, PPL over every position whose next token is known."""
    import torch

    from llamaship.targets.accuracy import _Accumulator

    acc = _Accumulator()
    for j in jobs:
        if j.status != "done" or not j.outputs:
            continue
        rows, positions = scored_rows(j, ref_logprobs.shape[-1])
        keep = [i for i, p in enumerate(positions) if p + 1 < min(len(window), len(ref_logprobs) + 1)]
        if keep:
            acc.add(rows[keep], ref_logprobs[[positions[i] for i in keep]],
                    torch.tensor([window[positions[i] + 1] for i in keep]))
    if not acc.n:
        return None
    n_replayed = max(j.extra["start"] + len(j.extra["replayed"]) for j in jobs)
    return acc.result(f"first {n_replayed} tokens of WikiText-2 test (the first validation window) replayed on "
                      f"the device, {acc.n} positions scored").to_json()


def device_reports(bundle: Path, manifest: dict[str, Any], jobs: list[HubJob], ref_logprobs: Any,
                   window: list[int], slice_text: str, prediction: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """One report per device, in the host validation format (a `device` section, no gates: device
    figures are for comparison), with each job's status."""
    from llamaship.targets.validate import artifact_bytes

    reports: dict[str, dict[str, Any]] = {}
    for device in dict.fromkeys(j.device.name for j in jobs):
        mine = [j for j in jobs if j.device.name == device]
        arts = []
        for fmt in dict.fromkeys(j.fmt for j in mine):
            art = next(a for a in manifest["artifacts"] if a["format"] == fmt)
            by_kind = {j.kind: j for j in mine if j.fmt == fmt}
            prompt, decode = by_kind.get("prompt"), by_kind.get("decode")
            ok = prompt is not None and prompt.status == "done" and (decode is None or decode.status == "done")
            speed = acc = None
            if ok and prompt is not None and prompt.profile is not None:
                how = ("a 128-token prefill graph call, then 1-token decode graph calls" if fmt == "qnn"
                       else "a 128-token prompt call, then 1-token calls")
                speed = speed_from_profiles(prompt.profile, decode.profile if decode else None, prompt.tokens,
                                            f"{fmt} on {device} (Qualcomm AI Hub profiler; {how})")
                if ref_logprobs is not None:
                    acc = accuracy_from_jobs(list(by_kind.values()), ref_logprobs, window)
            arts.append({"format": fmt, "path": art["path"], "scheme": art.get("scheme", manifest["quant"]["name"]),
                         "size_bytes": artifact_bytes(bundle, art), "accuracy": acc, "speed": speed,
                         "hub_jobs": [{"kind": j.kind, "status": j.status, "message": j.message,
                                       "job_id": getattr(j.job, "job_id", None)} for j in by_kind.values()]})
        first = mine[0].device
        reports[device] = {
            "schema_version": 1,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": manifest["model"]["name"],
            "source_sha256": manifest["model"].get("source_sha256"),
            "slice": slice_text if ref_logprobs is not None else None,
            "reference": None,
            "artifacts": arts,
            "targets": [],
            "device": {"model": device, "os": first.os, "attributes": ", ".join(first.attributes),
                       "farm": "Qualcomm AI Hub (measured on the device by AI Hub's profiler)"},
            **({"prediction": prediction} if prediction else {}),
            "passed": None,
        }
    return reports


def reference_logprobs(ckpt: Any, tokens: list[int]) -> Any:
    """fp32 log-probs [n, vocab] of the PyTorch module on `tokens` from position 0, or None with
    the reason when the fp32 model does not fit this host's memory (7B/8B: the streamed reference
    is the validation issue's)."""
    import torch

    from llamaship.export.llama.model import build_model
    from llamaship.runtime.memory import available_memory

    need = 4 * sum(int(t.numel()) for t in ckpt.state.values())
    avail = available_memory()
    if avail is not None and need > avail:
        return None, (f"the fp32 reference needs {need / 2**30:.0f} GiB and {avail / 2**30:.0f} GiB are available: "
                      "device logits recorded, not scored")
    model = build_model(ckpt.spec, ckpt.state, max_context=len(tokens), impl="torch", full_logits=True)
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), torch.tensor([0]))[0]
    return torch.log_softmax(logits.float(), -1), ""
