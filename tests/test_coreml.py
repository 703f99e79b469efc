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

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llamaship.errors import RuntimeFailure
from llamaship.export.coreml import causal_mask, describe_quantization, export_coreml
from llamaship.export.llama.model import build_model
from llamaship.quantize.scheme import QuantScheme
from llamaship.runtime import mil_eval
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


def test_evaluator_without_weight_cache_gives_the_same_logits(int4_package):
    """Over the cache budget (a 7B/8B program), weights are dequantized per call instead of kept."""
    cached, uncached = mil_eval.MilModel(int4_package[0]), mil_eval.MilModel(int4_package[0], weight_cache_bytes=0)
    inputs = {"input_ids": np.asarray([PROMPT], dtype=np.int32),
              "causal_mask": causal_mask(0, len(PROMPT), np.float16)}
    a, b = cached.predict(inputs), uncached.predict(inputs)
    assert np.array_equal(a["logits"], b["logits"])
    assert cached._weights and not uncached._weights  # noqa: SLF001


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
