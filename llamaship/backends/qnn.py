"""The Snapdragon NPU artifact: per part, a prefill and a decode graph in one weight-sharing w4a16
QNN context binary (4-bit LPBQ weights, 16-bit activations calibrated on WikiText-2 validation),
loaded through onnxruntime-qnn EP-context models; validated here by running the graphs' sources on
the QNN HTP simulator that onnxruntime-qnn ships for x86_64."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llamaship.backends.base import Backend, Exported, ExportJob, Generated, Module, Request, greedy
from llamaship.errors import UnsupportedError
from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.storage import LPBQ

FOLDER = "qnn"
SMOKE_TOKENS = 4  # the prompt is one 128-token call on the HTP simulator (~35 s for SmolLM2), each token a decode call
DECODE_CHECK_TOKENS = 8  # decode-graph calls validation makes (~12 s each for SmolLM2 on the simulator)
SIMULATOR_NOTE = "HTP simulator on x86: its speed says nothing about a phone's"


def qnn_target(profiles: list[Any]) -> tuple[str, str, float | None]:
    """The SoC the NPU graph is compiled for and its per-context weight limit in GB: the first
    profile that names a SoC (8 Gen 3 and the default limit otherwise)."""
    from llamaship.export.qnn import SOC_MODELS

    for p in profiles:
        if "soc_model" in p.extra:
            soc = str(p.extra["soc_model"])
            arch = str(p.extra.get("htp_arch") or next((a for a, s in SOC_MODELS.items() if s == soc), "?"))
            limit = p.extra.get("htp_context_limit_gb")
            return soc, arch, None if limit is None else float(limit)
    return SOC_MODELS["v75"], "v75", None


def decode_check(module: Any, npu_slice: Any, reference: Any, prefill_logits: Any,
                 progress: Any) -> dict[str, Any]:
    """The decode graph on the slice's first window: its first scored half's start through the
    prefill graph, then DECODE_CHECK_TOKENS tokens one by one through the decode graph, scored
    against the fp32 reference and against the prefill graph's rows at the same positions (so a
    decode graph that reads the cache wrong cannot pass on the prefill graph's figures)."""
    import numpy as np
    import torch

    from llamaship.targets.accuracy import _Accumulator

    window, start, n = next(npu_slice.windows()), npu_slice.first_scored, DECODE_CHECK_TOKENS
    progress(f"NPU decode graph: {n} tokens one by one after a {start}-token prompt (first window)")
    module.forward(window[:start], 0)
    rows = torch.cat([module.forward([window[start + i]], start + i) for i in range(n)])
    targets = torch.tensor(window[start + 1 : start + 1 + n])
    ref = torch.from_numpy(np.array(reference[0][:n], dtype=np.float32))
    dec, pre = _Accumulator(), _Accumulator()
    dec.add(rows, ref, targets)
    pre.add(prefill_logits[start : start + n], ref, targets)
    lp, lq = torch.log_softmax(prefill_logits[start : start + n].float(), -1), torch.log_softmax(rows.float(), -1)
    return {"positions": f"{start}-{start + n - 1} of the first window", "calls": module.calls(),
            "mean_kld": dec.kld / dec.n, "prefill_graph_mean_kld": pre.kld / pre.n,
            "kld_vs_prefill_graph": float((lp.exp() * (lp - lq)).sum(-1).mean()),
            "argmax_agreement_vs_prefill_graph": float((lp.argmax(-1) == lq.argmax(-1)).float().mean())}


class Qnn(Backend):
    name = "qnn"
    help = ("Snapdragon NPU: qnn/ holds per part a prefill (128-token) and a decode (1-token) graph in one "
            "weight-sharing QNN context binary for the profile's soc_model, w4a16: 4-bit LPBQ weights, 16-bit "
            "activations calibrated on WikiText-2 validation text; validated on the QNN HTP simulator of "
            "onnxruntime-qnn, Linux x86_64 only")
    weights = ("LPBQ derived from the quantize stage's codes (4-bit block scales x an fp32 scale per channel); "
               "quantization.lpbq_vs_stage_codes says how many codes it keeps and its error against them")
    storage = LPBQ
    runtime = "onnxruntime-qnn on the QNN HTP backend (its x86_64 simulator here)"
    disk_factor = 1.2
    disk_copies = 3.0  # the context binaries, their source graphs, and every unit's quantized graph until the join
    fp32_graph_on_disk = False  # one unit's fp32 graph at a time (preflight counts the largest: a vocab-sized one)
    needs_calibration_text = True
    speed_elsewhere = ("not measured (the HTP here is a simulator); the Qualcomm profile reports the bandwidth "
                       "roofline, and profiling/ measures it on a phone")
    shares_eval_slice = False
    scored_while_lowering = False  # its report compares it with the CPU artifact, which may still lower

    def check(self, scheme: QuantScheme | None, options: Mapping[str, Any]) -> None:
        from llamaship.runtime.qnn_session import available

        if scheme is None or scheme.bits != 4:
            raise UnsupportedError("--format qnn is w4a16 (4-bit LPBQ weights, 16-bit activations): "
                                   "not available with fp32 or 8-bit weights")
        if not available():
            raise UnsupportedError("--format qnn needs onnxruntime-qnn (Linux x86_64 or Windows): "
                                   "`pip install onnxruntime-qnn==2.7.0`")

    def export(self, job: ExportJob) -> Exported:
        from llamaship.export.qnn import AR, CONFIG, GRAPHS, export_qnn, scheme_name

        assert job.scheme is not None  # check() refused fp32
        soc_model, htp_arch, limit_gb = qnn_target(job.profiles)
        res = export_qnn(job.ckpt.spec, job.ckpt.state, job.ckpt.tokenizer, job.scheme, job.folder / FOLDER,
                         max_context=job.max_context, soc_model=soc_model, progress=job.progress,
                         quantized=job.quantized, context_limit_gb=limit_gb)
        cfg = res["config"]
        parts = cfg["parts"]
        device_files = [f"{FOLDER}/{p[k]}" for p in parts for k in (*GRAPHS, "context_binary")]
        entry = {
            "format": self.name, "path": f"{FOLDER}/{CONFIG}", "folder": FOLDER, "config": f"{FOLDER}/{CONFIG}",
            "device_files": device_files,
            "source_files": [f"{FOLDER}/{p['source'][k]}" for p in parts for k in (*GRAPHS, "data")],
            "scheme": scheme_name(job.scheme),
            "backend": f"QNN HTP (Hexagon {htp_arch}, {soc_model}) through onnxruntime-qnn's EP context",
            "soc_model": soc_model, "htp_arch": htp_arch, "qnn_sdk_version": cfg["qnn_sdk_version"],
            "max_context": job.max_context, "max_seq_len": AR, "parts": len(parts),
            "part_bytes": [p["bytes"]["context_binary"] for p in parts],
            "graphs": {g: {"tokens_per_call": ar, "files": [f"{FOLDER}/{p[g]}" for p in parts],
                           "when": cfg["when"][g]} for g, ar in GRAPHS.items()},
            "inputs": cfg["inputs"], "outputs": cfg["outputs"], "usage": cfg["usage"],
            "quantization": res["quantization"],
            "shared_weights_check": "each part's prefill and decode EPContext models point at one context binary "
                                    "and list their source graphs' inputs and outputs; the simulator cannot load "
                                    "a weight-sharing binary, so validation runs the source graphs",
        }
        return Exported(entry, res["timings"])

    def load_module(self, folder: Path, art: Mapping[str, Any]) -> Module:
        from llamaship.targets.qnn_runtime import QnnModule

        return QnnModule(folder, dict(art))

    def generate(self, req: Request) -> Generated:
        import sys

        if req.smoke:
            req.max_new_tokens = min(req.max_new_tokens, SMOKE_TOKENS)
        else:
            print("(QNN HTP simulator on x86_64: it compiles each graph on first use, and a 128-token call takes "
                  "seconds to minutes)",
                  file=sys.stderr)
        from llamaship.targets.qnn_runtime import QnnModule

        with QnnModule(req.folder, dict(req.art)) as module:
            gen = greedy(module, req, "onnxruntime-qnn, QNN HTP backend (x86_64 simulator)" if req.smoke
                         else "QNN HTP simulator on this host (not phone speed)")
            gen.stats = gen.stats | {"graph_calls": module.calls()}  # the prompt in prefill calls, then decode calls
        if req.smoke:
            gen.stats = gen.stats | {"note": SIMULATOR_NOTE}
        return gen

    def accuracy(self, ctx: Any, art: Mapping[str, Any]) -> dict[str, Any]:
        """On a short slice of its own (one prompt chunk takes ~35 s for SmolLM2 on the simulator):
        windows of two chunks, the second scored with the first in the cache. The bundle's CPU
        artifact is scored on the same slice, so the gate can compare the two."""
        from llamaship.targets import accuracy
        from llamaship.targets.reference import streamed_logprobs

        ckpt, progress = ctx.ckpt, ctx.progress
        chunk = art["max_seq_len"]
        n_tokens = min(p.npu_eval_tokens for p in ctx.profiles)
        npu_slice = accuracy.make_slice(ckpt.tokenizer, n_tokens, 2 * chunk)
        progress(f"NPU accuracy slice: {npu_slice.describe()} (HTP simulator: ~{npu_slice.n_windows * 2} chunk calls)")
        reference = streamed_logprobs(ckpt.spec, ckpt.state, npu_slice, ckpt.sha256(), progress)
        first: list[Any] = []  # the first window's logits, from the prefill graph

        def forward(tokens: list[int], start: int) -> Any:
            logits = module.forward(tokens, start)
            if not first:
                first.append(logits)
            return logits

        with self.load_module(ctx.folder, art) as module:  # type: ignore[attr-defined]
            acc = accuracy.evaluate_chunked(forward, npu_slice, reference, progress).to_json()
            acc["decode_graph"] = decode_check(module, npu_slice, reference, first[0], progress)
        cpu = next((a for a in ctx.manifest.get("artifacts", []) if ctx.backend_of(a).cpu_reference), None)
        if cpu is not None and cpu["max_context"] >= npu_slice.window:
            progress(f"accuracy of {cpu['path']} on the NPU slice, for the NPU/CPU comparison")
            cpu_module = ctx.backend_of(cpu).load_module(ctx.folder, cpu)
            cpu_acc = accuracy.evaluate_stepwise(cpu_module.forward, npu_slice, reference, progress)
            acc["cpu_artifact"] = {"path": cpu["path"], **cpu_acc.to_json()}
            acc["kld_ratio_vs_cpu"] = acc["mean_kld"] / max(cpu_acc.mean_kld, 1e-9)
        return acc
