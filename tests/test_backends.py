"""The format registry: every format is a backend, and a new one plugs in with one register() call."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llamaship import backends
from llamaship.bundle import verify_bundle
from llamaship.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def toy():  # type: ignore[no-untyped-def]
    from tests.toy_format import Toy

    backend = backends.register(Toy())
    yield backend
    backends.unregister(backend.name)


def test_a_new_format_runs_through_export_verify_validate_and_generate(toy, gguf_path, tiny_profile, tmp_path,
                                                                      capsys):
    out = tmp_path / "bundle"
    assert main(["export", "--model", str(gguf_path), "--out", str(out), "--format", "toy", "--max-context", "128",
                 "--target", str(tiny_profile), "--eval-tokens", "256", "--prompt", "The tower"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    art = manifest["artifacts"][0]
    assert art["format"] == "toy" and (out / art["path"]).is_file()
    assert art["smoke_test"]["runtime"] == "eager PyTorch" and art["smoke_test"]["stats"]["generated_tokens"] >= 1
    assert manifest["export"]["stages_s"].keys() == {"quantize_stage", "toy_write_s"}
    report = json.loads((out / "report.json").read_text())
    acc = report["artifacts"][0]["accuracy"]
    assert report["artifacts"][0]["format"] == "toy" and report["artifacts"][0]["speed"] is None
    assert acc["mean_kld"] < 1e-3  # fp32 weights on the fp32 module: the reference itself
    assert verify_bundle(out) == []
    capsys.readouterr()
    assert main(["generate", str(out), "--format", "toy", "--prompt", "The tower", "--max-new-tokens", "3",
                 "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["format"] == "toy" and 1 <= stats["generated_tokens"] <= 3


def test_cli_choices_and_help_come_from_the_registry(toy):
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    text = " ".join(subcommands["export"].format_help().split())
    assert "toy: fp32 safetensors run by eager PyTorch" in text
    for name in backends.names():
        assert name in text
    gen = " ".join(subcommands["generate"].format_help().split())
    assert "toy: eager PyTorch" in gen


def test_unknown_format_is_refused_before_work(gguf_path, tmp_path, capsys):
    from llamaship.errors import UnsupportedError
    from llamaship.pipeline import export_bundle

    with pytest.raises(UnsupportedError, match="format 'nope' is not supported; available: executorch"):
        export_bundle(gguf_path, tmp_path / "b", formats=("nope",), progress=lambda s: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module", ["llamaship/pipeline.py", "targets/validate.py", "llamaship/cli.py"])
def test_no_format_names_outside_the_backends(module):
    """A format lives in its backend module: the layers above loop over the registry."""
    text = (ROOT / module).read_text()
    for name in backends.names():
        assert not re.search(rf"[\"']{name}[\"']", text), f"{module} names the format {name!r}"
