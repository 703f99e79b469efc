"""Core ML export: a stateful ML program (.mlpackage) for iOS 18 / macOS 15 with the KV cache held
as Core ML state and 4-bit per-block weights.

Why a separate forward (`CoreMLLlama`) instead of `Llama` itself: Core ML programs cannot read a
scalar out of a tensor to index with (our `input_pos[0].item()`), so positions come from shapes, the
way Apple's own stateful Llama sample does it. The app feeds `input_ids` [1, T] and `causal_mask`
[1, 1, T, past + T] (0 where a query may attend, -inf elsewhere); past = mask width - T is where the
new keys/values are written into the `k_cache` / `v_cache` states [n_layers, n_kv_heads, max_context,
head_dim]. One program serves prefill (T up to max_seq_len) and decode (T = 1) through flexible
shapes. It shares the weights of the module every other format is exported from.

4-bit: the quantize stage's codes (llamaship.quantize), packed as torchao int4 group tensors
(weight-only) block by block as the model is loaded, their values moved to memory-mapped files; the
module goes through torch.export into coremltools, which maps torchao's groups straight to
`constexpr_blockwise_shift_scale` (int4 data, an fp16 scale per block, and an int4 offset when the
scheme is asymmetric). So the .mlpackage holds exactly the codes the .pte and ONNX hold, and no
float copy of the model exists at any point (the same route fits 7B/8B in 24 GB). Before the
stage existed, small models went through coremltools' `linear_quantize_weights` on the float
program instead; that rounded on its own and held ~9 bytes per parameter.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaship.bundle import work_dir
from llamaship.errors import ExportError, UnsupportedError
from llamaship.export.coreml_common import MASK_MIN, MIN_TARGET, StatefulLlama
from llamaship.export.llama.model import build_model
from llamaship.export.llama.spec import ModelSpec
from llamaship.quantize.checkpoint import QuantizedCheckpoint
from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.stage import stage_output


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


def convert_quantized(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], quantized: QuantizedCheckpoint, max_context: int,
    max_seq_len: int, work: Path, progress: Callable[[str], None] = print,
) -> Any:
    """Pack the codes while loading (torchao weight-only int4 groups, values file-backed in
    `work`), torch.export, convert (module docstring)."""
    import coremltools as ct
    from torch.export import Dim

    from llamaship.quantize.torchao_pack import PackingState, codes_packer

    on_loaded = codes_packer(quantized, "none", offload_dir=work)
    model = CoreMLLlama(build_model(spec, PackingState(quantized, state), max_context=max_context, impl="torch",
                                    on_loaded=on_loaded)).eval()
    progress("Core ML: tracing with torch.export")
    # torch.export specializes a mask as wide as the cache (it traces a different branch there);
    # the program's ops are the same for that width, so the range is widened after conversion
    seq = Dim("seq_len", min=1, max=min(max_seq_len, max_context - 1))
    ctx = Dim("context", min=1, max=max_context - 1)
    example = (torch.zeros((1, 2), dtype=torch.int32), torch.from_numpy(causal_mask(0, 2)))
    try:
        with torch.no_grad():
            ep = torch.export.export(model, example, dynamic_shapes=({1: seq}, {2: seq, 3: ctx}), strict=False)
            ep = ep.run_decompositions({})
        progress("Core ML: converting with coremltools (fp16 compute, KV cache as state)")
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
        raise ExportError(f"coremltools could not convert {spec.name}: {exc}") from exc
    pb = mlmodel.get_spec()
    for inp in pb.description.input:
        if inp.name == "causal_mask":
            inp.type.multiArrayType.shapeRange.sizeRanges[3].upperBound = max_context
    return ct.models.MLModel(pb, weights_dir=mlmodel.weights_dir, skip_model_load=True)


def export_coreml(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], scheme: QuantScheme | None, out: Path,
    max_context: int, max_seq_len: int, progress: Callable[[str], None] = print,
    quantized: QuantizedCheckpoint | None = None,
) -> dict[str, Any]:
    """Write `out` (.mlpackage). Returns timings and the quantization read back from the program.
    `quantized` is the quantize stage's output; without it the stage runs here."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if scheme is not None:
            if scheme.bits != 4:
                raise UnsupportedError(f"Core ML export supports 4-bit linear weights, not {scheme.name}")
            scheme.check_fits(spec)
            quantized = stack.enter_context(stage_output(spec, state, scheme, quantized, out.parent, progress))
            work = work_dir(out.parent, "llamaship-weights")
            stack.callback(shutil.rmtree, work, True)
            progress(f"Core ML: the {scheme.algorithm} codes as int4 groups of {scheme.group_size}, block by block "
                     f"(values memory-mapped from {work}), torch.export, coremltools")
            mlmodel = convert_quantized(spec, state, quantized, max_context, max_seq_len, work, progress)
        else:
            progress("converting to a Core ML ML program (coremltools, fp16 compute, KV cache as state)")
            mlmodel = convert(spec, dict(state), max_context, max_seq_len)
        timings["convert_s"] = time.perf_counter() - t
        t = time.perf_counter()
        mlmodel.save(str(out))
        timings["save_s"] = time.perf_counter() - t
    quant = describe_quantization(out)
    if scheme is not None:
        quant |= {"embedding_bits": scheme.embedding_bits, "lm_head_bits": scheme.lm_head_bits,
                  "embedding_shared_with_lm_head": False, "algorithm": scheme.algorithm}
        check_blocks(out, quant, scheme, spec)
    return {"timings": timings, "quantization": quant}


def check_blocks(out: Path, quant: dict[str, Any], scheme: QuantScheme, spec: ModelSpec) -> None:
    """Every linear weight of the saved program is int4 with the scheme's block (an 8-bit
    lm_head int8 per channel): read back, not assumed."""
    blocks = [w for w in quant["weights"] if w["feeds"] == ["linear"]]
    head8 = [w for w in blocks if w["dtype"] == "int8"]
    bad: list[Any] = [w for w in blocks if w not in head8 and (w["dtype"] != "int4" or w["block"] != scheme.group_size)]
    if len(head8) > (scheme.lm_head_bits == 8):
        bad += head8
    if len(blocks) < 7 * spec.n_layers:
        bad.append(f"{len(blocks)} quantized linear weights, expected at least {7 * spec.n_layers}")
    if bad:
        raise ExportError(f"{out}: {len(bad)} linear weights not int4 block {scheme.group_size}: {bad[:3]}")


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
