"""Qualcomm NPU path: the static-shape graph and its app-side cache, LPBQ 4-bit weights, the w4a16
QDQ graph compiled into a QNN context binary and run on the QNN HTP simulator of onnxruntime-qnn
(with the CPU fallback disabled, so nothing here can pass by running on the CPU EP)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from llamaship.errors import RuntimeFailure, UnsupportedError
from llamaship.export.llama.model import RMSNorm, build_model
from llamaship.export.qnn import check_scheme, export_qnn
from llamaship.export.qnn_graph import StaticCacheRunner, StaticLlama, export_float_onnx, rms_norm_prescaled
from llamaship.export.qnn_lpbq import lpbq_nodes, lpbq_quantize
from llamaship.quantize.scheme import QuantScheme
from llamaship.targets import qnn_runtime
from llamaship.targets.qnn_runtime import QnnModule, compile_context, generate_ids, htp_session, in_child


def lpbq_dequantize(q: np.ndarray, scale_q: np.ndarray, channel: np.ndarray, block: int) -> np.ndarray:
    """The reference meaning of LPBQ codes: q x (per-block uint4 scale x per-channel fp32 scale)."""
    k, n = q.shape
    scales = scale_q.astype(np.float32) * channel
    return (q.reshape(k // block, block, n).astype(np.float32) * scales[:, None, :]).reshape(k, n)


pytestmark = pytest.mark.skipif(not qnn_runtime.available(), reason="onnxruntime-qnn (Linux x86_64) not installed")
CTX = 256  # two prompt chunks of 128


def eval_ids(ckpt, n: int) -> list[int]:
    from llamaship.targets.accuracy import find_eval_text

    return ckpt.tokenizer.encode(find_eval_text().read_text()[: n * 12], bos=False)[:n]


def module_logits(ckpt, ids: list[int]) -> torch.Tensor:
    model = build_model(ckpt.spec, ckpt.state, max_context=CTX, full_logits=True)
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.tensor([0]))[0]


def kld(ref: torch.Tensor, got: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(ref.float(), -1), torch.log_softmax(got.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.fixture(scope="session")
def tiny_float_graph(tmp_path_factory, tiny_ckpt) -> Path:
    model = build_model(tiny_ckpt.spec, tiny_ckpt.state, max_context=CTX, full_logits=True)
    path = tmp_path_factory.mktemp("qnn_float") / "float.onnx"
    export_float_onnx(StaticLlama(model, 128, CTX).eval(), path)
    return path




def qnn_art(res: dict) -> dict:
    return {"path": "qnn/qnn_config.json", "folder": "qnn", "config": "qnn/qnn_config.json"}


# ---------------- the float static graph and the app-side cache ----------------

def test_static_graph_with_app_cache_matches_module(tiny_ckpt, tiny_float_graph):
    """A prompt in two chunks (the second padded); a prompt of one chunk then single-token calls up to
    the last past slot: every logit row equals the module's, so the mask, positions and cache writes
    are what an app must do."""
    spec = tiny_ckpt.spec
    ids = eval_ids(tiny_ckpt, 200)
    ref = module_logits(tiny_ckpt, ids)
    sess = ort.InferenceSession(str(tiny_float_graph), providers=["CPUExecutionProvider"])
    runner = StaticCacheRunner(lambda f: sess.run(None, f), 128, CTX, spec.n_layers, spec.n_kv_heads, spec.head_dim)
    torch.testing.assert_close(runner.forward(ids, 0), ref, atol=2e-4, rtol=1e-4)
    got = [runner.forward(ids[:100], 0)] + [runner.forward([t], 100 + i) for i, t in enumerate(ids[100:129])]
    torch.testing.assert_close(torch.cat(got), ref[:129], atol=2e-4, rtol=1e-4)


def test_calibration_feeds_are_snapshots_of_the_cache(tiny_ckpt, tiny_float_graph):
    """Each chunk's inputs keep the cache as it was for that chunk, even when collected in a list."""
    from llamaship.export.qnn import calibration_feeds

    sess = ort.InferenceSession(str(tiny_float_graph), providers=["CPUExecutionProvider"])
    feeds = list(calibration_feeds(lambda f: sess.run(None, f), tiny_ckpt.tokenizer, tiny_ckpt.spec, CTX, 1))
    assert len(feeds) == 2
    assert not feeds[0]["past_keys"].any() and feeds[1]["past_keys"].any()
    assert (feeds[1]["attention_mask"][0, 0, :, :128] == 0).all() and (feeds[1]["position_ids"][0, 0] == 128)


def test_runner_refuses_a_full_cache_and_a_wrong_position(tiny_ckpt, tiny_float_graph):
    spec = tiny_ckpt.spec
    sess = ort.InferenceSession(str(tiny_float_graph), providers=["CPUExecutionProvider"])
    runner = StaticCacheRunner(lambda f: sess.run(None, f), 128, CTX, spec.n_layers, spec.n_kv_heads, spec.head_dim)
    runner.forward(eval_ids(tiny_ckpt, 129), 0)  # 129 cached: more than the 128 past slots
    with pytest.raises(ValueError, match="context full"):
        runner.forward([5], 129)
    with pytest.raises(ValueError, match="start_pos 3"):
        runner.forward([5], 3)


def test_prescaled_norm_equals_rmsnorm_in_torch_and_onnxruntime(tmp_path):
    """Rows from 1e-1 to 3e4 (SmolLM2's first token reaches 2.45e4). onnxruntime's optimizer must not
    mis-fuse it into SimplifiedLayerNormalization (it did with the Sqrt/Div form)."""
    norm = RMSNorm(64, 1e-5)
    norm.weight.data = torch.randn(64)
    x = torch.randn(1, 5, 64) * torch.tensor([0.1, 1, 100, 3e3, 3e4])[None, :, None]
    torch.testing.assert_close(rms_norm_prescaled(norm, x), norm(x), atol=1e-5, rtol=1e-5)

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = norm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return rms_norm_prescaled(self.norm, x)

    path = tmp_path / "norm.onnx"
    torch.onnx.export(Wrap(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    got = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, norm(x).detach().numpy(), atol=1e-5, rtol=1e-5)


# ---------------- LPBQ weights ----------------

def test_lpbq_scales_are_4_bit_and_error_is_half_a_step():
    w = np.random.default_rng(0).standard_normal((128, 48)).astype(np.float32) * np.linspace(0.01, 2, 48)
    w[5, 3] = 40.0  # an outlier block
    q, scale_q, channel = lpbq_quantize(w, 32)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7
    assert scale_q.dtype == np.uint8 and scale_q.min() >= 1 and scale_q.max() <= 15
    scales = scale_q.astype(np.float32) * channel
    ideal = np.abs(w.reshape(4, 32, 48)).max(1) / 7
    assert (scales >= ideal * (1 - 1e-6)).all()  # rounded up: no block is clipped
    err = np.abs(w - lpbq_dequantize(q, scale_q, channel, 32)).reshape(4, 32, 48)
    assert (err <= scales[:, None, :] / 2 + 1e-6).all()


def test_lpbq_graph_runs_as_written_on_cpu(tmp_path):
    """The two chained DequantizeLinear nodes (int4 packing, block axis, scale axis) compute exactly
    the weights lpbq_dequantize describes."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    nodes, inits = lpbq_nodes("t", w, 32, "W")
    graph = helper.make_graph(
        [*nodes, helper.make_node("MatMul", ["x", "W"], ["y"])], "lpbq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 40])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    path = tmp_path / "lpbq.onnx"
    onnx.save(model, str(path))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x @ lpbq_dequantize(*lpbq_quantize(w, 32), 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------- the NPU artifact on the HTP simulator ----------------

def test_export_writes_parts_of_prefill_and_decode_graphs_sharing_one_binary(tiny_qnn):
    folder, res = tiny_qnn
    qnn = folder / "qnn"
    config = json.loads((qnn / "qnn_config.json").read_text())
    assert config["soc_model"] == "SM8650" and config["context"] == CTX
    assert config["graphs"] == {"prefill": {"tokens_per_call": 128, "past_slots": CTX - 128},
                                "decode": {"tokens_per_call": 1, "past_slots": CTX - 1}}
    assert config["qnn_sdk_version"].startswith("v2.")  # what the app's QNN libraries must match
    parts = config["parts"]
    assert [p["layers"] for p in parts] == [[0, 1], [1, 2]]  # the tiny limit: one layer per part
    assert parts[0]["inputs"][0] == "input_ids" and parts[1]["inputs"][0] == "hidden_1"
    assert parts[0]["outputs"][0] == "hidden_1" and parts[1]["outputs"][0] == "logits"
    for part in parts:
        binaries = set()
        for graph in ("prefill", "decode"):
            ctx = onnx.load(str(qnn / part[graph])).graph
            src = onnx.load(str(qnn / part["source"][graph]), load_external_data=False).graph
            assert [n.op_type for n in ctx.node] == ["EPContext"]  # the whole graph is one HTP context
            assert [i.name for i in ctx.input] == [i.name for i in src.input] == part["inputs"]
            attrs = {a.name: a for a in ctx.node[0].attribute}
            binaries.add(attrs["ep_cache_context"].s.decode())
            assert attrs["ep_sdk_version"].s.decode() == config["qnn_sdk_version"]
        assert binaries == {part["context_binary"]} and (qnn / part["context_binary"]).stat().st_size > 10_000
        shapes = {g: [d.dim_value for d in onnx.load(str(qnn / part["source"][g]), load_external_data=False)
                      .graph.input[1].type.tensor_type.shape.dim] for g in ("prefill", "decode")}
        assert shapes == {"prefill": [1, 128], "decode": [1, 1]}  # position_ids
    assert res["quantization"]["n_block_linears"] == 7 * config["n_layers"]
    assert not list(folder.glob(".*work*")), "the export's work folder must be removed"


def test_both_graphs_read_one_weights_file_and_the_shared_binary_holds_them_once(tiny_qnn, tmp_path):
    """The prefill and decode source graphs are one graph at two shapes: every initializer is the
    same bytes of one .data file. Compiled apart, the two context binaries are larger together
    than the weight-sharing one."""
    folder, res = tiny_qnn
    qnn = folder / "qnn"
    part = json.loads((qnn / "qnn_config.json").read_text())["parts"][0]
    refs = {}
    for graph in ("prefill", "decode"):
        model = onnx.load(str(qnn / part["source"][graph]), load_external_data=False)
        refs[graph] = sorted((i.name, tuple((e.key, e.value) for e in i.external_data))
                             for i in model.graph.initializer)
    assert refs["prefill"] == refs["decode"]
    assert {v for _, ext in refs["prefill"] for k, v in ext if k == "location"} == {Path(part["source"]["data"]).name}
    apart = 0
    for graph in ("prefill", "decode"):
        in_child(compile_apart, qnn / part["source"][graph], tmp_path / graph / "ctx.onnx")
        apart += (tmp_path / graph / "ctx_qnn.bin").stat().st_size
    assert (qnn / part["context_binary"]).stat().st_size < apart


def compile_apart(source: Path, ctx: Path) -> None:
    compile_context(source, ctx, "SM8650")


def test_htp_logits_track_the_fp32_module(tiny_qnn, tiny_ckpt):
    """Both parts on the HTP simulator against the fp32 module over two chunks: KLD 0.072 measured
    (0.074 on the second chunk, through the cache). This random tiny model's logits are flat: the
    reference against itself one position off is only 0.28 apart, so that is the scale."""
    folder, res = tiny_qnn
    ids = eval_ids(tiny_ckpt, 250)
    ref = module_logits(tiny_ckpt, ids)
    with QnnModule(folder, qnn_art(res)) as module:
        got = module.forward(ids, 0)
        assert module.calls() == {"prefill": 2, "decode": 0}
    assert got.shape == ref.shape
    assert kld(ref, got) < 0.15
    assert kld(ref[128:], got[128:]) < 0.15  # the cache written by the first chunk is read right
    assert kld(ref[1:], ref[:-1]) > 0.25


def test_decode_graph_continues_the_prefill_graphs_cache(tiny_qnn, tiny_ckpt):
    """Tokens after the prompt go one by one through the decode graphs and give the logits the
    prefill graphs give the same positions (teacher forcing; 1.7e-3 apart measured, the 16-bit
    grids of two graph shapes)."""
    folder, res = tiny_qnn
    ids = eval_ids(tiny_ckpt, 155)
    with QnnModule(folder, qnn_art(res)) as module:
        whole = module.forward(ids, 0)
        module.forward(ids[:150], 0)
        rows = torch.cat([module.forward([t], 150 + i) for i, t in enumerate(ids[150:])])
        assert module.calls() == {"prefill": 4, "decode": 5}
    assert float((rows - whole[150:]).abs().max()) < 0.02
    assert torch.equal(rows.argmax(-1), whole[150:].argmax(-1))


def test_greedy_generation_on_the_htp(tiny_qnn, tiny_ckpt):
    folder, res = tiny_qnn
    ids = eval_ids(tiny_ckpt, 20)
    with QnnModule(folder, qnn_art(res)) as module:
        new, stats = generate_ids(module, ids, 3, stop_ids=())
        assert module.calls() == {"prefill": 1, "decode": 2}
    assert len(new) == 3 and stats["prompt_tokens"] == 20
    # the same tokens from one prompt call over prompt + generated tokens (teacher forcing)
    with QnnModule(folder, qnn_art(res)) as module:
        logits = module.forward(ids + new[:-1], 0)
    assert [int(i) for i in logits[-3:].argmax(-1)] == new


def test_htp_refuses_a_graph_it_cannot_run(tmp_path):
    """With the CPU fallback disabled, an op the HTP lacks fails the load and names the file."""
    graph = helper.make_graph(
        [helper.make_node("Det", ["x"], ["y"])], "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    path = tmp_path / "det.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(RuntimeFailure, match="det.onnx"):
        in_child(htp_session, path, "SM8650")


def test_qnn_refuses_schemes_it_cannot_hold(tiny_ckpt):
    spec = tiny_ckpt.spec
    with pytest.raises(UnsupportedError, match="w4a16"):
        check_scheme(None, spec)
    with pytest.raises(UnsupportedError, match="asymmetric"):
        check_scheme(QuantScheme(symmetric=False), spec)
    with pytest.raises(UnsupportedError, match="lm_head"):
        check_scheme(QuantScheme(lm_head_bits=0), spec)
    with pytest.raises(UnsupportedError, match="max-context"):
        export_qnn(spec, tiny_ckpt.state, tiny_ckpt.tokenizer, QuantScheme(), Path("/nonexistent/qnn"),
                   max_context=200, soc_model="SM8650", progress=lambda s: None)


TINY_QUALCOMM = """
name = "tiny_qualcomm"
device = "test profile: random tiny model on an SM8650 HTP (simulated)"
soc_model = "SM8650"
htp_arch = "v75"
formats = ["executorch", "qnn"]
measured_here = false
ram_gb = 4.0
ram_budget_gb = 2.0
bandwidth_gbs = 20.0
max_context = 256
[quant]
group_size = 32
[gates]
max_kld = 0.15
max_kld_ratio_vs_cpu = 2.0
[eval]
tokens = 512
window = 128
npu_tokens = 512
"""


def test_qualcomm_bundle_ships_and_gates_the_npu_artifact(tmp_path, gguf_path):
    """The library API end to end: .pte + NPU artifact in one bundle, the NPU graph scored on the
    HTP simulator and gated against the .pte on the same slice, every file in the manifest."""
    from llamaship.bundle import verify_bundle
    from llamaship.pipeline import export_bundle

    profile = tmp_path / "tiny_qualcomm.toml"
    profile.write_text(TINY_QUALCOMM)
    out = tmp_path / "bundle"
    manifest = export_bundle(gguf_path, out, QuantScheme(), max_context=256, targets=(str(profile),),
                             eval_tokens=512, smoke_tokens=3, progress=lambda s: None)
    assert verify_bundle(out) == []
    art = next(a for a in manifest["artifacts"] if a["format"] == "qnn")
    assert art["soc_model"] == "SM8650" and art["htp_arch"] == "v75"
    assert set(manifest["files"]) >= {*art["device_files"], *art["source_files"], art["config"]}
    assert art["parts"] == 1 and art["qnn_sdk_version"].startswith("v2.")
    smoke = art["smoke_test"]
    assert smoke["runtime"].startswith("onnxruntime-qnn") and smoke["stats"]["generated_tokens"] == 3
    report = json.loads((out / "report.json").read_text())
    npu = next(r for r in report["artifacts"] if r["format"] == "qnn")
    acc = npu["accuracy"]
    assert acc["scored_tokens"] == 2 * 128 and acc["cpu_artifact"]["path"] == "model.pte"
    assert acc["kld_ratio_vs_cpu"] == pytest.approx(acc["mean_kld"] / acc["cpu_artifact"]["mean_kld"])
    dec = acc["decode_graph"]  # validation also decodes through the 1-token graph
    # the tiny model's logits are flat: near-ties may flip between the two graphs' 16-bit grids
    assert dec["calls"]["decode"] == 8 and dec["argmax_agreement_vs_prefill_graph"] >= 0.75, dec
    assert dec["kld_vs_prefill_graph"] < 0.01 and abs(dec["mean_kld"] - dec["prefill_graph_mean_kld"]) < 0.05, dec
    target = next(t for t in report["targets"] if t["artifact"] == art["path"])
    gates = {g["gate"]: g for g in target["gates"]}
    assert set(gates) >= {"max_kld", "max_kld_ratio_vs_cpu", "ram_budget"}
    assert target["passed"] == all(g["passed"] for g in gates.values())
    assert gates["max_kld"]["value"] == pytest.approx(acc["mean_kld"], abs=1e-4)
    assert f"Accuracy of {art['path']} is on a slice of its own" in (out / "report.md").read_text()
    assert "decode graph (1 token per call)" in (out / "report.md").read_text()


def test_a_crashing_htp_process_is_a_clear_error():
    import os

    with pytest.raises(RuntimeFailure, match="process died"):
        in_child(os.abort)


def test_parts_follow_the_htp_context_limit():
    """Llama 3 8B does not fit one context binary: at the 1.5 GiB default it is cut into 4 parts, the
    16-bit embedding (1.05 GB) in the first, which so holds only 2 layers, and the lm_head in the
    last; the parts are balanced (1.1-1.3 GiB) rather than filled to the limit one by one."""
    from llamaship.export.llama.presets import find_preset
    from llamaship.export.qnn_parts import limit_bytes, part_bytes, plan_parts, unit_bytes

    spec, scheme = find_preset("llama3-8b").spec(), QuantScheme()  # type: ignore[union-attr]
    limit = limit_bytes(None)
    parts = plan_parts(spec, scheme, 2048, limit)
    assert parts == [(0, 2), (2, 14), (14, 26), (26, 32)]
    sizes = [part_bytes(spec, scheme, 2048, a, b) for a, b in parts]
    assert max(sizes) <= limit and min(sizes) > 0.85 * max(sizes)
    u = unit_bytes(spec, scheme, 2048)
    assert u["embed"] == 2 * 128256 * 4096 and 105e6 < u["block"] < 125e6  # 218M params at ~4.3 bits
    assert len(plan_parts(spec, scheme, 2048, limit_bytes(2.0))) == 3  # a looser limit: fewer parts
    smol = find_preset("smollm2-135m").spec()  # type: ignore[union-attr]
    assert plan_parts(smol, scheme, 2048, limit) == [(0, smol.n_layers)]
    with pytest.raises(UnsupportedError, match="htp_context_limit_gb"):
        plan_parts(spec, scheme, 2048, limit_bytes(1.0))  # the 16-bit embedding alone is 1.05 GB
    from llamaship.targets.fit import predict_fit
    from llamaship.targets.profile import load_profile

    fit = predict_fit(spec, scheme, load_profile("qualcomm"))  # what `llamaship fit` and the report say
    assert [p["layers"] for p in fit.npu_parts] == [[0, 2], [2, 14], [14, 26], [26, 32]]
    assert "NPU: 4 part(s)" in fit.summary()
    assert predict_fit(spec, scheme, load_profile("x86_emulator")).npu_parts == []  # no SoC, no NPU artifact
