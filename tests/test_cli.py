"""The CLI end to end on a tiny checkpoint: export -> bundle -> verify -> generate, and the failure
paths: clear message, documented exit code, nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llamaship.bundle import MANIFEST, verify_bundle
from llamaship.cli import main


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_bundle_contents(tiny_bundle, gguf_path):
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    assert manifest["schema_version"] == 1
    onnx_files = {f"onnx/{f}" for f in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json",
                                         "tokenizer_config.json", "chat_template.jinja")}
    assert set(manifest["files"]) == {"model.pte", "tokenizer.json", "report.json", "report.md",
                                      "report.png"} | onnx_files
    assert manifest["validation"]["report"] == "report.json" and manifest["validation"]["passed"]
    assert manifest["model"]["layout"] == "gguf"
    assert len(manifest["model"]["source_sha256"]) == 64
    assert manifest["model"]["spec"]["n_layers"] == 2
    assert manifest["quant"]["group_size"] == 32 and manifest["quant"]["bits"] == 4
    assert [a["format"] for a in manifest["artifacts"]] == ["executorch", "onnx"]
    onnx = manifest["artifacts"][1]
    assert onnx["accuracy_level"] == 4 and onnx["quantization"]["quantized_ops"]
    assert all(a["smoke_test"]["stats"]["generated_tokens"] >= 1 for a in manifest["artifacts"])
    report = json.loads((tiny_bundle / "report.json").read_text())
    assert [a["format"] for a in report["artifacts"]] == ["executorch", "onnx"]
    assert {t["artifact"] for t in report["targets"]} == {"model.pte", "onnx/model.onnx"}
    assert manifest["tokenizer"]["stop_ids"][0] == 2
    assert manifest["tools"]["executorch"].startswith("1.5.1")
    assert manifest["export"]["peak_rss_mb"] > 0
    # the .pte lowered in a child process while the ONNX route ran and was scored
    assert manifest["export"]["pte_exported_in_background"] is True
    assert manifest["export"]["stages_s"]["executorch_lower_s"] > 0
    assert manifest["smoke_test"]["stats"]["prompt_tokens"] >= 1
    assert verify_bundle(tiny_bundle) == []


def test_verify_ok(tiny_bundle, capsys):
    assert main(["verify", str(tiny_bundle)]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_flipped_byte(tiny_bundle, tmp_path, capsys):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    pte = copy / "model.pte"
    data = bytearray(pte.read_bytes())
    data[len(data) // 2] ^= 0x01
    pte.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 4
    assert "model.pte: sha256 mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["missing", "extra", "zip-slip", "absolute", "newer-schema"])
def test_verify_rejects_damaged_bundles(tiny_bundle, tmp_path, damage, capsys):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    if damage == "missing":
        (copy / "tokenizer.json").unlink()
    elif damage == "extra":
        (copy / "notes.txt").write_text("hi")
    elif damage in ("zip-slip", "absolute"):
        entry = manifest["files"].pop("tokenizer.json")
        manifest["files"]["../evil.json" if damage == "zip-slip" else "/etc/passwd"] = entry
    else:
        manifest["schema_version"] = 99
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 4
    err = capsys.readouterr().err
    expected = {"missing": "tokenizer.json: missing", "extra": "notes.txt: not listed",
                "zip-slip": "unsafe path", "absolute": "unsafe path", "newer-schema": "upgrade llamaship"}
    assert expected[damage] in err


def test_generate_refuses_damaged_bundle(tiny_bundle, tmp_path, capsys):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    data = bytearray((copy / "model.pte").read_bytes())
    data[100] ^= 0x40
    (copy / "model.pte").write_bytes(bytes(data))
    assert main(["generate", str(copy), "--prompt", "x"]) == 4
    assert "refusing to use a damaged or altered bundle (model.pte: sha256 mismatch" in capsys.readouterr().err


def test_generate(tiny_bundle, capsys):
    assert main(["generate", str(tiny_bundle), "--prompt", "The tower is", "--max-new-tokens", "5",
                 "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    stats = json.loads(last)
    assert stats["prompt_tokens"] >= 1 and 1 <= stats["generated_tokens"] <= 5


def test_generate_onnx(tiny_bundle, capsys):
    assert main(["generate", str(tiny_bundle), "--format", "onnx", "--prompt", "The tower is",
                 "--max-new-tokens", "5", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["format"] == "onnx" and stats["prompt_tokens"] >= 1 and 1 <= stats["generated_tokens"] <= 5


def test_export_refuses_existing_out(tiny_bundle, gguf_path, capsys):
    before = sorted(p.name for p in tiny_bundle.iterdir())
    assert main(["export", "--model", str(gguf_path), "--out", str(tiny_bundle)]) == 4
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_bundle.iterdir()) == before


def test_truncated_checkpoint_leaves_nothing(tmp_path, llama2_hf_dir, capsys):
    bad = tmp_path / "ckpt"
    shutil.copytree(llama2_hf_dir, bad)
    shard = sorted(bad.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    out = tmp_path / "out" / "bundle"
    assert main(["export", "--model", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "truncated or corrupt" in err
    assert not out.exists()
    assert not out.parent.exists() or leftovers(out.parent) == []


def test_wrong_params_shapes_leave_nothing(tmp_path, llama2_meta_dir, capsys):
    bad = tmp_path / "ckpt"
    shutil.copytree(llama2_meta_dir, bad)
    params = json.loads((bad / "params.json").read_text())
    params["n_layers"] = 3
    (bad / "params.json").write_text(json.dumps(params))
    out = tmp_path / "bundle"
    assert main(["export", "--model", str(bad), "--out", str(out)]) == 2
    assert "lacks" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_failure_inside_staging_leaves_nothing(tmp_path, gguf_path, monkeypatch):
    """A failure after artifacts started to be written (here: the tokenizer write) removes the
    staging folder and never creates the destination."""
    from llamaship.export.llama import tokenizer as tok_mod

    def boom(self, folder):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tok_mod.Tokenizer, "write_runner_file", boom)
    monkeypatch.setattr("llamaship.export.executorch.export_pte",
                        lambda spec, state, scheme, out, **kw: out.write_bytes(b"partial") and {})
    out = tmp_path / "bundle"
    from llamaship.errors import BundleError
    from llamaship.pipeline import export_bundle

    with pytest.raises(BundleError, match="No space left on device.*nothing was written"):
        export_bundle(gguf_path, out, progress=lambda s: None)
    assert not out.exists() and leftovers(tmp_path) == []


def test_help_for_every_command():
    for cmd in ([], ["export"], ["generate"], ["verify"]):
        res = subprocess.run([sys.executable, "-m", "llamaship.cli", *cmd, "--help"],
                             capture_output=True, text=True, check=True)
        assert "usage: llamaship" in res.stdout
    res = subprocess.run([sys.executable, "-m", "llamaship.cli", "export", "--help"],
                         capture_output=True, text=True, check=True)
    for flag in ("--model", "--group-size", "--embedding-bits", "--lm-head-bits", "--max-context", "--force",
                 "--onnx-accuracy-level"):
        assert flag in res.stdout
