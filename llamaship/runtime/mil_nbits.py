"""A `linear` on 4-bit block-quantized weights run straight from the codes by ONNX Runtime's
MatMulNBits, for MIL programs whose dequantized weights do not fit in memory.

Why: the plan dequantizes each `constexpr_blockwise_shift_scale` once into fp16 while its cache
budget lasts, as Core ML does at load. Llama 3 8B's linears would be 15 GB that way, and
dequantizing per call costs seconds per token. MatMulNBits keeps the codes packed (half a byte per
weight plus an fp16 scale and a 4-bit zero point per block, what the .mlpackage stores) and
multiplies fp16 activations by them with its own blocked kernels: the same weights Core ML
dequantizes, `scale * (data - offset)`, the products accumulated in fp32 and the result rounded to
fp16 (Core ML rounds each dequantized weight to fp16 first; the difference is an fp16 ulp of a
weight, tested against the dequantized path in tests/test_coreml.py). Nothing here is hand-written
arithmetic: the block packing follows the operator's documented layout (onnxruntime's
ContribOperators.md, com.microsoft.MatMulNBits).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llamaship.errors import RuntimeFailure


def eligible(data_shape: tuple[int, ...], scale_shape: tuple[int, ...], offset_shape: tuple[int, ...] | None,
             bits: int) -> bool:
    """A [N, K] matrix of 4-bit codes with blocks along K only, of a power-of-two size >= 16."""
    if bits != 4 or len(data_shape) != 2 or len(scale_shape) != 2:
        return False
    (n, k), (sn, sb) = data_shape, scale_shape
    if sn != n or k % sb:
        return False
    block = k // sb
    return block >= 16 and block & (block - 1) == 0 and (offset_shape is None or tuple(offset_shape) == (sn, sb))


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values in [0, 15] packed two per byte along the last axis, the first in the low nibble
    (padded with a zero nibble to an even count)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _session_options(threads: int) -> Any:
    """Each matrix its own session and thread pool (an 8B program has 224), without spinning: idle
    pools must not burn the cores. Not onnxruntime's global pool: once set, every other session in
    the process (the ONNX artifact's, the NPU simulator's) would have to be made for it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class NBitsLinear:
    """`x @ W.T (+ bias)` with W = scale * (data - offset) per block of K: `data` the program's 4-bit
    codes (int4 in [-8, 7] or uint4 in [0, 15]), `scale` fp16 [N, K / block], `offset` the same
    codes per block or None. Call with fp16 x [..., K]; returns fp16 [..., N]."""

    def __init__(self, data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, signed: bool) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        n, k = data.shape
        blocks = scale.shape[1]
        block = k // blocks
        shift = 8 if signed else 0
        codes = (np.asarray(data).astype(np.int16) + shift).astype(np.uint8)
        packed = _pack_nibbles(codes.reshape(n, blocks, block))
        del codes
        zeros = (np.zeros((n, blocks), np.int16) if offset is None else np.asarray(offset).astype(np.int16)) + shift
        initializers = [numpy_helper.from_array(packed, "B"),
                        numpy_helper.from_array(np.asarray(scale, np.float16).reshape(-1), "scales"),
                        numpy_helper.from_array(_pack_nibbles(zeros.astype(np.uint8)).reshape(-1), "zero_points")]
        del packed
        node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zero_points"], ["y"], domain="com.microsoft",
                                K=k, N=n, bits=4, block_size=block, accuracy_level=0)
        graph = helper.make_graph([node], "nbits_linear",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [None, n])],
                                  initializer=initializers)
        model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                       helper.make_opsetid("com.microsoft", 1)])
        blob = model.SerializeToString()
        del model, graph, initializers
        try:
            self.session = ort.InferenceSession(blob, _session_options(max(torch.get_num_threads(), 1)),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise RuntimeFailure(f"MIL evaluator: ONNX Runtime's MatMulNBits refused a [{n}, {k}] matrix: {exc}") \
                from exc
        # the Python session keeps the serialized model for as long as it lives (onnxruntime's own
        # TODO says so); the runtime has its copy, and 224 matrices of an 8B program would hold
        # 4 GB of duplicates (measured: 88 -> 56 MB per 14336 x 4096 matrix)
        if getattr(self.session, "_model_bytes", None) is not None:
            self.session._model_bytes = None
        self.k, self.n = k, n

    def __call__(self, x: torch.Tensor, bias: Any = None) -> torch.Tensor:
        lead = tuple(x.shape[:-1])
        flat = x.to(torch.float16).reshape(-1, self.k).contiguous().numpy()
        y = torch.from_numpy(self.session.run(None, {"x": flat})[0]).reshape(*lead, self.n)
        return y if bias is None else (y.float() + torch.as_tensor(bias).float()).to(torch.float16)
