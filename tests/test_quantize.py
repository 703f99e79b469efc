"""The quantize stage: its algorithms, its calibration text, and the codes every format carries.

The identity test reads each saved artifact back (the .pte's XNNPACK constant blobs, the ONNX
initializers, the .mlpackage's constexpr_blockwise_shift_scale data) and compares the integer
codes with the stage's output, exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamaship.errors import UnsupportedError
from llamaship.quantize import algorithms
from llamaship.quantize.algorithms import awq_scales
from llamaship.quantize.codes import QTensor, rtn
from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.stage import calibration, matrix_names
from tests.quant import TINY_SCHEME


def correlated(n: int = 2048, k: int = 256, seed: int = 0) -> torch.Tensor:
    """Activations with a few loud channels and correlated columns, like a norm's output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g)
    x[:, :4] *= 20
    return x


def output_error(x: torch.Tensor, w: torch.Tensor, qt: QTensor) -> float:
    return float((x @ qt.dequantize().T - x @ w.T).pow(2).mean() / (x @ w.T).pow(2).mean())


def test_rtn_is_torchaos_round_to_nearest():
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    w = torch.randn(96, 128)
    for symmetric in (True, False):
        mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
        s, z = choose_qparams_affine(w, mapping, (1, 32), target_dtype=torch.int8, quant_min=-8, quant_max=7,
                                     zero_point_dtype=torch.int8, keepdim=True)
        q = quantize_affine(w, (1, 32), s, z, output_dtype=torch.int8, quant_min=-8, quant_max=7)
        ours = rtn(w, 4, 32, symmetric)
        assert torch.equal(ours.codes, q) and torch.equal(ours.scales, s)
        assert symmetric or torch.equal(ours.zeros, z)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_round_to_nearest_on_the_output(symmetric):
    x, w = correlated(), torch.randn(192, 256) * 0.05
    h = x.T @ x / x.shape[0]
    gptq = algorithms.get("gptq").quantize(w, 4, 32, symmetric, h)
    plain = rtn(w, 4, 32, symmetric)
    assert output_error(x, w, gptq) < 0.7 * output_error(x, w, plain)
    assert gptq.codes.min() >= -8 and gptq.codes.max() <= 7
    assert (gptq.zeros is None) == symmetric


def test_hqq_lowers_the_weight_error_and_refuses_asymmetric():
    w = torch.randn(128, 256)
    hqq, plain = algorithms.get("hqq").quantize(w, 4, 32, True), rtn(w, 4, 32, True)
    assert (hqq.dequantize() - w).pow(2).mean() < (plain.dequantize() - w).pow(2).mean()
    with pytest.raises(UnsupportedError, match="symmetric"):
        QuantScheme(algorithm="hqq", symmetric=False)


def test_awq_scales_keep_the_float_function_and_lower_the_error():
    x, w = correlated(), torch.randn(192, 256) * 0.05
    s = awq_scales([w], x, x.abs().mean(0), 4, 32, True)
    assert torch.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)  # folding changes nothing
    scaled = rtn(w * s, 4, 32, True)
    scaled_err = float(((x / s) @ scaled.dequantize().T - x @ w.T).pow(2).mean() / (x @ w.T).pow(2).mean())
    assert scaled_err <= output_error(x, w, rtn(w, 4, 32, True))


def test_calibration_reads_the_validation_split_only(tiny_ckpt):
    from llamaship.data import CALIB_FILE, EVAL_FILE, data_file

    calib = calibration(tiny_ckpt.tokenizer, 1024, window=256)
    assert calib.tokens.shape == (4, 256) and calib.describe()["split"] == "validation"
    valid = tiny_ckpt.tokenizer.encode(data_file(CALIB_FILE).read_text()[:20_000], bos=False)
    test = tiny_ckpt.tokenizer.encode(data_file(EVAL_FILE).read_text()[:20_000], bos=False)
    assert calib.tokens[0, 1:].tolist() == valid[:255] != test[:255]


def test_stage_output_covers_every_matrix(tiny_ckpt, tiny_codes):
    rec = tiny_codes.describe()
    assert rec["algorithm"] == "gptq" and rec["calibration"]["split"] == "validation"
    assert rec["calibration"]["tokens"] == TINY_SCHEME.calibration_tokens
    assert set(tiny_codes.names()) == set(matrix_names(tiny_ckpt.spec))
    head = tiny_codes.get("output.weight")
    assert head.bits == 8 and head.group_size == tiny_ckpt.spec.dim  # per output channel
    assert rec["matrices"] == {"int4 group 32 symmetric": 7 * tiny_ckpt.spec.n_layers + 1,
                               "int8 per channel symmetric": 1}


# ---------------- the same codes in every artifact ----------------

def nibbles(values: np.ndarray) -> bytes:
    """XNNPACK's packing of 4-bit weights (executorch's convert_to_qc4w): q + 8, two per byte,
    the even column in the low nibble."""
    u = (values.astype(np.int16) + 8).astype(np.uint8).reshape(-1)
    return (u[0::2] | (u[1::2] << 4)).tobytes()


def pte_blobs(path) -> set[bytes]:  # type: ignore[no-untyped-def]
    """Every constant blob the .pte's named data store holds (XNNPACK's weights live there)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(path.read_bytes())
    assert pte.named_data is not None
    return {bytes(getattr(b, "buffer", b)) for b in pte.named_data.buffers}


def onnx_codes(folder) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """Signed codes [N, K] of every MatMulNBits and GatherBlockQuantized, unpacked from the graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    init = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            raw = numpy_helper.to_array(init[node.input[1]], base_dir=str(folder))  # [N, blocks, blob] uint8
            n, k, bits = attrs["N"], attrs["K"], attrs.get("bits", 4)
            flat = raw.reshape(n, -1)
            if bits == 4:
                u = np.stack([flat & 0x0F, flat >> 4], axis=-1).reshape(n, -1)[:, :k]
                out.append(u.astype(np.int16) - 8)
            else:
                out.append(flat[:, :k].astype(np.int16) - 128)
        elif node.op_type == "GatherBlockQuantized":
            data = init[node.input[0]]
            packed = np.frombuffer(data.raw_data, np.uint8)
            u = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(tuple(data.dims))
            signed = data.data_type == onnx.TensorProto.INT4
            out.append(np.where(u > 7, u.astype(np.int16) - 16, u) if signed else u.astype(np.int16) - 8)
    return out


def coreml_codes(package) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    from llamaship.runtime.mil_eval import Program

    prog = Program(package)
    return [np.asarray(prog.value(op.inputs["data"])).astype(np.int16) for op in prog.ops
            if op.op_type == "constexpr_blockwise_shift_scale"]


def test_every_format_carries_the_stages_codes(tmp_path, tiny_ckpt, tiny_codes, tiny_q_pte, tiny_int4_package):
    """The stage's gptq codes, read back from the .pte (XNNPACK's packed int4 blobs, the int8
    lm_head), from the ONNX graph (MatMulNBits, GatherBlockQuantized) and from the .mlpackage
    (constexpr_blockwise_shift_scale): identical integers in all three."""
    from llamaship.export.onnx import export_onnx

    folder = tmp_path / "onnx"
    export_onnx(tiny_ckpt.spec, tiny_ckpt.state, tiny_ckpt.tokenizer, TINY_SCHEME, folder, max_context=128,
                progress=lambda s: None, quantized=tiny_codes)
    stage = {name: tiny_codes.get(name).codes.numpy().astype(np.int16) for name in tiny_codes.names()}

    blobs = pte_blobs(tiny_q_pte)
    linears = [n for n in stage if n.startswith("layers.")]
    assert all(nibbles(stage[n]) in blobs for n in linears)
    assert stage["output.weight"].astype(np.int8).tobytes() in blobs  # qc8w: the int8 codes as they are

    # the builder fuses q/k/v into one MatMulNBits: compare its row blocks
    onnx = onnx_codes(folder)
    spec = tiny_ckpt.spec
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        qkv = np.concatenate([stage[p + f"attention.{m}.weight"] for m in ("wq", "wk", "wv")])
        for want in (qkv, *(stage[p + f"{m}.weight"] for m in ("attention.wo", "feed_forward.w1",
                                                                 "feed_forward.w2", "feed_forward.w3"))):
            assert any(a.shape == want.shape and np.array_equal(a, want) for a in onnx)
    for name in ("output.weight", "tok_embeddings.weight"):
        assert any(a.shape == stage[name].shape and np.array_equal(a, stage[name]) for a in onnx), name

    coreml = coreml_codes(tiny_int4_package[0])
    for name, want in stage.items():
        assert any(a.shape == want.shape and np.array_equal(a, want) for a in coreml), name
