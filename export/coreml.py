"""Core ML export: a stateful ML program (.mlpackage) for iOS 18 / macOS 15 with the KV cache held
as Core ML state and 4-bit per-block weights.

Why a separate forward (`CoreMLLlama`) instead of `Llama` itself: Core ML programs cannot read a
scalar out of a tensor to index with (our `input_pos[0].item()`), so positions come from shapes, the
way Apple's own stateful Llama sample does it. The app feeds `input_ids` [1, T] and `causal_mask`
[1, 1, T, past + T] (0 where a query may attend, -inf elsewhere); past = mask width - T is where the
new keys/values are written into the `k_cache` / `v_cache` states [n_layers, n_kv_heads, max_context,
head_dim]. One program serves prefill (T up to max_seq_len) and decode (T = 1) through flexible
shapes. It shares the weights of the module every other format is exported from.

4-bit: coremltools' `linear_quantize_weights` (int4, per_block along the input axis, block size from
the shared `QuantScheme`), which stores each weight as `constexpr_blockwise_shift_scale`; the saved
program is read back to check that every linear weight got exactly the requested block. Always
asymmetric (a scale and an int4 offset per block, +0.125 bits per weight): coremltools' symmetric
mode uses only 15 of the 16 levels ([-7, 7]); on SmolLM2 (1024-token WikiText-2 slice) it gave KLD
0.309 and answered "The capital of France is" with " located in the heart of...", asymmetric KLD
0.237 and " Paris." (SmolLM2's weights were Q4_1, itself asymmetric: its margin is flattering).

From 1B parameters on (`STREAMED_PARAMS`), that route does not fit a 24 GB machine: the traced fp32
program alone is 4 bytes per parameter and `linear_quantize_weights` held ~5 bytes per parameter
more (7.5 GiB for a 1.5B-parameter slice of Llama 3 8B). There the weights are quantized block by
block as they are loaded, with torchao (asymmetric int4 groups, as the ExecuTorch Core ML delegate
stores them), their values moved to memory-mapped files, and the module goes through torch.export
into coremltools, which maps torchao's int4 groups straight to `constexpr_blockwise_shift_scale`:
no float copy of the model exists at any point. Same inputs, states and output as the small route.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaship.bundle import work_dir
from llamaship.errors import ExportError, UnsupportedError
from llamaship.export.coreml_common import MASK_MIN, MIN_TARGET, StatefulLlama, weight_only
from llamaship.export.llama.model import build_model
from llamaship.export.llama.spec import ModelSpec
from llamaship.quantize.scheme import QuantScheme

STREAMED_PARAMS = 1_000_000_000  # from here on: torchao block by block + torch.export (see above)


class CoreMLLlama(StatefulLlama):
    """Positions from shapes: `causal_mask` [1, 1, T, past + T] says where the T new tokens go."""

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        seqlen = input_ids.shape[1]
        end = causal_mask.shape[-1]
        start = end - seqlen
        cos, sin = self.model.rope_cos[start:end], self.model.rope_sin[start:end]
        return self.layers_forward(input_ids, seqlen, cos, sin, causal_mask, start, end)


def causal_mask(past: int, seqlen: int, dtype: Any = np.float32) -> np.ndarray:
    """The mask an app feeds: query i (absolute past + i) attends to key slots j <= past + i."""
    q = np.arange(seqlen)[:, None] + past
    k = np.arange(past + seqlen)[None, :]
    # reshape, not [None, None]: the latter gives size-1 dims stride 0, which ExecuTorch rejects
    return np.where(k <= q, 0.0, MASK_MIN).astype(dtype).reshape(1, 1, seqlen, past + seqlen)


def convert(
    spec: ModelSpec, state: dict[str, torch.Tensor], max_context: int, max_seq_len: int,
    compute_fp16: bool = True,
) -> Any:
    """Trace the Core ML forward and convert it to a float ML program (an `MLModel`)."""
    import coremltools as ct

    model = CoreMLLlama(build_model(spec, state, max_context=max_context, impl="torch")).eval()
    example = (torch.zeros((1, 2), dtype=torch.int32), torch.from_numpy(causal_mask(0, 2)))
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    seq = ct.RangeDim(lower_bound=1, upper_bound=max_seq_len, default=1)
    ctx = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    cache_shape = (spec.n_layers, spec.n_kv_heads, max_context, spec.head_dim)
    try:
        return ct.convert(
            traced,
            inputs=[ct.TensorType(name="input_ids", shape=(1, seq), dtype=np.int32),
                    ct.TensorType(name="causal_mask", shape=(1, 1, seq, ctx), dtype=np.float16)],
            outputs=[ct.TensorType(name="logits", dtype=np.float16)],
            states=[ct.StateType(wrapped_type=ct.TensorType(shape=cache_shape, dtype=np.float16), name="k_cache"),
                    ct.StateType(wrapped_type=ct.TensorType(shape=cache_shape, dtype=np.float16), name="v_cache")],
            minimum_deployment_target=getattr(ct.target, MIN_TARGET),
            compute_precision=ct.precision.FLOAT16 if compute_fp16 else ct.precision.FLOAT32,
            skip_model_load=True,
        )
    except Exception as exc:
        raise ExportError(f"coremltools could not convert {spec.name}: {exc}") from exc


def convert_streamed(
    spec: ModelSpec, state: dict[str, torch.Tensor], scheme: QuantScheme, max_context: int,
    max_seq_len: int, work: Path, progress: Callable[[str], None] = print,
) -> Any:
    """Quantize while loading (torchao weight-only int4 groups, values file-backed in `work`),
    torch.export, convert: the memory-bounded route for 7B/8B (module docstring)."""
    import coremltools as ct
    from torch.export import Dim

    from llamaship.quantize.torchao_quant import group_quantizer

    scheme.check_fits(spec)
    on_loaded = group_quantizer(weight_only(scheme), offload_dir=work)
    model = CoreMLLlama(build_model(spec, state, max_context=max_context, impl="torch",
                                    on_loaded=on_loaded)).eval()
    progress("Core ML, streamed: tracing with torch.export")
    # torch.export specializes a mask as wide as the cache (it traces a different branch there);
    # the program's ops are the same for that width, so the range is widened after conversion
    seq = Dim("seq_len", min=1, max=min(max_seq_len, max_context - 1))
    ctx = Dim("context", min=1, max=max_context - 1)
    example = (torch.zeros((1, 2), dtype=torch.int32), torch.from_numpy(causal_mask(0, 2)))
    try:
        with torch.no_grad():
            ep = torch.export.export(model, example, dynamic_shapes=({1: seq}, {2: seq, 3: ctx}), strict=False)
            ep = ep.run_decompositions({})
        progress("Core ML, streamed: converting with coremltools (fp16 compute, KV cache as state)")
        mlmodel = ct.convert(
            ep,
            inputs=[ct.TensorType(name="input_ids", dtype=np.int32),
                    ct.TensorType(name="causal_mask", dtype=np.float16)],
            outputs=[ct.TensorType(name="logits", dtype=np.float16)],
            minimum_deployment_target=getattr(ct.target, MIN_TARGET),
            compute_precision=ct.precision.FLOAT16,
            skip_model_load=True,
        )
    except Exception as exc:
        raise ExportError(f"coremltools could not convert {spec.name} (streamed route): {exc}") from exc
    pb = mlmodel.get_spec()
    for inp in pb.description.input:
        if inp.name == "causal_mask":
            inp.type.multiArrayType.shapeRange.sizeRanges[3].upperBound = max_context
    return ct.models.MLModel(pb, weights_dir=mlmodel.weights_dir, skip_model_load=True)


def quantize(mlmodel: Any, scheme: QuantScheme) -> tuple[Any, dict[str, Any]]:
    """int4 per-block linear weights; embedding and lm_head per the scheme. Returns the quantized
    model and what was decided for the embedding/lm_head.

    coremltools merges identical constants, so a tied model's embedding and lm_head are one matrix
    that both `gather` and the last `linear` read: it gets the lm_head's bits (the more
    error-sensitive consumer) and is stored once."""
    import coremltools.optimize as cto

    if scheme.bits != 4:
        raise UnsupportedError(f"Core ML export supports 4-bit linear weights, not {scheme.name}")
    mode = "linear"  # always asymmetric: see the module docstring
    def config(bits: int) -> Any:
        if bits == 0:
            return None
        if bits == 4:
            return cto.coreml.OpLinearQuantizerConfig(mode=mode, dtype="int4", granularity="per_block",
                                                      block_size=scheme.group_size, weight_threshold=0)
        return cto.coreml.OpLinearQuantizerConfig(mode=mode, dtype="int8", granularity="per_channel",
                                                  weight_threshold=0)

    embedding, head = _weight_const(mlmodel, "embedding"), _weight_const(mlmodel, "lm_head")
    shared = embedding is not None and embedding == head
    by_name: dict[str, Any] = {}
    if embedding is not None and not shared:
        by_name[embedding] = config(scheme.embedding_bits)
    if head is not None:
        by_name[head] = config(scheme.lm_head_bits)
    cfg = cto.coreml.OptimizationConfig(op_type_configs={"linear": config(4)}, op_name_configs=by_name)
    decided = {"embedding_bits": scheme.lm_head_bits if shared else scheme.embedding_bits,
               "lm_head_bits": scheme.lm_head_bits, "embedding_shared_with_lm_head": shared}
    return cto.coreml.linear_quantize_weights(mlmodel, cfg), decided


def _weight_const(mlmodel: Any, which: str) -> str | None:
    """Name of the const op holding the embedding table (gather's input) or lm_head (last linear)."""
    ops = list(mlmodel._mil_program.functions["main"].operations)
    if which == "embedding":
        cands = [op.x for op in ops if op.op_type == "gather" and op.x.op is not None
                 and op.x.op.op_type == "const" and op.x.rank == 2]
    else:
        linears = [op for op in ops if op.op_type == "linear"]
        cands = [linears[-1].weight] if linears else []
    return cands[0].op.name if cands and cands[0].op is not None else None


def export_coreml(
    spec: ModelSpec, state: dict[str, torch.Tensor], scheme: QuantScheme | None, out: Path,
    max_context: int, max_seq_len: int, progress: Callable[[str], None] = print,
    streamed: bool | None = None,
) -> dict[str, Any]:
    """Write `out` (.mlpackage). Returns timings and the quantization read back from the program.
    `streamed` (default: from `STREAMED_PARAMS` parameters on) picks the memory-bounded route."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if streamed is None:
        streamed = scheme is not None and spec.param_count() >= STREAMED_PARAMS
    if streamed and scheme is None:
        raise UnsupportedError("the streamed Core ML route quantizes while loading: it needs a 4-bit scheme")
    work = work_dir(out.parent, "llamaship-weights") if streamed else None
    try:
        if streamed and scheme is not None:
            progress(f"Core ML, streamed: torchao int4 groups of {scheme.group_size} block by block "
                     f"(values memory-mapped from {work}), torch.export, coremltools")
            mlmodel = convert_streamed(spec, state, scheme, max_context, max_seq_len, work, progress)
            decided = {"embedding_bits": scheme.embedding_bits, "lm_head_bits": scheme.lm_head_bits,
                       "embedding_shared_with_lm_head": False, "quantizer": "torchao (streamed)"}
            timings["convert_s"] = time.perf_counter() - t
        else:
            progress("converting to a Core ML ML program (coremltools, fp16 compute, KV cache as state)")
            mlmodel = convert(spec, state, max_context, max_seq_len)
            timings["convert_s"] = time.perf_counter() - t
            if scheme is not None:
                t = time.perf_counter()
                progress(f"quantizing Core ML weights: int4 per_block {scheme.group_size}")
                mlmodel, decided = quantize(mlmodel, scheme)
                timings["quantize_s"] = time.perf_counter() - t
        t = time.perf_counter()
        mlmodel.save(str(out))
        timings["save_s"] = time.perf_counter() - t
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    quant = describe_quantization(out)
    if scheme is not None:
        quant |= decided
    if scheme is not None:
        blocks = [w for w in quant["weights"] if w["feeds"] == ["linear"]]
        head8 = [w for w in blocks if w["dtype"] == "int8"]  # an untied lm_head, int8 per channel
        bad: list[Any] = [w for w in blocks if w not in head8
                          and (w["dtype"] != "int4" or w["block"] != scheme.group_size)]
        if len(head8) > (scheme.lm_head_bits == 8):
            bad += head8
        n_linear = 7 * spec.n_layers + (scheme.lm_head_bits == 4)
        if len(blocks) < 7 * spec.n_layers:
            bad.append(f"{len(blocks)} quantized linear weights, expected at least {n_linear}")
        if bad:
            raise ExportError(f"{out}: {len(bad)} linear weights not int4 block {scheme.group_size}: {bad[:3]}")
    return {"timings": timings, "quantization": quant}


def describe_quantization(package: Path) -> dict[str, Any]:
    """Every weight of the saved program as stored: constexpr_blockwise_shift_scale weights with
    bits, block and symmetric/asymmetric, what they feed, and the float parameters left."""
    from coremltools.converters.mil.mil import types

    from llamaship.runtime.mil_eval import Program

    prog = Program(package)
    weights = []
    for op in prog.ops:
        if op.op_type != "constexpr_blockwise_shift_scale":
            continue
        data, scale = op.inputs["data"], op.inputs["scale"]
        blocks = [d // s for d, s in zip(data.val.shape, scale.val.shape, strict=True)]
        weights.append({"name": op.outputs[0].name, "feeds": prog.consumers(op.outputs[0]),
                        "shape": list(data.val.shape), "dtype": types.builtin_to_string(data.dtype),
                        "block": max(blocks), "symmetric": "offset" not in op.inputs})
    floats = sum(int(op.outputs[0].val.size) for op in prog.ops
                 if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray)
                 and op.outputs[0].val.ndim >= 1 and op.outputs[0].val.dtype in (np.float16, np.float32)
                 and not any(c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops))
    return {"weights": weights, "float_params": floats}
