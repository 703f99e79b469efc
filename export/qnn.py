"""Qualcomm NPU export: a w4a16 QDQ ONNX graph compiled into a QNN context binary for the Hexagon
HTP of a chosen SoC, through onnxruntime-qnn (whose Linux x86_64 wheel runs the HTP backend as a
simulator, so the compiled binary is also what validation runs here).

Steps (each reported): the static-shape float graph (qnn_graph.py) -> calibration on WikiText-2
*validation* text (never the test split the accuracy gate scores) -> onnxruntime's QNN QDQ
quantizer with 16-bit activations -> every block linear replaced by 4-bit LPBQ weights (qnn_lpbq.py)
-> EP-context compile (`ep.context_enable=1`) -> the context model reloaded in a fresh session must
give the compile session's logits bit for bit.

Precision choices, from the per-layer error table (`bench/qnn_layer_error.py`, SmolLM2-135M):
  * activations uint16 per tensor everywhere, the residual stream included: with the prescaled
    RMSNorm every tensor's 16-bit SQNR is >= 34 dB (the residual at layer 11-12, which carries the
    first token's |h| ~ 24,500), most >= 60 dB; int8 weights + these activations give KLD 0.018;
  * block linears: int4 LPBQ, block = the scheme's group size (symmetric: the HTP's format);
  * lm_head: int8 per output channel (the most error-sensitive matrix, as in every other format);
  * embedding: a 16-bit table (the Gather's data; per-channel 8-bit Gather tables are not a QNN
    HTP form the quantizer emits).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaship.data import CALIB_FILE, data_file
from llamaship.errors import ExportError, RuntimeFailure, UnsupportedError
from llamaship.export.llama.model import build_model
from llamaship.export.llama.spec import ModelSpec
from llamaship.export.llama.tokenizer import Tokenizer
from llamaship.export.qnn_graph import MASK_MIN, StaticCacheRunner, StaticLlama, export_float_onnx
from llamaship.progress import advance
from llamaship.quantize.checkpoint import QuantizedCheckpoint
from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.stage import stage_output

AR = 128  # prompt-processing chunk (tokens per call): AI Hub's Llama prompt processor size
CALIB_SEQUENCES = 2  # each of `ctx` tokens, run chunk by chunk with the cache filled
CTX_MODEL = "model_ctx.onnx"  # the EPContext model; its binary is model_ctx_qnn.bin beside it
CONFIG = "qnn_config.json"
MAX_PARAMS = 2_000_000_000  # the float graph and the quantizer hold fp32 weights: ~4 bytes x 3 per param
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
    if spec.param_count() > MAX_PARAMS:
        raise UnsupportedError(
            f"{spec.name} has {spec.param_count() / 1e9:.1f}B parameters: the qnn route builds the fp32 graph "
            f"in memory and is limited to {MAX_PARAMS / 1e9:.0f}B on this machine (a streamed route for "
            "7B/8B is not built yet); export --format executorch for the Snapdragon CPU instead")
    if spec.dim % scheme.group_size or spec.hidden_dim % scheme.group_size:
        raise UnsupportedError(f"LPBQ block {scheme.group_size} does not divide {spec.name}'s widths")


def _runner(session: Any) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    return lambda feeds: session.run(None, feeds)


def counted(items: Iterator[Any], progress: Callable[[str], None], label: str, total: int) -> Iterator[Any]:
    """`items`, reporting each one handed out (a bar with ETA on a terminal)."""
    for i, item in enumerate(items, 1):
        yield item
        advance(progress, label, min(i, total), total)


def calibration_feeds(run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], tokenizer: Tokenizer,
                      spec: ModelSpec, ctx: int, n_sequences: int) -> Iterator[dict[str, np.ndarray]]:
    """Inputs of every chunk of `n_sequences` validation-text sequences of `ctx` tokens, each chunk
    with the cache the float graph filled before it: so the calibrated ranges cover first tokens
    (SmolLM2's massive activation), padded chunks and late positions alike. Lazy: at 2048 tokens of
    context one chunk's inputs are ~90 MB for SmolLM2."""
    text = data_file(CALIB_FILE).read_text()
    ids = tokenizer.encode(text[: n_sequences * ctx * 12], bos=False)
    for s in range(n_sequences):
        seq = ids[s * ctx : (s + 1) * ctx]
        if len(seq) < AR:
            break
        runner = StaticCacheRunner(run, AR, ctx, spec.n_layers, spec.n_kv_heads, spec.head_dim)
        for c in range(0, min(len(seq), ctx - AR + 1), AR):  # a chunk may start with <= ctx - AR cached
            chunk = seq[c : c + AR]
            yield {k: v.copy() for k, v in runner.feeds(chunk).items()}  # the runner's cache moves on
            runner.forward(chunk, c)


def quantize_w4a16(float_model: Path, qdq_model: Path, feeds: Iterator[dict[str, np.ndarray]],
                   scheme: QuantScheme, linears: str = "lpbq",
                   quantized: QuantizedCheckpoint | None = None) -> dict[str, Any]:
    """uint16 activations from calibration; linear weights int8 per channel first (onnxruntime's
    QNN quantizer), then the block linears' weights swapped for 4-bit LPBQ, derived from the
    quantize stage's codes when `quantized` is given (else from the float weights). `linears`
    "int8" or "int4_channel" stop short of that (the error table's ablations)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from llamaship.export.qnn_lpbq import lpbq_distance, lpbq_from_codes, lpbq_nodes

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.count = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(feeds, None)
            self.count += feed is not None
            return feed

    graph = onnx.load(str(float_model), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    block_linears = {n.input[1]: n.name for n in graph.node
                     if n.op_type == "MatMul" and n.input[1] in inits and n.name.startswith("/blocks.")}
    head = [n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and n.input[1] not in block_linears]
    embedding = [n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                 and n.input[0].endswith("tok_embeddings.weight")]
    if len(head) != 1 or len(embedding) != 1:
        raise ExportError(f"{float_model}: expected one lm_head MatMul and one embedding Gather, found "
                          f"{len(head)} and {len(embedding)}")
    linear_type = QuantType.QInt4 if linears == "int4_channel" else QuantType.QInt8
    overrides: dict[str, list[dict[str, Any]]] = {
        w: [{"quant_type": linear_type, "axis": 1, "symmetric": True}] for w in block_linears}
    overrides[head[0]] = [{"quant_type": QuantType.QInt8, "axis": 1, "symmetric": True}]
    overrides[embedding[0]] = [{"quant_type": QuantType.QUInt16}]
    reader = Reader()
    config = get_qnn_qdq_config(str(float_model), reader, activation_type=QuantType.QUInt16,
                                weight_type=QuantType.QUInt8, init_overrides=overrides)
    config.use_external_data_format = True
    quantize(str(float_model), str(qdq_model), config)

    described = {"activations": "uint16 per tensor (calibrated min/max)",
                 "linears": f"int4 LPBQ, block {scheme.group_size} (4-bit block scales x fp32 channel scale)",
                 "lm_head": "int8 per channel" if scheme.lm_head_bits == 8 else f"int4 LPBQ, block {scheme.group_size}",
                 "embedding": "uint16 per tensor", "n_block_linears": len(block_linears),
                 "calibration": f"{reader.count} chunks of {AR} tokens of {CALIB_FILE}"}
    if linears != "lpbq":
        return described | {"linears": f"{linears} per channel", "lm_head": "int8 per channel"}
    swap = set(block_linears) if scheme.lm_head_bits == 8 else set(block_linears) | set(head)
    float_weights = {i.name: i for i in onnx.load(str(float_model)).graph.initializer if i.name in swap}
    model = onnx.load(str(qdq_model))
    nodes, dropped = [], set()
    distance: dict[str, list[float]] = {}
    for node in model.graph.node:
        w = node.input[0].removesuffix("_quantized") if node.op_type == "DequantizeLinear" else ""
        if w in swap:
            tensor = float_weights[w]
            prefix = (block_linears.get(w) or "/lm_head").strip("/").replace("/", "_")
            source: Any = numpy_helper.to_array(tensor)
            if quantized is not None:
                qt = quantized.get(state_name(block_linears.get(w)))
                codes, scales = qt.codes.numpy(), qt.scales.numpy()
                source = lpbq_from_codes(codes, scales, scheme.group_size)
                for key, v in lpbq_distance(codes, scales, scheme.group_size, source).items():
                    distance.setdefault(key, []).append(v)
            new_nodes, new_inits = lpbq_nodes(prefix, source, scheme.group_size, node.output[0])
            nodes += new_nodes
            model.graph.initializer.extend(new_inits)
            dropped |= set(node.input)
        else:
            nodes.append(node)
    if len(dropped) != 3 * len(swap):
        raise ExportError(f"{qdq_model}: found {len(dropped) // 3} of {len(swap)} linear weights to make 4-bit")
    keep = [i for i in model.graph.initializer if i.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for stale in qdq_model.parent.glob(qdq_model.name + "*"):
        stale.unlink()
    onnx.save(model, str(qdq_model), save_as_external_data=True, all_tensors_to_one_file=True,
              location=qdq_model.name + ".data", size_threshold=1024)
    if distance:
        described["lpbq_vs_stage_codes"] = {
            "codes_kept": round(float(np.mean(distance["codes_kept"])), 4),
            "relative_error_mean": round(float(np.mean(distance["relative_error"])), 5),
            "relative_error_max": round(float(np.max(distance["relative_error"])), 5)}
    return described


def state_name(node_name: str | None) -> str:
    """The checkpoint name of a block linear from its graph node ("/blocks.3/wq/MatMul"), or the
    lm_head's ("output.weight") for None."""
    if node_name is None:
        return "output.weight"
    m = re.match(r"/blocks\.(\d+)/(?:.*/)?(w[qkvo123])/MatMul", node_name)
    if m is None:
        raise ExportError(f"cannot tell which checkpoint weight the graph node {node_name} multiplies by")
    return f"layers.{m[1]}.{'attention' if m[2] in ('wq', 'wk', 'wv', 'wo') else 'feed_forward'}.{m[2]}.weight"


def compile_and_check(qdq_model: Path, ctx_model: Path, soc_model: str,
                      feed: dict[str, np.ndarray]) -> tuple[bool, float]:
    """Compile the context binary, run `feed` on the compile session and on a fresh session of the
    saved context model: (bit-identical?, max |difference|). Runs in a child process (in_child)."""
    from llamaship.runtime.qnn_session import compile_context, htp_session

    first = compile_context(qdq_model, ctx_model, soc_model).run(None, feed)
    again = htp_session(ctx_model, soc_model).run(None, feed)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(first, again, strict=True))
    return diff == 0.0 and all(np.array_equal(a, b) for a, b in zip(first, again, strict=True)), diff


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
) -> dict[str, Any]:
    """Writes `out_dir`/model_ctx.onnx + model_ctx_qnn.bin + qnn_config.json. `max_context` is the
    cache size the graph is compiled for (past slots = max_context - 128). The float graph holds
    the quantize stage's dequantized weights (so activations calibrate on what will run) and LPBQ
    derives from its codes; without `quantized` the stage runs here."""
    import onnxruntime as ort

    from llamaship.runtime.qnn_session import in_child

    check_scheme(scheme, spec)
    if max_context < 2 * AR:
        raise UnsupportedError(f"the qnn graph needs --max-context >= {2 * AR} (two prompt chunks of {AR}); "
                               f"got {max_context}")
    timings: dict[str, float] = {}
    work = out_dir.parent / f".{out_dir.name}-work"
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()
    try:
        quantized = stack.enter_context(stage_output(spec, state, scheme, quantized, out_dir.parent, progress,
                                                     tokenizer))
        t = time.perf_counter()
        progress(f"qnn: float graph of the {scheme.algorithm} weights (prompt chunk {AR}, context {max_context})")
        model = build_model(spec, quantized.state(state), max_context=max_context, impl="torch", full_logits=True)
        export_float_onnx(StaticLlama(model, AR, max_context).eval(), work / "float.onnx")
        del model
        timings["float_graph"] = time.perf_counter() - t

        t = time.perf_counter()
        float_sess = ort.InferenceSession(str(work / "float.onnx"), providers=["CPUExecutionProvider"])
        chunks = calib_sequences * len(range(0, max_context - AR + 1, AR))
        feeds = counted(calibration_feeds(_runner(float_sess), tokenizer, spec, max_context, calib_sequences),
                        progress, "qnn: calibration chunks", chunks)
        progress(f"qnn: calibrating 16-bit activations on {calib_sequences} x {max_context} tokens of "
                 f"{CALIB_FILE} (chunks of {AR}), then 4-bit LPBQ weights")
        quant = quantize_w4a16(work / "float.onnx", work / "qdq.onnx", feeds, scheme, quantized=quantized)
        stack.close()
        first_feed = next(calibration_feeds(_runner(float_sess), tokenizer, spec, max_context, 1))
        del float_sess, feeds
        timings["quantize"] = time.perf_counter() - t

        t = time.perf_counter()
        ctx_model = out_dir / CTX_MODEL
        for stale in (ctx_model, *out_dir.glob("*_qnn.bin")):  # the EP refuses to overwrite
            stale.unlink(missing_ok=True)
        progress(f"qnn: compiling the context binary for the HTP of {soc_model} (simulator backend), then the "
                 "reload check: one prompt chunk on the compile session and on a fresh one (~1-2 min)")
        try:
            identical, diff = in_child(compile_and_check, work / "qdq.onnx", ctx_model, soc_model, first_feed)
        except RuntimeFailure as e:
            raise ExportError(f"compiling for the {soc_model} HTP failed: {e}") from e
        if not identical:
            raise ExportError(f"{ctx_model}: reloaded context binary gives different outputs (max |diff| {diff})")
        timings["compile_and_reload_check"] = time.perf_counter() - t
    finally:
        import shutil

        stack.close()
        shutil.rmtree(work, ignore_errors=True)
    binaries = sorted(p.name for p in out_dir.glob("*.bin"))
    config = {
        "ep": "QNNExecutionProvider (onnxruntime-qnn 2.x plugin EP, HTP backend)",
        "soc_model": soc_model, "model": CTX_MODEL, "context_binaries": binaries,
        "prompt_chunk": AR, "context": max_context, "n_layers": spec.n_layers, "n_kv_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim, "vocab_size": spec.vocab_size, "past_slots": max_context - AR,
        "mask_value": MASK_MIN,
        "inputs": {
            "input_ids": f"int32 [1, {AR}]: the chunk's tokens, left-aligned, padded with any id",
            "position_ids": f"int32 [1, {AR}]: past + i",
            "attention_mask": f"float32 [1, 1, {AR}, {max_context}]: columns 0..past-1 are the cache "
                              f"slots (0 = filled, {MASK_MIN} = empty), the last {AR} columns are the chunk "
                              f"(causal: 0 where key <= query, else {MASK_MIN})",
            "past_keys": f"float32 [{spec.n_layers}, {spec.n_kv_heads}, {max_context - AR}, {spec.head_dim}]",
            "past_values": f"float32 [{spec.n_layers}, {spec.n_kv_heads}, {max_context - AR}, {spec.head_dim}]",
        },
        "outputs": {
            "logits": f"float32 [1, {AR}, {spec.vocab_size}] (rows of padded positions are junk)",
            "new_keys": f"float32 [{spec.n_layers}, {spec.n_kv_heads}, {AR}, {spec.head_dim}]: write the "
                        "first n rows into past slots past..past+n-1",
            "new_values": f"float32 [{spec.n_layers}, {spec.n_kv_heads}, {AR}, {spec.head_dim}]",
        },
        "usage": "register onnxruntime-qnn as a plugin EP, add it for the HTP device with backend_path = "
                 "libQnnHtp.so, load model_ctx.onnx (it references the .bin beside it); feed the prompt in "
                 f"chunks of {AR}, then each new token as a chunk of 1 real token (padded)",
    }
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return {"timings": timings, "quantization": quant, "config": config, "reload_identical": True}
