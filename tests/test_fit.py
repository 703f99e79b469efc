"""`llamaship fit` before any download: named presets, the model x profile x scheme matrix, and
per-format file sizes that match what the full-size bench measured."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from llamaship.cli import main
from llamaship.export.llama.load import load_spec
from llamaship.export.llama.presets import PRESETS
from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.storage import MATMULNBITS
from llamaship.targets.fit import predict_sizes, weight_parts

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data" / "configs"


@pytest.mark.parametrize(("preset", "config"), [
    ("llama2-7b", "llama-2-7b-hf"), ("llama3-8b", "meta-llama-3-8b-hf"), ("llama3.1-8b", "llama-3.1-8b-instruct-hf"),
])
def test_presets_are_the_published_configs(preset, config):
    a, b = load_spec(preset), load_spec(CONFIGS / config / "config.json")
    assert a.replace(name="x").to_json() == b.replace(name="x").to_json()


@pytest.mark.parametrize(("name", "params_b", "tied"), [
    ("llama3.2-1b", 1.236, True), ("llama3.2-3b", 3.213, True), ("smollm2-135m", 0.1345, True),
    ("meta-llama/Meta-Llama-3-8B-Instruct", 8.030, False), ("HuggingFaceTB/SmolLM2-135M-Instruct", 0.1345, True),
])
def test_presets_by_name_and_hub_id(name, params_b, tied):
    spec = load_spec(name)
    assert spec.param_count() / 1e9 == pytest.approx(params_b, rel=1e-3) and spec.tied_embeddings is tied


def test_sizes_match_the_measured_full_size_artifacts():
    """Every 7B/8B artifact the full-size bench wrote, predicted within 3%."""
    rows = [r for r in json.loads((ROOT / "bench/results/fullsize.json").read_text())["rows"]
            if r.get("artifact_gb") and r.get("layers") is None and r.get("exit") == 0]
    assert {r["format"] for r in rows} >= {"executorch", "onnx", "coreml"} and len(rows) >= 8
    for r in rows:
        spec, scheme = load_spec(r["model"]), QuantScheme(group_size=r["group_size"])
        predicted = predict_sizes(spec, scheme)[r["format"]]
        if r["format"] == "onnx" and r.get("zero_points_dropped") is None:
            # measured before the export dropped symmetric blocks' default zero points: add them back
            with_zeros = replace(MATMULNBITS, zeros_when_symmetric=True)
            predicted += sum(weight_parts(spec, scheme, with_zeros).values()) - sum(
                weight_parts(spec, scheme, MATMULNBITS).values())
        assert predicted / 1e9 == pytest.approx(r["artifact_gb"], rel=0.03), r


def test_fit_one_preset(capsys):
    assert main(["fit", "--model", "llama3-8b", "--profile", "qualcomm"]) == 0
    out = capsys.readouterr().out
    assert "llama3-8b [8da4w-g32-emb4-head8] on qualcomm" in out and "fits" in out and "ceiling 16.3 tok/s" in out
    assert "predicted file size: executorch 4.78 GB, onnx 5.28 GB, coreml 4.87 GB" in out


def test_fit_that_does_not_fit_exits_3(capsys):
    assert main(["fit", "--model", "llama2-7b", "--profile", "qualcomm", "--context", "4096"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_fit_all_prints_the_matrix_and_draws_it(tmp_path, capsys):
    plot = tmp_path / "fit.png"
    assert main(["fit", "--all", "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [ln for ln in lines if ln.split() and ln.split()[0] in PRESETS]
    assert len(rows) == len(PRESETS) * 3 * 4  # presets x built-in profiles x (g32, g128) x (head 8, 4)
    assert "onnx GB" in lines[0] and "ceiling tok/s" in lines[0]
    assert any(" NO " in r for r in rows) and any(" yes " in r for r in rows)
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_fit_json_and_list(capsys):
    assert main(["fit", "--model", "llama3.2-1b", "--model", "smollm2-135m", "--profile", "apple", "--json"]) == 0
    fits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [f["model"] for f in fits] == ["llama3.2-1b", "smollm2-135m"]
    assert set(fits[0]["sizes_bytes"]) >= {"executorch", "onnx", "coreml", "qnn"}
    assert main(["fit", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(key in listing for key in PRESETS) and "meta-llama/Meta-Llama-3-8B" in listing


def test_unknown_hub_id_offline_is_a_clear_error(capsys):
    assert main(["fit", "--model", "acme/not-a-model-7b"]) == 2
    err = capsys.readouterr().err
    assert "not a preset" in err and "llamaship fit --list" in err and "llama3-8b" in err


def test_profile_report_shows_the_prediction_next_to_the_measurement(tiny_bundle, tmp_path):
    """`llamaship profile` records fit's roofline for the bundle's model and scheme beside what the
    phone measured (the adb side is tested in test_profiling with recorded runner output)."""
    from llamaship.cli import _predicted_for
    from llamaship.targets.report import write_report

    fit = _predicted_for(tiny_bundle, "qualcomm")
    report = json.loads((tiny_bundle / "report.json").read_text())
    report["prediction"] = {"profile": "qualcomm", **fit.to_json()}
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert f"decode ceiling {fit.decode_ceiling_tok_s:.1f} tok/s" in md and "Predicted for the qualcomm profile" in md
    measured = json.loads((tiny_bundle / "report.json").read_text())["artifacts"]
    assert all(a["predicted_size_bytes"] == pytest.approx(fit.sizes_bytes[a["format"]]) for a in measured)
