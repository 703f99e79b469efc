"""Validation engine: accuracy on the artifact's own runtime, gates that catch a broken artifact,
profiles, device-fit arithmetic on the real Llama 2 7B / Llama 3 8B configs, report files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llamaship.cli import main
from llamaship.export.executorch import export_pte
from llamaship.export.llama.load import load_spec
from llamaship.quantize.scheme import QuantScheme
from llamaship.targets import accuracy
from llamaship.targets.fit import predict_fit
from llamaship.targets.profile import BUILTIN, load_profile
from llamaship.targets.validate import validate
from tests.checkpoints import LLAMA2_TOKENIZER

CONFIGS = Path(__file__).parent / "data" / "configs"


def meta_for(pte: Path, tok_name: str, scheme: QuantScheme | None, ckpt) -> dict:
    return {
        "model": {"source_sha256": ckpt.sha256()},
        "quant": scheme.to_json() if scheme else {"name": "fp32"},
        "artifacts": [{"format": "executorch", "path": pte.name, "max_context": 128}],
        "tokenizer": {"path": tok_name},
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_ckpt, tiny_q_pte) -> Path:
    f = tmp_path_factory.mktemp("valbundle")
    shutil.copyfile(tiny_q_pte, f / "model.pte")
    tiny_ckpt.tokenizer.write_runner_file(f)
    return f


def test_builtin_profiles_load():
    for name in BUILTIN:
        p = load_profile(name)
        assert p.ram_budget_gb < p.ram_gb and p.bandwidth_gbs > 0
        assert {"max_kld", "min_top1", "max_ppl_ratio"} <= p.gates.keys()
    assert load_profile("x86_emulator").measured_here
    assert load_profile("qualcomm").extra["htp_arch"] == "v75"


def test_unknown_profile_is_clear():
    from llamaship.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="unknown profile 'pixel'"):
        load_profile("pixel")


def test_slice_windows_and_scoring(tiny_ckpt):
    s = accuracy.make_slice(tiny_ckpt.tokenizer, 512, 128)
    assert len(s.tokens) == 512 and s.n_windows == 4
    assert s.first_scored == 63 and s.n_scored == 64  # second half of each window is scored
    assert "first 512 tokens of WikiText-2 test" in s.describe()


def test_stepwise_fp32_artifact_matches_reference(tiny_ckpt, tiny_fp32_pte):
    """The fp32 .pte fed token by token reproduces the fp32 module's prefill distribution."""
    from llamaship.export.llama.model import build_model
    from llamaship.targets.executorch_runtime import PteModule

    s = accuracy.make_slice(tiny_ckpt.tokenizer, 256, 128)
    ref_model = build_model(tiny_ckpt.spec, tiny_ckpt.state, max_context=128, full_logits=True)
    ref = accuracy.reference_logprobs(ref_model, s, tiny_ckpt.sha256(), progress=lambda m: None)
    acc = accuracy.evaluate_stepwise(PteModule(tiny_fp32_pte).forward, s, ref, progress=lambda m: None)
    assert acc.mean_kld < 1e-4 and acc.top1_agreement > 0.99
    assert abs(acc.ppl_ratio - 1) < 1e-3
    assert acc.ref_ppl == pytest.approx(accuracy.evaluate_reference_self(s, ref), rel=1e-6)
    # cached: a second call reads the same file instead of recomputing
    assert len(list(accuracy.cache_dir().glob("*.npy"))) >= 1


def test_streamed_reference_is_the_whole_models_and_resumes(tiny_ckpt, tmp_path, monkeypatch):
    """One block at a time over every window gives the whole fp32 module's log-probs (to fp32
    rounding, stored fp16); interrupted after a block, a rerun resumes there and gets the same."""
    from llamaship.export.llama.model import build_model
    from llamaship.targets.reference import streamed_logprobs

    s = accuracy.make_slice(tiny_ckpt.tokenizer, 512, 128)
    monkeypatch.setenv("LLAMASHIP_CACHE", str(tmp_path / "whole"))
    model = build_model(tiny_ckpt.spec, tiny_ckpt.state, max_context=128, full_logits=True)
    whole = np.array(accuracy.reference_logprobs(model, s, "sha", progress=lambda m: None), dtype=np.float32)

    monkeypatch.setenv("LLAMASHIP_CACHE", str(tmp_path / "streamed"))
    lines: list[str] = []

    def stop_after_first_block(msg: str) -> None:
        lines.append(msg)

    class Stop(Exception):
        pass

    def counter(label: str, done: int, total: int, note: str = "") -> None:
        if "blocks" in label and done == 1:
            raise Stop

    stop_after_first_block.advance = counter  # type: ignore[attr-defined]
    with pytest.raises(Stop):
        streamed_logprobs(tiny_ckpt.spec, tiny_ckpt.state, s, "sha", stop_after_first_block)
    folder = accuracy.cache_dir()
    assert [p.name.split(".", 1)[1] for p in sorted(folder.iterdir())] == ["hidden.json", "hidden.npy"]
    assert json.loads(next(folder.glob("*.hidden.json")).read_text())["blocks_done"] == 1
    resumed = np.array(streamed_logprobs(tiny_ckpt.spec, tiny_ckpt.state, s, "sha", lines.append), dtype=np.float32)
    assert any("resuming after block 1 of 2" in ln for ln in lines)
    assert sorted(p.suffix for p in folder.iterdir()) == [".npy"]  # the work files are gone, the entry stays
    assert resumed.shape == whole.shape
    np.testing.assert_allclose(resumed, whole, rtol=2e-3, atol=2e-3)  # fp16 storage of fp32-equal values
    assert (np.abs(resumed - whole) > 0).mean() < 0.01


def test_quantized_artifact_passes_and_broken_one_fails(tmp_path, tiny_ckpt, folder, tiny_profile):
    profile = load_profile(str(tiny_profile))
    scheme = QuantScheme()
    report = validate(tiny_ckpt, folder, meta_for(folder / "model.pte", "tokenizer.json", scheme, tiny_ckpt),
                      [profile], eval_tokens=512, progress=lambda m: None)
    assert report["passed"], report["targets"][0]["gates"]
    art = report["artifacts"][0]
    assert art["speed"]["decode_tok_s"]["median"] > 0 and art["speed"]["runs"] == 3
    assert art["speed"]["peak_rss_mb"] > 0

    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    broken_state = {k: v * 1.5 if v.dim() == 2 else v for k, v in tiny_ckpt.state.items()}
    export_pte(tiny_ckpt.spec, broken_state, scheme, broken_dir / "model.pte", max_context=128,
               progress=lambda m: None)
    tiny_ckpt.tokenizer.write_runner_file(broken_dir)
    bad = validate(tiny_ckpt, broken_dir, meta_for(broken_dir / "model.pte", "tokenizer.json", scheme, tiny_ckpt),
                   [profile], eval_tokens=512, progress=lambda m: None)
    assert not bad["passed"]
    failed = {g["gate"]: g for g in bad["targets"][0]["gates"] if not g["passed"]}
    assert "max_kld" in failed and failed["max_kld"]["by"] > 0
    assert bad["artifacts"][0]["accuracy"]["mean_kld"] > 10 * art["accuracy"]["mean_kld"]


def test_report_files_and_validate_cli(tmp_path, gguf_path, tiny_profile, capsys):
    out = tmp_path / "b"
    # rtn: the stock gates below must fail for the random toy (its gptq artifact passes them)
    assert main(["export", "--model", str(gguf_path), "--out", str(out), "--max-context", "128",
                 "--no-smoke", "--no-validate", "--quant-algo", "rtn"]) == 0
    assert not (out / "report.json").exists()
    assert main(["validate", str(out), "--profile", str(tiny_profile), "--eval-tokens", "512"]) == 0
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"]["passed"] and "report.json" in manifest["files"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "fp32 reference" in md and "mean KLD" in md and "tiny_test" in md
    assert "- ships: yes" in md and report["targets"][0]["ships"].startswith("yes")
    assert report["reference"]["ppl"] > 1
    assert main(["verify", str(out)]) == 0  # the rewritten manifest covers the report files
    capsys.readouterr()
    # the stock x86 profile's top-1 gate is too strict for a random toy model: exit 7, and why
    assert main(["validate", str(out), "--eval-tokens", "512"]) == 7
    assert "FAIL: min_top1" in capsys.readouterr().out


def test_real_configs_load_with_right_shapes(tmp_path):
    l3 = load_spec(CONFIGS / "meta-llama-3-8b" / "params.json")
    assert (l3.dim, l3.n_layers, l3.n_heads, l3.n_kv_heads, l3.hidden_dim, l3.vocab_size) == (
        4096, 32, 32, 8, 14336, 128256)
    assert l3.rope_theta == 500000.0 and l3.rope_scaling is None
    l31 = load_spec(CONFIGS / "llama-3.1-8b-instruct-hf" / "config.json")
    assert l31.rope_scaling is not None and l31.rope_scaling.factor == 8.0 and l31.hidden_dim == 14336
    assert load_spec(CONFIGS / "llama-3.1-8b" / "params.json").rope_scaling == l31.rope_scaling
    hf2 = load_spec(CONFIGS / "llama-2-7b-hf" / "config.json")
    assert (hf2.hidden_dim, hf2.vocab_size, hf2.n_kv_heads) == (11008, 32000, 32)
    meta2 = tmp_path / "llama-2-7b"
    shutil.copytree(CONFIGS / "llama-2-7b", meta2)
    shutil.copyfile(LLAMA2_TOKENIZER, meta2 / "tokenizer.model")  # vocab_size -1: from the tokenizer
    l2 = load_spec(meta2)
    assert (l2.hidden_dim, l2.vocab_size) == (11008, 32000)
    assert l2.param_count() == pytest.approx(6.74e9, rel=0.01)
    assert l3.param_count() == pytest.approx(8.03e9, rel=0.01)


def test_fit_arithmetic_against_published_figures():
    spec = load_spec(CONFIGS / "meta-llama-3-8b" / "params.json")
    profile = load_profile("qualcomm")
    # 4.5 bpw on every linear incl. lm_head (int4 g32 + bf16 scales): ~4.2 GB read per token
    fit = predict_fit(spec, QuantScheme(lm_head_bits=4), profile, context=1)
    assert fit.bytes_per_token / 1e9 == pytest.approx(7.5e9 * 4.5 / 8 / 1e9, rel=0.02)
    assert fit.decode_ceiling_tok_s == pytest.approx(76.8e9 / fit.bytes_per_token)
    # KV cache of Llama 3 8B: 2 x 32 layers x 8 heads x 128 x 4 bytes = 256 KiB per token (fp32)
    fit2k = predict_fit(spec, QuantScheme(), profile, context=2048)
    assert fit2k.kv_cache_bytes == 2 * 32 * 2048 * 8 * 128 * 4
    # fp32 Llama 2 7B cannot fit an iPhone's budget; 4-bit Llama 3 8B does not fit it either
    l2 = load_spec(CONFIGS / "llama-2-7b-hf" / "config.json")
    assert not predict_fit(l2, None, load_profile("apple")).fits
    assert not predict_fit(spec, QuantScheme(), load_profile("apple")).fits
    assert predict_fit(spec, QuantScheme(), profile).fits


def test_fit_cli(capsys):
    assert main(["fit", "--model", str(CONFIGS / "meta-llama-3-8b-hf" / "config.json"),
                 "--profile", "qualcomm", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["decode_ceiling_tok_s"] > 10
    assert main(["fit", "--model", str(CONFIGS / "meta-llama-3-8b-hf" / "config.json"),
                 "--profile", "apple"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_weights_prediction_matches_real_pte_size(tiny_ckpt, tiny_q_pte):
    """The bpw model used by `fit` accounts for a real .pte: weights plus a fixed program overhead
    of ~60 KB (the slow SmolLM2 test checks the 135M case to 5%)."""
    fit = predict_fit(tiny_ckpt.spec, QuantScheme(), load_profile("x86_emulator"), context=128)
    assert fit.weight_bytes < tiny_q_pte.stat().st_size < fit.weight_bytes + 80_000



def test_large_models_default_to_a_slice_that_fits_the_half_hour(tiny_ckpt):
    """From 1B parameters up, `validate`'s default slice is the whole windows one artifact's
    validation fits in about 30 minutes here, not the profile's 32768 tokens (hours at 8B), sized
    for the slowest format scored on it."""
    from llamaship import backends
    from llamaship.targets.validate import REFERENCE_S_PER_TOKEN_8B, VALIDATE_BUDGET_S, default_eval_tokens

    profile = load_profile("x86_emulator")
    assert default_eval_tokens(tiny_ckpt.spec, [profile], 512, ["coreml"]) == profile.eval_tokens
    l3 = load_spec(CONFIGS / "meta-llama-3-8b" / "params.json")
    for formats in (["executorch"], ["onnx"], ["coreml"]):
        n = default_eval_tokens(l3, [profile], 512, formats)
        per_token = REFERENCE_S_PER_TOKEN_8B + backends.get(formats[0]).eval_s_per_token_8b
        assert n % 512 == 0 and 1024 <= n < profile.eval_tokens
        assert n * per_token <= VALIDATE_BUDGET_S < (n + 512) * per_token or n == 1024
    assert default_eval_tokens(l3, [profile], 512, ["executorch", "coreml"]) == default_eval_tokens(
        l3, [profile], 512, ["coreml"]) < default_eval_tokens(l3, [profile], 512, ["executorch"])
    l2 = load_spec(CONFIGS / "llama-2-7b-hf" / "config.json")
    assert default_eval_tokens(l2, [profile], 512, ["onnx"]) >= default_eval_tokens(l3, [profile], 512, ["onnx"])


def test_a_cut_slice_says_what_the_full_one_would_take():
    from llamaship.targets.report import render_markdown

    acc = {"ppl": 1.0, "ppl_ratio": 1.0, "mean_kld": 0.1, "top1_agreement": 0.9, "rms_dp": 0.01,
           "eval_seconds": 600.0, "full_slice": {"tokens": 32768, "estimated_seconds": 9600}}
    report = {"model": "m", "slice": "first 2048 tokens", "reference": None, "targets": [],
              "artifacts": [{"path": "model.pte", "format": "executorch", "scheme": "s", "size_bytes": 1,
                             "accuracy": acc, "speed": None}]}
    md = render_markdown(report)
    assert "took 10.0 min here on this slice; the profile's full 32768-token slice would take about 160 min" in md
