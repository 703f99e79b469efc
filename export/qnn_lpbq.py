"""4-bit block weights in the form the QNN HTP runs natively: low-power block quantization (LPBQ).

Why LPBQ and not ONNX's blocked DequantizeLinear or MatMulNBits: the QNN execution provider
accepts all three on the HTP, but for the latter two it converts the 16-bit activations to fp16 and
runs an fp16 MatMul with float block scales; only LPBQ stays a w4a16 integer MatMul, which is what
Qualcomm AI Hub ships Llama as. LPBQ stores each block's scale as a 4-bit integer multiple of a
per-output-channel float scale. In ONNX that is two chained DequantizeLinear nodes, which the QNN
EP fuses (`LowPowerBlockQuantizedMatMulFusion`):

    block_scale[K/B, N] = DequantizeLinear(scale_q uint8 in 1..15, channel_scale[N], axis=1)
    W[K, N]             = DequantizeLinear(W_q int4, block_scale, zero int4, axis=0, block_size=B)

Measured on one 576x1536 linear (probe, HTP simulator): relative error 3.2e-4 against this exact
dequantized weight. Two traps, both silent: block scales of 8 bits (1..255) load on the HTP and
give garbage (the fusion reads them as 4-bit), and `enable_block_quant_weight_optimization=1`
re-derives the scales itself and adds 2.6% error; so scales are made here, in 1..15, and that
option is left off. Weight zero points are explicit int4 zeros (symmetric): the fusion requires it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def lpbq_quantize(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [K, N] float -> (int4 values [K, N] as int8, 4-bit block scales [K/B, N] as uint8,
    channel scales [N] float32). Symmetric, each value in [-8, 7]."""
    k, n = w.shape
    if k % block:
        raise ValueError(f"input width {k} is not a multiple of block {block}")
    blocks = w.reshape(k // block, block, n).astype(np.float32)
    ideal = np.abs(blocks).max(1) / 7.0  # [K/B, N]: the scale each block would pick on its own
    channel = np.maximum(ideal.max(0) / 15.0, np.finfo(np.float32).tiny).astype(np.float32)
    scale_q = np.clip(np.ceil(ideal / channel - 1e-6), 1, 15).astype(np.uint8)  # never below ideal
    scales = scale_q.astype(np.float32) * channel
    q = np.clip(np.round(blocks / scales[:, None, :]), -8, 7).astype(np.int8).reshape(k, n)
    return q, scale_q, channel


def lpbq_from_codes(codes: np.ndarray, scales: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPBQ derived from the quantize stage's symmetric codes [N, K] and block scales [N, K/B]
    (the stage's orientation, rows = output channels) instead of from float weights: the channel
    scale is the row's largest block scale / 15, each block's 4-bit multiplier the smallest that
    does not shrink its scale (so no code clips), and the codes are re-rounded to the LPBQ scale.
    Where a block's scale is already a multiple of the channel step the codes stay the stage's
    own. Returns (int4 values [K, N], 4-bit block scales [K/B, N], channel scales [N]) like
    `lpbq_quantize`."""
    n, k = codes.shape
    s = scales.astype(np.float64)
    channel = np.maximum(s.max(1) / 15.0, np.finfo(np.float32).tiny)  # [N]
    scale_q = np.clip(np.ceil(s / channel[:, None] - 1e-6), 1, 15).astype(np.uint8)  # [N, K/B]
    lp = scale_q.astype(np.float64) * channel[:, None]
    w = codes.reshape(n, k // group, group).astype(np.float64) * s[:, :, None]
    q = np.clip(np.round(w / lp[:, :, None]), -8, 7).astype(np.int8).reshape(n, k)
    return np.ascontiguousarray(q.T), np.ascontiguousarray(scale_q.T), channel.astype(np.float32)


def lpbq_distance(codes: np.ndarray, scales: np.ndarray, group: int,
                  lpbq: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, float]:
    """How far LPBQ (`lpbq_from_codes`'s result) stays from the stage's codes and scales: the
    share of codes kept and the relative error of the LPBQ weight against the stage's weight."""
    q, scale_q, channel = lpbq
    n, k = codes.shape
    stage = codes.reshape(n, k // group, group) * scales[:, :, None]
    lp = (q.T.reshape(n, k // group, group) * (scale_q.T.astype(np.float64) * channel[:, None])[:, :, None])
    return {"codes_kept": float((q.T == codes).mean()),
            "relative_error": float(np.linalg.norm(lp - stage)) / max(float(np.linalg.norm(stage)), 1e-30)}


def int4_tensor(name: str, values: np.ndarray, dtype: int = TensorProto.INT4) -> TensorProto:
    """A 4-bit initializer (INT4, or UINT4 for values already offset): two values per byte, low
    nibble first (ONNX's packing)."""
    flat = (values.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    t = TensorProto()
    t.name, t.data_type = name, dtype
    t.dims.extend(values.shape)
    t.raw_data = (flat[0::2] | (flat[1::2] << 4)).tobytes()
    return t


def lpbq_nodes(prefix: str, w: np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray], block: int,
               output: str) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """The two DequantizeLinear nodes (and their initializers) that produce `output` = W, from a
    float W [K, N] or an already made (values, block scales, channel scales) triple."""
    q, scale_q, channel = lpbq_quantize(w, block) if isinstance(w, np.ndarray) else w
    k, n = q.shape
    inits = [
        numpy_helper.from_array(scale_q, f"{prefix}_lpbq_scale_q"),
        numpy_helper.from_array(channel, f"{prefix}_lpbq_channel_scale"),
        numpy_helper.from_array(np.zeros(n, np.uint8), f"{prefix}_lpbq_scale_zero"),
        int4_tensor(f"{prefix}_lpbq_weight", q),
        int4_tensor(f"{prefix}_lpbq_weight_zero", np.zeros((k // block, n), np.int8)),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", [i.name for i in inits[:3]], [f"{prefix}_lpbq_block_scale"],
                         name=f"{prefix}_lpbq_scale_dq", axis=1),
        helper.make_node("DequantizeLinear", [inits[3].name, f"{prefix}_lpbq_block_scale", inits[4].name],
                         [output], name=f"{prefix}_lpbq_weight_dq", axis=0, block_size=block),
    ]
    return nodes, inits
