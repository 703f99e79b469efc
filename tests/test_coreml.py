"""Core ML: the stateful .mlpackage converted by coremltools, executed by the NumPy MIL reference
evaluator (Core ML itself does not run on Linux), against PyTorch.

Every op the evaluator implements is checked against PyTorch on its own; the converted tiny model
(fp16 program) must match the fp32 module to fp16 tolerance through a prefill and KV-cache decode
steps held in the program's state; the int4 program must store every linear weight as
constexpr_blockwise_shift_scale int4 with the requested block.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llamaship.errors import RuntimeFailure
from llamaship.export.coreml import causal_mask, describe_quantization, export_coreml
from llamaship.export.llama.model import build_model
from llamaship.quantize.scheme import QuantScheme
from llamaship.runtime import mil_eval, mil_plan
from llamaship.targets.coreml_runtime import CoreMLModule, generate_ids
from tests.quant import packed_model, stage
from tests.steps import DECODE, PROMPT, eager_steps, run_steps

OPS = mil_eval.OPS
rng = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def close(got: np.ndarray, want: torch.Tensor, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want.detach().numpy(), rtol=tol, atol=tol)


# ---------------- each op against PyTorch ----------------

def test_elementwise_and_reductions_match_torch():
    x, y = rand(2, 3, 8), rand(2, 3, 8)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    close(OPS["add"](x, y), tx + ty)
    close(OPS["sub"](x, y), tx - ty)
    close(OPS["mul"](x, y), tx * ty)
    close(OPS["real_div"](x, np.abs(y) + 1), tx / (ty.abs() + 1))
    close(OPS["pow"](x, np.float32(2.0)), tx.pow(2))
    close(OPS["rsqrt"](np.abs(x), epsilon=1e-6), torch.rsqrt(tx.abs() + 1e-6))
    close(OPS["sqrt"](np.abs(x)), tx.abs().sqrt())
    close(OPS["silu"](x), F.silu(tx))
    close(OPS["abs"](x), tx.abs())
    close(OPS["clip"](x, np.float32(-0.5), np.float32(0.5)), tx.clamp(-0.5, 0.5))
    close(OPS["inverse"](np.abs(x) + 1, epsilon=np.float32(0.0)), 1 / (tx.abs() + 1))
    close(OPS["inverse"](np.abs(x) + 1), 1 / (tx.abs() + 1 + 1e-4))
    close(OPS["sigmoid"](x), torch.sigmoid(tx))
    close(OPS["exp"](x), tx.exp())
    close(OPS["reduce_mean"](x, axes=np.array([-1]), keep_dims=True), tx.mean(-1, keepdim=True))
    close(OPS["reduce_sum"](x, axes=np.array([1]), keep_dims=False), tx.sum(1))
    close(OPS["reduce_max"](x, axes=np.array([0, 2]), keep_dims=False), tx.amax((0, 2)))
    close(OPS["softmax"](x, axis=-1), torch.softmax(tx, -1))
    ids, zero = np.array([[3, -2, 0]], dtype=np.int32), np.int32(0)
    ti = torch.from_numpy(ids)
    assert np.array_equal(OPS["greater_equal"](ids, zero), (ti >= 0).numpy())
    assert np.array_equal(OPS["greater"](ids, zero), (ti > 0).numpy())
    assert np.array_equal(OPS["less_equal"](ids, zero), (ti <= 0).numpy())
    assert np.array_equal(OPS["less"](ids, zero), (ti < 0).numpy())
    assert np.array_equal(OPS["equal"](ids, zero), (ti == 0).numpy())
    assert np.array_equal(OPS["not_equal"](ids, zero), (ti != 0).numpy())
    assert np.array_equal(OPS["select"](ids >= 0, ids, ids + 10), torch.where(ti >= 0, ti, ti + 10).numpy())
    # integer index arithmetic stays integer
    assert OPS["sub"](np.int32(9), np.int32(4)).dtype.kind == "i"


def test_linear_and_matmul_match_torch():
    x, w, b = rand(1, 5, 16), rand(8, 16), rand(8)
    close(OPS["linear"](x, w, b), F.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)), 1e-4)
    close(OPS["linear"](x, w), F.linear(torch.from_numpy(x), torch.from_numpy(w)), 1e-4)
    a, c = rand(2, 4, 3, 6), rand(2, 4, 5, 6)
    close(OPS["matmul"](a, c, transpose_y=True), torch.from_numpy(a) @ torch.from_numpy(c).transpose(-1, -2), 1e-4)
    close(OPS["matmul"](np.swapaxes(a, -1, -2), c, transpose_x=True, transpose_y=True),
          torch.from_numpy(a) @ torch.from_numpy(c).transpose(-1, -2), 1e-4)


@pytest.mark.parametrize("mask_kind", ["float", "bool", "none"])
def test_sdpa_matches_torch(mask_kind):
    q, k, v = rand(1, 4, 3, 8), rand(1, 4, 7, 8), rand(1, 4, 7, 8)
    fmask = causal_mask(4, 3)
    mask = {"float": fmask, "bool": fmask == 0, "none": None}[mask_kind]
    want = F.scaled_dot_product_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                          attn_mask=None if mask is None else torch.from_numpy(mask))
    close(OPS["scaled_dot_product_attention"](q, k, v, mask), want, 1e-5)


def test_causal_mask_is_what_torch_uses():
    """Query i (absolute past + i) sees keys 0..past+i: the same as a boolean lower-triangular mask."""
    m = causal_mask(3, 4)
    assert m.shape == (1, 1, 4, 7)
    want = torch.ones(4, 7, dtype=torch.bool).tril(diagonal=3)
    assert np.array_equal(m[0, 0] == 0, want.numpy())


@pytest.mark.parametrize("offset", [False, True])
def test_blockwise_dequant_matches_torch(offset):
    data = rng.integers(-8, 8, size=(6, 64)).astype(np.int8)
    scale = rand(6, 2).__abs__()
    off = rng.integers(-2, 2, size=(6, 2)).astype(np.int8) if offset else None
    td = torch.from_numpy(data).float()
    ts = torch.from_numpy(scale).repeat_interleave(32, dim=1)
    to = torch.from_numpy(off).float().repeat_interleave(32, dim=1) if offset else 0
    close(OPS["constexpr_blockwise_shift_scale"](data, scale, off), ts * (td - to))
    with pytest.raises(RuntimeFailure, match="not integral"):
        OPS["constexpr_blockwise_shift_scale"](data, rand(6, 5))


def test_indexing_ops_match_torch():
    x = rand(2, 5, 8)
    tx = torch.from_numpy(x)
    close(OPS["slice_by_index"](x, np.array([0, 1, 0]), np.array([0, 4, 8]), None,
                                np.array([True, False, True]), np.array([True, False, True])), tx[:, 1:4, :])
    close(OPS["slice_by_index"](x, np.array([1, 0, 2]), np.array([2, 5, 8]), np.array([1, 2, 3]),
                                None, None, np.array([True, False, False])), tx[1, 0:5:2, 2:8:3])
    # a squeezed axis takes element `begin` and ignores end (coremltools writes end 0 there)
    close(OPS["slice_by_index"](x[:, 0, 0], np.array([1]), np.array([0]), None, None, None, np.array([True])),
          tx[1, 0, 0])
    upd = rand(2, 2, 8)
    want = tx.clone()
    want[:, 2:4] = torch.from_numpy(upd)
    close(OPS["slice_update"](x, upd, np.array([0, 2, 0]), np.array([2, 4, 8]), None,
                              np.array([True, False, True]), np.array([True, False, True])), want)
    table, idx = rand(10, 4), np.array([[3, 0, 9]], dtype=np.int32)
    close(OPS["gather"](table, idx, axis=0), F.embedding(torch.from_numpy(idx).long(), torch.from_numpy(table)))
    with pytest.raises(RuntimeFailure, match="out of range"):
        OPS["gather"](table, np.array([10]), axis=0)
    y = rand(2, 5, 8)
    close(OPS["minimum"](x, y), torch.minimum(tx, torch.from_numpy(y)))
    close(OPS["maximum"](x, y), torch.maximum(tx, torch.from_numpy(y)))
    close(OPS["concat"]([x, x[:, :2]], axis=1), torch.cat([tx, tx[:, :2]], 1))
    close(OPS["reshape"](x, np.array([2, 0, 4, 2])), tx.reshape(2, 5, 4, 2))
    close(OPS["transpose"](x, np.array([0, 2, 1])), tx.permute(0, 2, 1))
    close(OPS["expand_dims"](x, np.array([1])), tx.unsqueeze(1))
    close(OPS["squeeze"](x[:, :1], np.array([1])), tx[:, :1].squeeze(1))
    close(OPS["tile"](x, np.array([1, 2, 1])), tx.repeat(1, 2, 1))
    assert list(OPS["shape"](x)) == [2, 5, 8]
    assert OPS["cast"](np.array([1.7, -1.7]), "int32").tolist() == [1, -1]
    assert OPS["cast"](x, "fp16").dtype == np.float16


# ---------------- converted programs ----------------

@pytest.fixture(scope="module")
def fp16_package(tmp_path_factory, tiny_ckpt) -> Path:
    out = tmp_path_factory.mktemp("coreml") / "fp16.mlpackage"
    export_coreml(tiny_ckpt.spec, tiny_ckpt.state, None, out, max_context=128, max_seq_len=16,
                  progress=lambda s: None)
    return out


@pytest.fixture(scope="module")
def int4_package(tiny_int4_package) -> tuple[Path, dict]:
    return tiny_int4_package


def test_fp16_program_matches_module_through_state(tiny_ckpt, fp16_package):
    """Prefill then decode steps: each step reads the keys/values earlier calls wrote into the
    program's k_cache/v_cache states."""
    ref = eager_steps(build_model(tiny_ckpt.spec, tiny_ckpt.state, max_context=128))
    module = CoreMLModule(fp16_package)
    got = run_steps(module.forward)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        assert (g - r).abs().max().item() <= 0.02 * r.abs().max().item()  # fp16 tensors throughout
        assert torch.nn.functional.cosine_similarity(g, r).item() > 0.9999
    # the state is what carries the context: a fresh state gives different decode logits
    module.reset()
    alone = module.forward([DECODE[0]], len(PROMPT))
    assert (alone - got[1]).abs().max().item() > 1e-3


def test_int4_program_stores_requested_blocks(tiny_ckpt, int4_package):
    package, res = int4_package
    quant = describe_quantization(package)
    linear = [w for w in quant["weights"] if w["feeds"] == ["linear"]]
    head = [w for w in linear if w["dtype"] == "int8"]  # the lm_head, int8 per channel
    body = [w for w in linear if w not in head]
    assert len(body) == 7 * tiny_ckpt.spec.n_layers and len(head) == 1
    # the stage's symmetric codes, stored as they are (no offset)
    assert all(w["dtype"] == "int4" and w["block"] == 32 and w["symmetric"] for w in body)
    # tied model: the embedding is its own int4 table (the stage quantizes each matrix for its op)
    (emb,) = [w for w in quant["weights"] if w["feeds"] == ["gather"]]
    assert emb["dtype"] == "int4" and emb["block"] == 32
    assert res["quantization"]["algorithm"] == "gptq"
    assert quant["float_params"] < 10_000  # norms and rope tables only


def test_int4_program_is_close_but_really_quantized(tiny_ckpt, int4_package, fp16_package):
    got = run_steps(CoreMLModule(int4_package[0]).forward)
    fp16 = run_steps(CoreMLModule(fp16_package).forward)
    ref = eager_steps(build_model(tiny_ckpt.spec, tiny_ckpt.state, max_context=128))
    for g, f, r in zip(got, fp16, ref, strict=True):
        assert torch.nn.functional.cosine_similarity(g, r).item() > 0.9
        assert (g - f).abs().max().item() > 1e-3


def test_evaluator_over_its_cache_budget_runs_linears_from_the_codes(int4_package):
    """Over the cache budget (a 7B/8B program), the 4-bit linears run from their codes through
    MatMulNBits and the other weights are dequantized per call: the same logits to an fp16 ulp."""
    cached, uncached = mil_eval.MilModel(int4_package[0]), mil_eval.MilModel(int4_package[0], weight_cache_bytes=0)
    assert not cached._plan.nbits  # noqa: SLF001
    linears = [op for op in cached.program.ops if op.op_type == "linear"]
    assert len(uncached._plan.nbits) == len(linears) - 1  # noqa: SLF001  (all but the int8 lm_head)
    for pos, token in enumerate(PROMPT):
        inputs = {"input_ids": np.asarray([[token]], dtype=np.int32), "causal_mask": causal_mask(pos, 1, np.float16)}
        a, b = cached.predict(inputs)["logits"], uncached.predict(inputs)["logits"]
        assert fp16_ulps(b, a) <= 4 and a.argmax() == b.argmax()
    dequantized = [s for s in uncached._plan.steps if s.op.op_type == "constexpr_blockwise_shift_scale"]  # noqa: SLF001
    assert dequantized and not any(s.op.op_type == "constexpr_blockwise_shift_scale" for s in cached._plan.steps)  # noqa: SLF001
    # and the per-call weights are released after their last reader, not held to the end
    assert all(any(st.free for st in uncached._plan.steps if st.out != d.out) for d in dequantized)  # noqa: SLF001


@pytest.mark.parametrize(("signed", "offset", "block", "rows"), [(True, True, 32, 1), (True, False, 64, 3),
                                                                 (False, True, 16, 2), (True, True, 32, 5)])
def test_nbits_linear_matches_the_dequantized_product(signed, offset, block, rows):
    """MatMulNBits on the codes = x @ (scale * (data - offset)).T in fp16, to an fp16 ulp of the
    row (odd block counts exercise the zero-point padding)."""
    from llamaship.runtime.mil_nbits import NBitsLinear

    rng = np.random.default_rng(block + rows)
    n, k = 48, block * (3 if rows == 5 else 4)
    lo, hi = (-8, 8) if signed else (0, 16)
    data = rng.integers(lo, hi, (n, k)).astype(np.int8 if signed else np.uint8)
    off = rng.integers(lo, hi, (n, k // block)).astype(data.dtype) if offset else None
    scale = (rng.random((n, k // block)) * 0.05 + 0.01).astype(np.float16)
    w = mil_plan.dequantize(data, scale, off).to(torch.float16)
    x = torch.from_numpy(rng.standard_normal((1, rows, k)).astype(np.float16))
    got = NBitsLinear(data, scale, off, signed)(x)
    want = (x.double() @ w.double().T).numpy()
    assert got.dtype == torch.float16 and got.shape == (1, rows, n)
    assert fp16_ulps(got.numpy(), want) <= 2


def test_program_too_large_for_the_evaluator_is_refused_with_the_reason(fp16_package, tiny_ckpt, monkeypatch):
    """An 8B program would take the evaluator past this machine's memory: a clear refusal
    instead of the OOM killer ending the export (whose smoke test then records why it did not run)."""
    from llamaship.targets import coreml_runtime

    monkeypatch.setattr(coreml_runtime, "available_memory", lambda: 1000)
    with pytest.raises(RuntimeFailure, match=r"would need about .* GiB .* run this artifact with Core ML on a Mac"):
        CoreMLModule(fp16_package)
    from llamaship.pipeline import smoke_test

    art = {"format": "coreml", "path": fp16_package.name}
    meta = {"artifacts": [art], "tokenizer": {}}
    smoke = smoke_test(art, fp16_package.parent, meta, "Hi", 2, tiny_ckpt.source, lambda s: None)
    assert "Mac" in smoke["skipped"] and "text" not in smoke


def test_block_64(tmp_path, tiny_ckpt):
    out = tmp_path / "g64.mlpackage"
    export_coreml(tiny_ckpt.spec, tiny_ckpt.state, QuantScheme(group_size=64), out,
                  max_context=64, max_seq_len=8, progress=lambda s: None)
    linear = [w for w in describe_quantization(out)["weights"] if w["feeds"] == ["linear"] and w["dtype"] == "int4"]
    assert linear and all(w["block"] == 64 and w["symmetric"] for w in linear)
    got = run_steps(CoreMLModule(out).forward)
    ref = eager_steps(build_model(tiny_ckpt.spec, tiny_ckpt.state, max_context=64))
    assert all(torch.nn.functional.cosine_similarity(g, r).item() > 0.9 for g, r in zip(got, ref, strict=True))


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_route_computes_its_quantized_module_up_to_the_last_cache_slot(tmp_path, tiny_ckpt, tied):
    """The 7B/8B route (torchao int4 groups while loading, values file-backed, torch.export) on the
    tiny model: the program computes what the same torchao-quantized module computes, through the
    state, up to a mask as wide as the cache (the width torch.export cannot trace: the range is
    widened after conversion). Untied: the lm_head is its own int8 matrix."""
    from llamaship.export.coreml import CoreMLLlama

    spec, state = tiny_ckpt.spec, dict(tiny_ckpt.state)
    if not tied:
        spec = spec.replace(tied_embeddings=False)
        state["output.weight"] = state["tok_embeddings.weight"].flip(0).clone()
    ctx, out = 16, tmp_path / "streamed.mlpackage"
    quantized = stage(tiny_ckpt, QuantScheme(), tmp_path / "q", spec, state)
    export_coreml(spec, state, QuantScheme(), out, max_context=ctx, max_seq_len=8, progress=lambda s: None,
                  quantized=quantized)
    weights = describe_quantization(out)["weights"]
    linear = [w for w in weights if w["feeds"] == ["linear"] and w["dtype"] == "int4"]
    assert len(linear) == 7 * spec.n_layers and all(w["block"] == 32 for w in linear)
    assert sorted(w["dtype"] for w in weights if w not in linear) == ["int4", "int8"]  # embedding, lm_head
    assert not list(tmp_path.glob(".llamaship-*"))  # the memory-mapped values are gone
    import coremltools as ct

    ranges = {i.name: [(r.lowerBound, r.upperBound) for r in i.type.multiArrayType.shapeRange.sizeRanges]
              for i in ct.utils.load_spec(str(out)).description.input}
    assert ranges["causal_mask"][2:] == [(1, 8), (1, ctx)] and ranges["input_ids"][1] == (1, 8)

    ref = CoreMLLlama(packed_model(spec, state, quantized, ctx, "none")).eval()
    module = CoreMLModule(out)
    tokens = [*PROMPT, *DECODE][:8]
    steps = [(tokens, 0)] + [([t], 8 + i) for i, t in enumerate([*DECODE, *PROMPT][:8])]
    assert steps[-1][1] + 1 == ctx
    for toks, pos in steps:
        with torch.no_grad():
            r = ref(torch.tensor([toks], dtype=torch.int32), torch.from_numpy(causal_mask(pos, len(toks))))
        g = module.forward(toks, pos)
        assert (g - r).abs().max().item() <= 0.02 * r.abs().max().item()
        assert torch.nn.functional.cosine_similarity(g, r).item() > 0.999


# ---------------- the compiled plan (the engine validation runs) against the interpreter ----------------

def fp16_ulps(got: Any, want: np.ndarray) -> float:
    """Largest error in fp16 ulps of the largest value in its row (products are summed in another
    order than NumPy's, so single elements near zero may differ by an ulp of the row)."""
    g = (got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)).astype(np.float64)
    w = np.asarray(want).astype(np.float64)
    assert g.shape == w.shape
    if not w.size:
        return 0.0
    scale = np.maximum(np.abs(w).max(axis=-1, keepdims=True) if w.ndim else np.abs(w), 2.0**-14)
    return float((np.abs(g - w) / (scale * 2.0**-10)).max())


def h(*shape: int) -> np.ndarray:
    return rand(*shape).astype(np.float16)


KERNEL_CASES: list[tuple[str, dict[str, Any]]] = [
    ("add", {"x": h(2, 3, 8), "y": h(2, 3, 8)}), ("sub", {"x": h(2, 8), "y": h(1, 8)}),
    ("mul", {"x": h(2, 8), "y": np.float16(-1.0)}), ("real_div", {"x": h(2, 8), "y": np.abs(h(2, 1)) + 1}),
    ("pow", {"x": h(2, 8), "y": np.float16(2.0)}), ("sqrt", {"x": np.abs(h(2, 8))}), ("abs", {"x": h(2, 8)}),
    ("exp", {"x": h(2, 8)}), ("silu", {"x": h(3, 16)}), ("sigmoid", {"x": h(3, 16)}),
    ("clip", {"x": h(2, 8), "alpha": np.float16(0.01), "beta": np.float16(np.inf)}),
    ("inverse", {"x": np.abs(h(2, 8)) + 1, "epsilon": np.float32(1e-4)}),
    ("rsqrt", {"x": np.abs(h(2, 8)), "epsilon": np.float32(1e-12)}),
    ("minimum", {"x": h(2, 8), "y": h(2, 8)}), ("maximum", {"x": h(2, 8), "y": h(2, 8)}),
    ("reduce_mean", {"x": h(1, 4, 576), "axes": np.array([-1]), "keep_dims": True}),
    ("reduce_sum", {"x": h(2, 3, 8), "axes": np.array([1]), "keep_dims": False}),
    ("reduce_max", {"x": h(2, 3, 8), "axes": np.array([0, 2]), "keep_dims": False}),
    ("softmax", {"x": h(2, 3, 40), "axis": -1}),
    ("linear", {"x": h(1, 1, 576), "weight": h(1536, 576) * np.float16(0.05)}),  # the fp16 GEMV
    ("linear", {"x": h(1, 7, 576), "weight": h(64, 576), "bias": h(64)}),
    ("matmul", {"x": h(2, 4, 3, 6), "y": h(2, 4, 5, 6), "transpose_y": True}),
    ("scaled_dot_product_attention", {"query": h(1, 9, 1, 64), "key": h(1, 9, 300, 64), "value": h(1, 9, 300, 64),
                                      "attn_mask": causal_mask(299, 1, np.float16)}),
    ("scaled_dot_product_attention", {"query": h(1, 4, 3, 8), "key": h(1, 4, 7, 8), "value": h(1, 4, 7, 8),
                                      "attn_mask": causal_mask(4, 3) == 0}),
    ("gather", {"x": h(10, 4), "indices": np.array([[3, -2, 9]], dtype=np.int32), "axis": 0}),
    ("slice_by_index", {"x": h(2, 5, 8), "begin": np.array([1, 0, 2]), "end": np.array([2, 5, 8]),
                        "stride": np.array([1, 2, 3]), "squeeze_mask": np.array([True, False, False])}),
    ("slice_update", {"x": h(2, 5, 8), "update": h(2, 2, 8), "begin": np.array([0, 2, 0]),
                      "end": np.array([2, 4, 8]), "begin_mask": np.array([True, False, True]),
                      "end_mask": np.array([True, False, True])}),
    ("concat", {"values": [h(2, 5, 8), h(2, 2, 8)], "axis": 1}),
    ("reshape", {"x": h(2, 5, 8), "shape": np.array([2, 0, 4, 2])}),
    ("transpose", {"x": h(2, 5, 8), "perm": np.array([0, 2, 1])}),
    ("expand_dims", {"x": h(2, 5), "axes": np.array([-1, 0])}), ("squeeze", {"x": h(2, 1, 8), "axes": np.array([1])}),
    ("tile", {"x": h(3, 1, 4, 2), "reps": np.array([3, 1, 1, 1])}), ("cast", {"x": h(2, 3), "dtype": "fp32"}),
    ("select", {"cond": rand(2, 8) > 0, "a": h(2, 8), "b": h(2, 8)}), ("identity", {"x": h(4)}),
]


@pytest.mark.parametrize("kind,args", KERNEL_CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(KERNEL_CASES)])
def test_plan_kernel_matches_the_interpreter_op(kind, args):
    """Each torch kernel of the plan against the interpreter's op (fp32 compute, one rounding to
    fp16): at most one fp16 ulp of its row apart, as summation order allows."""
    from llamaship.runtime.mil_plan import KERNELS

    def as_torch(v: Any) -> Any:
        if isinstance(v, list):
            return [as_torch(x) for x in v]
        return torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) and v.dtype == np.float16 else v

    want = np.asarray(OPS[kind](**args))
    want = want.astype(np.float16) if want.dtype.kind == "f" else want
    got = KERNELS[kind](**{k: as_torch(v) for k, v in args.items()})
    got = got.to(torch.float16) if got.dtype == torch.float32 and kind != "cast" else got
    assert fp16_ulps(got, want.astype(np.float32) if kind == "cast" else want) <= 1.0


@pytest.mark.parametrize("kind,static,rank,data", [
    ("slice_by_index", {"begin": np.array([0, 0, 0, 0]), "end": np.array([1, 3, 16, 4]),
                        "end_mask": np.array([False, True, True, True])}, 4, {"x": h(2, 3, 16, 4)}),
    ("slice_update", {"begin": np.array([0, 0, 5, 0]), "end": np.array([1, 3, 6, 4]),
                      "stride": np.array([1, 1, 1, 1])}, 4, {"x": h(2, 3, 16, 4), "update": h(1, 3, 1, 4)}),
    ("reshape", {"shape": np.array([3, 3, 1, -1, 4])}, 4, {"x": h(9, 1, 5, 4)}),
    ("transpose", {"perm": np.array([1, 0, 2, 3])}, 4, {"x": h(9, 1, 5, 4)}),
    ("tile", {"reps": np.array([3, 1, 1, 1])}, 4, {"x": h(3, 1, 5, 4)}),
    ("expand_dims", {"axes": np.array([0])}, 2, {"x": h(5, 4)}),
    ("reduce_mean", {"axes": np.array([-1]), "keep_dims": True}, 3, {"x": h(1, 2, 576)}),
])
def test_prepared_kernel_matches_the_interpreter_op(kind, static, rank, data):
    """Kernels whose indices, shapes or axes are consts are prepared once at load."""
    from llamaship.runtime.mil_plan import PREPARED

    fn, params = PREPARED[kind](static, rank, False)
    assert params == list(data)
    want = np.asarray(OPS[kind](**data, **static)).astype(np.float16)
    assert fp16_ulps(fn(*[torch.from_numpy(v.copy()) for v in data.values()]), want) == 0.0


def test_plan_dequantizes_like_the_interpreter():
    from llamaship.runtime.mil_plan import dequantize

    data = rng.integers(-8, 8, size=(6, 64)).astype(np.int8)
    scale, off = np.abs(h(6, 2)), rng.integers(-2, 2, size=(6, 2)).astype(np.int8)
    for offset in (None, off):
        want = OPS["constexpr_blockwise_shift_scale"](data, scale, offset).astype(np.float16)
        assert fp16_ulps(dequantize(data, scale, offset).half(), want) == 0.0
    with pytest.raises(RuntimeFailure, match="not integral"):
        dequantize(data, h(6, 5))


@pytest.mark.parametrize("which", ["fp16", "int4"])
def test_plan_matches_the_interpreter_through_state(which, fp16_package, int4_package):
    """The whole program, prefill then decode steps through the cache states: the compiled plan
    and the op-by-op interpreter agree to fp16 rounding, and the plan's states hold what the
    interpreter's do."""
    package = fp16_package if which == "fp16" else int4_package[0]
    engines = {e: mil_eval.MilModel(package, engine=e) for e in ("reference", "plan")}
    steps = [(PROMPT, 0)] + [([t], len(PROMPT) + i) for i, t in enumerate(DECODE)]
    for toks, pos in steps:
        inputs = {"input_ids": np.asarray([toks], dtype=np.int32),
                  "causal_mask": causal_mask(pos, len(toks), np.float16)}
        ref, got = (engines[e].predict(inputs)["logits"].astype(np.float32) for e in ("reference", "plan"))
        assert np.abs(got - ref).max() <= 0.01 * np.abs(ref).max()
        assert got.reshape(-1).argmax() == ref.reshape(-1).argmax()
    for name, state in engines["reference"].states.items():
        plan_state = engines["plan"].states[name].numpy().astype(np.float32)
        assert np.abs(plan_state - state.astype(np.float32)).max() <= 0.01 * np.abs(state).max()


def test_plan_writes_the_kv_cache_in_place(fp16_package):
    """A decode step writes its row into the state buffers instead of copying the cache per
    layer: every cache update of our program runs in place, and the states stay the same tensors."""
    model = mil_eval.MilModel(fp16_package)
    plan = model._plan  # noqa: SLF001
    ops = [op for op in plan.program.ops if op.op_type != "const"]
    updates = [op for op in ops if op.op_type == "slice_update"]
    assert updates and len(plan._in_place_ops(ops)) == len(updates)  # noqa: SLF001
    buffers = {n: t.data_ptr() for n, t in model.states.items()}
    model.predict({"input_ids": np.asarray([PROMPT], dtype=np.int32),
                   "causal_mask": causal_mask(0, len(PROMPT), np.float16)})
    assert {n: t.data_ptr() for n, t in model.states.items()} == buffers
    assert all(t.abs().max() > 0 for t in model.states.values())


def test_plan_does_not_write_in_place_into_a_value_read_later(tmp_path):
    """y is read after a slice_update of it: writing in place would change what that later add
    sees. A hand-built MIL program, saved as a package like ours."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    specs = [mb.TensorSpec(shape=(2, 4), dtype=types.fp16), mb.TensorSpec(shape=(1, 4), dtype=types.fp16)]

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def prog(x, u):  # type: ignore[no-untyped-def]
        y = mb.mul(x=x, y=np.float16(2.0), name="y")
        z = mb.slice_update(x=y, update=u, begin=[0, 0], end=[1, 4], name="z")
        return mb.add(x=y, y=z, name="w")

    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
               pass_pipeline=ct.PassPipeline.EMPTY,  # as built: no pass may fold the read of y away
               compute_precision=ct.precision.FLOAT16).save(str(tmp_path / "a.mlpackage"))
    x, u = np.arange(8, dtype=np.float16).reshape(2, 4), np.full((1, 4), 100, np.float16)
    model = mil_eval.MilModel(tmp_path / "a.mlpackage")
    got = model.predict({"x": x, "u": u})["w"]
    assert got.tolist() == [[100.0, 102.0, 104.0, 106.0], [16.0, 20.0, 24.0, 28.0]]
    assert x.tolist() == np.arange(8).reshape(2, 4).tolist()  # the caller's input untouched
    ops = [op for op in model._plan.program.ops if op.op_type != "const"]  # noqa: SLF001
    assert not model._plan._in_place_ops(ops)  # noqa: SLF001


def test_unknown_op_fails_loudly(tmp_path, fp16_package, monkeypatch):
    monkeypatch.delitem(mil_eval.OPS, "scaled_dot_product_attention")
    with pytest.raises(RuntimeFailure, match="does not implement.*scaled_dot_product_attention"):
        mil_eval.MilModel(fp16_package)


def test_not_a_package_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeFailure, match="not an .mlpackage"):
        mil_eval.MilModel(tmp_path)


def test_greedy_generation_matches_module(tiny_ckpt, fp16_package):
    model = build_model(tiny_ckpt.spec, tiny_ckpt.state, max_context=128)
    ids, ref = [5, 17, 42], []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.tensor([0]))
        for i in range(6):
            ref.append(int(logits.argmax(-1)))
            logits = model(torch.tensor([[ref[-1]]]), torch.tensor([len(ids) + i]))
    new, stats = generate_ids(CoreMLModule(fp16_package), ids, 6, stop_ids=())
    assert new == ref
    assert stats["generated_tokens"] == 6


def test_cli_coreml_bundle_and_refusals(tmp_path, gguf_path):
    from llamaship.cli import main

    out = tmp_path / "b"
    assert main(["export", "--model", str(gguf_path), "--out", str(out), "--format", "coreml",
                 "--target", "apple", "--eval-tokens", "512", "--max-context", "128"]) in (0, 7)
    manifest = json.loads((out / "manifest.json").read_text())
    art = manifest["artifacts"][0]
    assert art["format"] == "coreml" and art["path"] == "model.mlpackage"
    assert set(art["states"]) == {"k_cache", "v_cache"} and "causal_mask" in art["inputs"]
    assert art["smoke_test"]["runtime"].startswith("MIL reference evaluator")
    report = json.loads((out / "report.json").read_text())
    acc = report["artifacts"][0]["accuracy"]
    assert acc["scored_tokens"] > 0 and acc["mean_kld"] < 0.5
    assert "roofline" in report["targets"][0]["speed_source"]
    assert main(["verify", str(out)]) == 0
    assert main(["generate", str(out), "--format", "coreml", "--prompt", "The tower", "--max-new-tokens", "3",
                 "--json"]) == 0
    bad = tmp_path / "bad"
    assert main(["export", "--model", str(gguf_path), "--out", str(bad), "--format", "coreml",
                 "--quant", "8da8w"]) == 3
    assert not bad.exists()
