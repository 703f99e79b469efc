"""The main job end to end on the real embedded model, through the installed `llamaship` command
(several minutes on 2 cores: marked slow, run by `make test-slow` and in CI when time allows)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def llamaship(*args: str) -> subprocess.CompletedProcess[str]:
    """The console script of the environment running the tests (not whatever is first on PATH)."""
    exe = Path(sys.executable).parent / "llamaship"
    assert exe.exists(), f"llamaship console script not installed in {exe.parent}"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=1800)


def test_smollm2_bundle_answers_paris(tmp_path: Path):
    out = tmp_path / "smollm2"
    res = llamaship("export", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    # a person reads the progress lines: no library INFO logging, no native runtime lines
    assert "[INFO]" not in res.stderr and "Registering override fallback regex" not in res.stderr, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    smoke = manifest["smoke_test"]
    assert "Paris" in smoke["text"], smoke["text"]
    assert smoke["stats"]["decode_token_per_sec"] > 0
    assert manifest["quant"]["name"] == "8da4w-g32-emb4-head8"
    stage = manifest["quant"]["stage"]  # the default quantize stage: gptq, calibrated on validation text
    assert manifest["quant"]["algorithm"] == stage["algorithm"] == "gptq"
    assert stage["calibration"]["split"] == "validation" and stage["calibration"]["tokens"] == 8192
    # 135M params at ~4.5 bits plus an 8-bit lm_head: well under the 190 MB stock export
    assert manifest["files"]["model.pte"]["size"] < 130e6
    assert llamaship("verify", str(out)).returncode == 0
    # validation ran with the default x86_emulator profile on a 4096-token slice
    report = json.loads((out / "report.json").read_text())
    assert [a["format"] for a in report["artifacts"]] == ["executorch", "onnx"]
    acc = report["artifacts"][0]["accuracy"]
    assert manifest["validation"]["passed"], report["targets"][0]["gates"]
    # measured: KLD 0.154, top-1 0.799, PPL x1.146 on this slice (round to nearest gave 0.395 / 0.679 / x1.42)
    assert 0.05 < acc["mean_kld"] < 0.22 and 0.75 < acc["top1_agreement"] < 0.95 and 1.0 < acc["ppl_ratio"] < 1.25
    assert report["artifacts"][0]["speed"]["decode_tok_s"]["median"] > 20
    # the ONNX artifact (the same gptq codes, int8 lm_head, int4 embedding): measured KLD 0.144,
    # top-1 0.807, PPL x1.129 on this slice (onnxruntime's own k-quant gave 0.280); it also answers Paris
    onnx = next(a for a in manifest["artifacts"] if a["format"] == "onnx")
    assert "Paris" in onnx["smoke_test"]["text"], onnx["smoke_test"]["text"]
    oacc = report["artifacts"][1]["accuracy"]
    assert 0.05 < oacc["mean_kld"] < 0.2 and 0.75 < oacc["top1_agreement"] < 0.95 and 1.0 < oacc["ppl_ratio"] < 1.25
    # the same codes: the two formats' KLD within 15% of each other
    assert abs(oacc["mean_kld"] - acc["mean_kld"]) <= 0.15 * max(oacc["mean_kld"], acc["mean_kld"])
    assert report["artifacts"][1]["speed"]["decode_tok_s"]["median"] > 10
    assert manifest["files"]["onnx/model.onnx.data"]["size"] < 140e6
    # device-fit weights prediction vs the real .pte
    from llamaship.export.llama.load import load_spec
    from llamaship.pipeline import default_model
    from llamaship.quantize.scheme import QuantScheme
    from llamaship.targets.fit import predict_fit
    from llamaship.targets.profile import load_profile

    fit = predict_fit(load_spec(default_model()), QuantScheme(), load_profile("x86_emulator"))
    assert fit.weight_bytes == pytest.approx(manifest["files"]["model.pte"]["size"], rel=0.05)
    gen = llamaship("generate", str(out), "--prompt", "What is the capital of France?", "--chat",
                    "--max-new-tokens", "24", "--json")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "Paris" in gen.stdout
    stats = json.loads(gen.stdout.strip().splitlines()[-1])
    assert stats["decode_tok_s"] > 0
    gen = llamaship("generate", str(out), "--format", "onnx", "--prompt", "What is the capital of France?",
                    "--chat", "--max-new-tokens", "24", "--json")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "Paris" in gen.stdout and "<|im_end|>" not in gen.stdout
