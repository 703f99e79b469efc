"""What an export checks before its first expensive step, the data the package carries, and the
progress a person sees."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from llamaship import preflight
from llamaship.cli import main
from llamaship.data import CALIB_FILE, EVAL_FILE, HERE, data_file
from llamaship.errors import BundleError, DataError
from llamaship.progress import Reporter, advance, natural_key


def test_the_package_carries_its_text(monkeypatch):
    monkeypatch.delenv("LLAMASHIP_DATA", raising=False)
    for name in (EVAL_FILE, CALIB_FILE):
        path = data_file(name)
        assert path.parent == HERE and path.stat().st_size > 1_000_000
    assert data_file(EVAL_FILE).read_text().startswith(" \n = Robert <unk> = \n")
    assert "CC BY-SA 3.0" in (HERE / "README.md").read_text()


def test_llamaship_data_overrides_and_names_the_missing_file(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMASHIP_DATA", str(tmp_path))
    with pytest.raises(DataError, match=f"{tmp_path}/{EVAL_FILE} not found: LLAMASHIP_DATA"):
        data_file(EVAL_FILE)
    (tmp_path / EVAL_FILE).write_text("own text")
    assert data_file(EVAL_FILE) == tmp_path / EVAL_FILE


def test_missing_eval_text_fails_before_the_checkpoint_is_read(monkeypatch, tmp_path, capsys):
    """The checkpoint path does not even exist: the data check comes first, in well under a second."""
    monkeypatch.setenv("LLAMASHIP_DATA", str(tmp_path))
    started = time.perf_counter()
    code = main(["export", "--model", str(tmp_path / "nowhere.gguf"), "--out", str(tmp_path / "b")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{EVAL_FILE} not found" in err and "nowhere.gguf" not in err
    assert not (tmp_path / "b").exists()
    assert time.perf_counter() - started < 30  # a guard against a lowering, not a speed test


def test_output_folder_checks(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BundleError, match="is a file, not a folder"):
        preflight.check_output_folder(tmp_path / "afile" / "sub" / "b")
    assert preflight.check_output_folder(tmp_path / "new" / "deeper" / "b") == tmp_path


def test_disk_space_is_checked_against_the_expected_size(gguf_path, tmp_path):
    from llamaship.export.llama.load import load_checkpoint
    from llamaship.quantize.scheme import QuantScheme

    spec = load_checkpoint(gguf_path).spec
    need = preflight.expected_bytes(spec, QuantScheme(), ("executorch", "onnx"), weight_bytes=1e6)
    assert need > 2.5e6
    assert preflight.expected_bytes(spec, QuantScheme(), ("qnn",), 1e6) > 4 * spec.param_count()
    preflight.check_disk_space(tmp_path, need, tmp_path / "b")
    with pytest.raises(BundleError, match=r"not enough disk space .* needs about .* GB"):
        preflight.check_disk_space(tmp_path, 1 << 60, tmp_path / "b")


def test_layers_sort_as_numbers():
    names = ["layers.10.w", "layers.2.w", "layers.1.w", "norm"]
    assert sorted(names, key=natural_key) == ["layers.1.w", "layers.2.w", "layers.10.w", "norm"]


def test_progress_without_a_terminal_prints_lines():
    out = io.StringIO()
    reporter = Reporter(out)
    with reporter:
        reporter("lowering")
        for i in range(1, 6):
            advance(reporter, "artifact windows", i, 5)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("] lowering") and lines[0].startswith("[")
    assert [ln.split("] ", 1)[1] for ln in lines[1:]] == ["artifact windows: 1/5", "artifact windows: 5/5"]


def test_advance_on_a_plain_callable():
    got: list[str] = []
    for i in range(1, 4):
        advance(got.append, "layers", i, 3)
    advance(got.append, "artifact windows", 8, 8, "52.1 tok/s")
    assert got == ["layers: 1/3", "layers: 3/3", "artifact windows: 8/8 (52.1 tok/s)"]


def test_gguf_models_get_a_name_a_person_recognises():
    from llamaship.export.llama.load_gguf import display_name

    meta = {"general.basename": "smollm2", "general.size_label": "135M", "general.name": "Smollm2 135M 8k Lc100K"}
    assert display_name(meta, Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert display_name(meta, Path("llama-2-7b.Q4_K_M.gguf")) == "llama-2-7b"
    assert display_name(meta, Path("ggml-model-f16.gguf")) == "smollm2-135M"


def test_verbose_shows_the_runtimes_native_lines(monkeypatch, capfd):
    """Native log lines are hidden unless `--verbose` asked for them."""
    from llamaship.targets.executorch_runtime import native_output_captured

    for verbose in ("", "1"):
        monkeypatch.setenv("LLAMASHIP_VERBOSE", verbose)
        with native_output_captured() as native:
            os.write(2, b"I tokenizers:regex.cpp:40] Registering override fallback regex\n")
        assert "Registering" in native[0]
        assert ("Registering" in capfd.readouterr().err) == bool(verbose)
