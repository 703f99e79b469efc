"""Qualcomm NPU export: w4a16 QNN context binaries for the Hexagon HTP of a chosen SoC, through
onnxruntime-qnn (whose Linux x86_64 wheel runs the HTP backend as a simulator).

What a bundle's qnn/ folder holds, per part (qnn_parts.py: layer ranges, as many as the HTP's
per-context limit needs):
  * a prefill graph (128 tokens per call: the prompt) and a decode graph (1 token per call), both
    static instances of one quantized graph, so they carry the same weights and encodings;
  * one weight-sharing context binary holding both graphs (`ep.share_ep_contexts`), the EPContext
    models `part<k>_prefill_ctx.onnx` / `part<k>_decode_ctx.onnx` that an app loads, and
    `qnn_config.json` saying which graph to call when;
  * source/: the two quantized ONNX graphs over one weights file: what the binary was compiled
    from, what validation runs on the HTP simulator (which cannot load a weight-sharing context),
    and what an AI Hub compile job takes.

Steps (each reported): the units' float graphs, calibration and quantization, streamed unit by unit
(qnn_build.py) -> the parts joined and instanced (qnn_merge.py) -> the shared compile, then a read
back: each EPContext model's inputs and outputs must be its source graph's, and both graphs of a
part must point at one binary.

Precision choices, from the per-layer error table (`bench/qnn_layer_error.py`, SmolLM2-135M):
  * activations uint16 per tensor everywhere, the residual stream included: with the prescaled
    RMSNorm every tensor's 16-bit SQNR is >= 34 dB (the residual at layer 11-12, which carries the
    first token's |h| ~ 24,500), most >= 60 dB; int8 weights + these activations give KLD 0.018;
  * block linears: int4 LPBQ, block = the scheme's group size (symmetric: the HTP's format);
  * lm_head: int8 per output channel (the most error-sensitive matrix, as in every other format);
  * embedding and RoPE tables: 16-bit (the Gathers' data; per-channel 8-bit Gather tables are not
    a QNN HTP form the quantizer emits).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaship.errors import ExportError, RuntimeFailure, UnsupportedError
from llamaship.export.llama.spec import ModelSpec
from llamaship.export.llama.tokenizer import Tokenizer
from llamaship.export.qnn_build import StreamedBuild, UnitBuild, calibration_chunks
from llamaship.export.qnn_graph import MASK_MIN, StaticCacheRunner
from llamaship.export.qnn_parts import io_shapes, limit_bytes, part_bytes, part_io, plan_parts
from llamaship.export.qnn_units import units_of
from llamaship.quantize.checkpoint import QuantizedCheckpoint
from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.stage import stage_output

AR = 128  # prompt-processing chunk (tokens per call): AI Hub's Llama prompt processor size
GRAPHS = {"prefill": AR, "decode": 1}  # tokens per call of each graph
CALIB_SEQUENCES = 2  # each of `ctx` tokens, run chunk by chunk with the cache filled
CONFIG = "qnn_config.json"
SOURCE = "source"
SOC_MODELS = {"v73": "SM8550", "v75": "SM8650", "v79": "SM8750"}  # 8 Gen 2, 8 Gen 3, 8 Elite


def scheme_name(scheme: QuantScheme) -> str:
    return f"w4a16-lpbq-g{scheme.group_size}-emb16-head{scheme.lm_head_bits}"


def check_scheme(scheme: QuantScheme | None, spec: ModelSpec) -> None:
    if scheme is None or scheme.bits != 4:
        raise UnsupportedError("the qnn format is w4a16 only: use --quant 8da4w (the default) with --format qnn")
    if not scheme.symmetric:
        raise UnsupportedError("the qnn format's LPBQ weights are symmetric: drop --asymmetric for --format qnn")
    if scheme.lm_head_bits not in (4, 8):
        raise UnsupportedError("the qnn format quantizes lm_head to 8 (default) or 4 bits, not fp32")
    if spec.dim % scheme.group_size or spec.hidden_dim % scheme.group_size:
        raise UnsupportedError(f"LPBQ block {scheme.group_size} does not divide {spec.name}'s widths")


def calibration_feeds(run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], tokenizer: Tokenizer,
                      spec: ModelSpec, ctx: int, n_sequences: int) -> Iterator[dict[str, np.ndarray]]:
    """Whole-graph calibration inputs (bench/qnn_layer_error.py's StaticLlama graph): the chunks of
    qnn_build.calibration_chunks, each with the cache the float graph filled before it. Lazy: at
    2048 tokens of context one chunk's inputs are ~90 MB for SmolLM2."""
    runner = StaticCacheRunner(run, AR, ctx, spec.n_layers, spec.n_kv_heads, spec.head_dim)
    for chunk in calibration_chunks(tokenizer, AR, ctx, n_sequences):
        ids = chunk.ids[0, : chunk.n].tolist()
        if chunk.pos == 0:
            runner.reset()
        yield {k: v.copy() for k, v in runner.feeds(ids).items()}  # the runner's cache moves on
        runner.forward(ids, chunk.pos)


def _ctx_name(k: int, graph: str) -> str:
    return f"part{k}_{graph}_ctx.onnx"


def compile_shared(sources: list[Path], ctx_models: list[Path], soc_model: str) -> None:
    """Compiles the graphs into one weight-sharing context binary (`<first ctx stem>_qnn.bin`).
    Runs in a child process (in_child)."""
    from llamaship.runtime.qnn_session import htp_session

    sessions = []
    for i, (src, ctx) in enumerate(zip(sources, ctx_models, strict=True)):
        config = {"ep.context_enable": "1", "ep.context_file_path": str(ctx), "ep.context_embed_mode": "0",
                  "ep.share_ep_contexts": "1"}
        if i == len(sources) - 1:
            config["ep.stop_share_ep_contexts"] = "1"
        sessions.append(htp_session(src, soc_model, config))
    del sessions


def read_back(folder: Path, part: dict[str, Any]) -> dict[str, Any]:
    """What the shared build's EPContext models say, checked against the source graphs: the same
    inputs and outputs (names, element types, shapes), one context binary for both graphs, and the
    QNN SDK version it was compiled with (a context binary loads only on a matching QNN runtime)."""
    import onnx

    binaries, versions = set(), set()
    for graph in GRAPHS:
        ctx = onnx.load(str(folder / part[graph]), load_external_data=False).graph
        src = onnx.load(str(folder / part["source"][graph]), load_external_data=False).graph
        sig = lambda vis: [(v.name, v.type.tensor_type.elem_type,  # noqa: E731
                            [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in vis]
        if sig(ctx.input) != sig(src.input) or sig(ctx.output) != sig(src.output):
            raise ExportError(f"{folder / part[graph]}: its inputs/outputs differ from {part['source'][graph]}")
        nodes = [n for n in ctx.node if n.op_type == "EPContext"]
        if len(nodes) != len(ctx.node) or len(nodes) != 1:
            raise ExportError(f"{folder / part[graph]}: expected one EPContext node, found "
                              f"{[n.op_type for n in ctx.node]} (the HTP did not take the whole graph)")
        attrs = {a.name: a for a in nodes[0].attribute}
        binaries.add(attrs["ep_cache_context"].s.decode())
        versions.add(attrs["ep_sdk_version"].s.decode() if "ep_sdk_version" in attrs else "")
    if len(binaries) != 1:
        raise ExportError(f"part {part['index']}: the prefill and decode graphs point at different binaries "
                          f"{sorted(binaries)}: weights are not shared")
    return {"context_binary": binaries.pop(), "qnn_sdk_version": versions.pop()}


def _assemble(build: UnitBuild, parts: list[tuple[int, int]], spec: ModelSpec, ctx: int, out_dir: Path,
              progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Joins each part's quantized units into source/part<k>_{prefill,decode}.onnx + part<k>.data."""
    import onnx

    from llamaship.export.qnn_merge import join_units, save_instances

    described = []
    for k, (first, last) in enumerate(parts):
        inputs, outputs = part_io(first, last, spec.n_layers)
        units = [(u.name, onnx.load(str(build.qdq[u.name]))) for u in units_of(first, last, spec.n_layers)]
        model = join_units(units, inputs, outputs)
        del units
        shapes = {g: io_shapes(spec, first, last, ar, ctx) for g, ar in GRAPHS.items()}
        files = save_instances(model, out_dir / SOURCE, f"part{k}", shapes)
        del model
        described.append({"index": k, "layers": [first, last], "inputs": inputs, "outputs": outputs,
                          "source": {g: f"{SOURCE}/{f}" for g, f in files.items()} | {"data": f"{SOURCE}/part{k}.data"},
                          **{g: _ctx_name(k, g) for g in GRAPHS}})
        progress(f"qnn: part {k + 1}/{len(parts)} (layers {first}-{last - 1}) joined: "
                 f"{(out_dir / SOURCE / f'part{k}.data').stat().st_size / 1e6:.1f} MB of weights")
    return described


def export_qnn(
    spec: ModelSpec,
    state: Mapping[str, torch.Tensor],
    tokenizer: Tokenizer,
    scheme: QuantScheme,
    out_dir: Path,
    max_context: int,
    soc_model: str,
    calib_sequences: int = CALIB_SEQUENCES,
    progress: Callable[[str], None] = print,
    quantized: QuantizedCheckpoint | None = None,
    context_limit_gb: float | None = None,
    compile_parts: int | None = None,
) -> dict[str, Any]:
    """Writes `out_dir`/ (see the module docstring). `max_context` is the cache size the graphs are
    compiled for (past slots = max_context - tokens per call). The float units hold the quantize
    stage's dequantized weights (so activations calibrate on what will run) and LPBQ derives from
    its codes; without `quantized` the stage runs here. `compile_parts` compiles only the first N
    parts (bench/fullsize.py times one part of an 8B model and extrapolates): the folder is then
    not a complete artifact, and its config says so."""
    from llamaship.runtime.qnn_session import in_child

    check_scheme(scheme, spec)
    if max_context < 2 * AR:
        raise UnsupportedError(f"the qnn graph needs --max-context >= {2 * AR} (two prompt chunks of {AR}); "
                               f"got {max_context}")
    limit = limit_bytes(context_limit_gb)
    parts = plan_parts(spec, scheme, max_context, limit)
    work = out_dir.parent / f".{out_dir.name}-work"
    shutil.rmtree(work, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()
    try:
        quantized = stack.enter_context(stage_output(spec, state, scheme, quantized, out_dir.parent, progress,
                                                     tokenizer))
        chunks = calibration_chunks(tokenizer, AR, max_context, calib_sequences)
        progress(f"qnn: {len(parts)} part(s) of layers {[f'{a}-{b - 1}' for a, b in parts]} (HTP context limit "
                 f"{limit / 2**30:.2f} GiB); calibrating unit by unit on {len(chunks)} chunks of {AR} tokens")
        build = StreamedBuild(spec, quantized.state(state), quantized, scheme, AR, max_context, chunks, work,
                              progress).run()
        stack.close()
        t = time.perf_counter()
        described = _assemble(build, parts, spec, max_context, out_dir, progress)
        timings = build.timings | {"join_parts": time.perf_counter() - t}
        t = time.perf_counter()
        for part in described[:compile_parts]:
            for stale in out_dir.glob(f"part{part['index']}_*"):  # the EP refuses to overwrite
                stale.unlink()
            progress(f"qnn: compiling part {part['index'] + 1}/{len(described)}'s prefill and decode graphs into "
                     f"one weight-sharing context binary for the HTP of {soc_model}")
            try:
                in_child(compile_shared, [out_dir / part["source"][g] for g in GRAPHS],
                         [out_dir / part[g] for g in GRAPHS], soc_model)
            except RuntimeFailure as e:
                raise ExportError(f"compiling part {part['index']} for the {soc_model} HTP failed: {e}") from e
            part |= read_back(out_dir, part)
            part["bytes"] = {"context_binary": (out_dir / part["context_binary"]).stat().st_size,
                             "weights": (out_dir / part["source"]["data"]).stat().st_size,
                             "estimated": part_bytes(spec, scheme, max_context, *part["layers"])}
        timings["compile"] = time.perf_counter() - t
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)
    config = _config(spec, described[:compile_parts], max_context, soc_model, limit)
    if compile_parts is not None and compile_parts < len(described):
        config["incomplete"] = f"only {compile_parts} of {len(described)} parts compiled (a timing run)"
        config["parts_not_compiled"] = described[compile_parts:]
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return {"timings": timings, "quantization": build.described, "config": config}


def _config(spec: ModelSpec, parts: list[dict[str, Any]], ctx: int, soc_model: str, limit: int) -> dict[str, Any]:
    versions = {p["qnn_sdk_version"] for p in parts}
    return {
        "ep": "QNNExecutionProvider (onnxruntime-qnn 2.x plugin EP, HTP backend)",
        "soc_model": soc_model, "qnn_sdk_version": versions.pop() if len(versions) == 1 else sorted(versions),
        "context": ctx, "n_layers": spec.n_layers, "n_kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
        "dim": spec.dim, "vocab_size": spec.vocab_size, "mask_value": MASK_MIN,
        "htp_context_limit_bytes": limit, "parts": parts,
        "graphs": {g: {"tokens_per_call": ar, "past_slots": ctx - ar} for g, ar in GRAPHS.items()},
        "when": {"prefill": f"the prompt, in chunks of {AR} tokens (the last one padded); past slots {ctx - AR}",
                 "decode": f"each generated token, one per call, after the prompt; past slots {ctx - 1}"},
        "inputs": {
            "input_ids": "int32 [1, T]: the call's tokens (part 0), left-aligned, padded with any id",
            "hidden_<first layer>": "float32 [1, T, dim]: the previous part's hidden_<its last layer + 1> output",
            "position_ids": "int32 [1, T]: past + i",
            "attention_mask": f"float32 [1, 1, T, {ctx}]: columns 0..P-1 are the cache slots (0 = filled, "
                              f"{MASK_MIN} = empty), the last T columns are the call's tokens (causal)",
            "past_keys_<i>": f"float32 [{spec.n_kv_heads}, P, {spec.head_dim}]: layer i's cache, P = context - T",
            "past_values_<i>": f"float32 [{spec.n_kv_heads}, P, {spec.head_dim}]",
        },
        "outputs": {
            "logits": f"float32 [1, T, {spec.vocab_size}] (last part; rows of padded positions are junk)",
            "hidden_<last layer + 1>": "float32 [1, T, dim] (other parts): the next part's input",
            "new_keys_<i>": f"float32 [{spec.n_kv_heads}, T, {spec.head_dim}]: write the first n rows into "
                            "cache slots past..past+n-1",
            "new_values_<i>": f"float32 [{spec.n_kv_heads}, T, {spec.head_dim}]",
        },
        "usage": "link onnxruntime-qnn (the QNN libraries of qnn_sdk_version: a context binary does not load on "
                 "another QNN version); register it as a plugin EP for the HTP device with backend_path = "
                 "libQnnHtp.so and ep.share_ep_contexts = 1, load every part's prefill and decode EPContext "
                 "model (each pair shares one .bin); per call, run the parts in order, passing the hidden state "
                 "on; keep one cache per layer of context - 1 slots (the prefill graph reads its first "
                 f"context - {AR})",
    }
