"""Hostile inputs, round two: code in data, bundles that reach outside themselves, --force on
folders that are not ours, corrupt headers and configs that used to export garbage with exit 0,
out-of-range flags, signals, and anything that used to end in a traceback.

Every case asserts the exit code, the message, and that nothing is left behind (no bundle, no
staging folder, the user's files untouched). Inputs are made here from the tiny checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llamaship.bundle import DIGEST, MANIFEST, verify_bundle
from llamaship.cli import USAGE_EXIT, main

MARKER = Path("/tmp/llamaship-template-pwned")


def reseal(bundle: Path) -> None:
    """What an attacker who edits manifest.json does next: rewrite its digest file too."""
    digest = hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()
    (bundle / DIGEST).write_text(f"{digest}  {MANIFEST}\n")


def edit_manifest(bundle: Path, edit: Callable[[dict], None], seal: bool = True) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if seal:
        reseal(bundle)


def staging_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def run(argv: list[str], capsys) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- 1. no code runs from data

TEMPLATES = {
    "rce-globals": ("{{ cycler.__init__.__globals__.os.system('touch " + str(MARKER) + "') }}", "may not"),
    "rce-mro": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "may not"),
    "mutate-messages": ("{{ messages.append({'role': 'x'}) }}", "may not"),
    "cpu-burn": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
    "huge-string": ("{{ 'x' * 1000000000 }}", "larger than"),
    "huge-power": ("{{ 9 ** 9 ** 9 }}", "may not"),
    "syntax-error": ("{% for %}", "failed"),
    "raises": ("{{ raise_exception('system role not supported') }}", "system role not supported"),
}


@pytest.mark.parametrize("case", list(TEMPLATES), ids=list(TEMPLATES))
def test_hostile_chat_template_in_a_bundle_is_refused(case, bundle_copy, capsys):
    template, fragment = TEMPLATES[case]
    edit_manifest(bundle_copy, lambda m: m["tokenizer"].__setitem__("chat_template", template))
    started = time.monotonic()
    code, err = run(["generate", str(bundle_copy), "--chat", "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert code == 4, err
    assert fragment in err and "run without --chat" in err and str(bundle_copy) in err
    assert "Traceback" not in err
    assert time.monotonic() - started < 30
    assert not MARKER.exists()


def test_hostile_template_from_a_checkpoint_is_left_out_of_the_bundle(llama2_hf_dir, tmp_path, capsys):
    """tokenizer_config.json carries a template that would run a shell command: the export goes on
    without it (said on stderr and in the manifest), and nothing ran."""
    model = tmp_path / "model"
    shutil.copytree(llama2_hf_dir, model)
    payload = "{{ cycler.__init__.__globals__.os.system('touch " + str(MARKER) + "') }}"
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": payload}))
    out = tmp_path / "b"
    code, err = run(["export", "--model", str(model), "--out", str(out), "--format", "onnx", "--no-validate",
                     "--max-context", "64", "--smoke-tokens", "4"], capsys)
    assert code == 0, err
    assert "chat template is left out of the bundle" in err
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["tokenizer"]["chat_template"] is None
    assert "may not" in manifest["tokenizer"]["chat_template_refused"]
    assert not MARKER.exists()


def test_template_that_is_not_text_is_a_checkpoint_error(llama2_hf_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(llama2_hf_dir, model)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": 42}))
    code, err = run(["export", "--model", str(model), "--out", str(tmp_path / "b"), "--no-validate"], capsys)
    assert code == 2 and "chat_template is a int, not text" in err
    assert not (tmp_path / "b").exists() and staging_leftovers(tmp_path) == []


# ---------------------------------------------------------------- 2. a closed, tamper-evident bundle

def test_edited_manifest_fails_verify(bundle_copy, capsys):
    edit_manifest(bundle_copy, lambda m: m["tokenizer"].__setitem__("chat_template", "{{ 1 }}"), seal=False)
    code, err = run(["verify", str(bundle_copy)], capsys)
    assert code == 4 and "changed after export" in err


def test_digest_pins_a_resealed_manifest(tiny_bundle, bundle_copy, capsys):
    original = hashlib.sha256((tiny_bundle / MANIFEST).read_bytes()).hexdigest()
    code, out = main(["verify", str(tiny_bundle), "--digest", f"sha256:{original}"]), capsys.readouterr().out
    assert code == 0 and original in out
    edit_manifest(bundle_copy, lambda m: m["tokenizer"].__setitem__("chat_template", "{{ 1 }}"))
    assert main(["verify", str(bundle_copy)]) == 0  # resealed: consistent with itself ...
    capsys.readouterr()
    code, err = run(["verify", str(bundle_copy), "--digest", f"sha256:{original}"], capsys)
    assert code == 4 and "is not the expected" in err  # ... but not the bundle the user was given


def test_missing_digest_file_fails_verify(bundle_copy, capsys):
    (bundle_copy / DIGEST).unlink()
    code, err = run(["verify", str(bundle_copy)], capsys)
    assert code == 4 and f"{DIGEST}: missing" in err


def test_tokenizer_path_outside_the_bundle_is_refused(bundle_copy, capsys):
    edit_manifest(bundle_copy, lambda m: m["tokenizer"].__setitem__("path", "../../../etc/passwd"))
    code, err = run(["generate", str(bundle_copy), "--prompt", "hi"], capsys)
    assert code == 4 and "unsafe path" in err


def test_symlink_out_of_the_bundle_is_refused(bundle_copy, capsys):
    target = bundle_copy.parent / "outside.json"
    shutil.copyfile(bundle_copy / "tokenizer.json", target)
    (bundle_copy / "tokenizer.json").unlink()
    (bundle_copy / "tokenizer.json").symlink_to(target)  # same bytes, so the sha256 matches
    code, err = run(["verify", str(bundle_copy)], capsys)
    assert code == 4 and "leads outside the bundle" in err and "a symlink" in err
    code, err = run(["generate", str(bundle_copy), "--prompt", "hi"], capsys)
    assert code == 4 and "refusing to use" in err


def test_fifo_in_place_of_an_artifact_is_refused(bundle_copy, capsys):
    (bundle_copy / "onnx" / "genai_config.json").unlink()
    os.mkfifo(bundle_copy / "onnx" / "genai_config.json")
    code, err = run(["verify", str(bundle_copy)], capsys)  # would block forever if it were opened
    assert code == 4 and "not a regular file" in err


def test_manifest_that_is_a_fifo_is_refused(bundle_copy, capsys):
    (bundle_copy / MANIFEST).unlink()
    os.mkfifo(bundle_copy / MANIFEST)
    code, err = run(["verify", str(bundle_copy)], capsys)
    assert code == 4 and "not a regular file" in err


@pytest.mark.parametrize(("text", "fragment"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("[1, 2]", "must be a JSON object"),
    ('{"schema_version": NaN, "files": {}}', "not valid JSON"),
    ('{"files": {}, "files": {"x": {}}}', "appears twice"),
    (b"\xff\xfe{}", "not UTF-8"),
], ids=["deep", "array", "nan", "duplicate-key", "not-utf8"])
def test_malformed_manifest_is_a_bundle_error(bundle_copy, text, fragment, capsys):
    (bundle_copy / MANIFEST).write_bytes(text if isinstance(text, bytes) else text.encode())
    code, err = run(["verify", str(bundle_copy)], capsys)
    assert code == 4 and fragment in err and "Traceback" not in err


def test_manifest_naming_a_missing_artifact_file(bundle_copy, capsys):
    edit_manifest(bundle_copy, lambda m: m["artifacts"][0].__setitem__("path", "elsewhere.pte"))
    code, err = run(["verify", str(bundle_copy)], capsys)
    assert code == 4 and "manifest names 'elsewhere.pte'" in err


def test_profile_verifies_before_it_pushes(bundle_copy, tmp_path, capsys):
    (bundle_copy / "model.pte").write_bytes(b"not the program")
    runner = tmp_path / "llama_main"
    runner.write_bytes(b"\x7fELF")
    code, err = run(["profile", str(bundle_copy), "--device", "SERIAL", "--runner", str(runner),
                     "--adb", "/nonexistent/adb"], capsys)
    assert code == 4 and "model.pte" in err and "refusing to use" in err


def test_validate_failure_leaves_the_bundle_as_it_was(bundle_copy, tiny_profile, monkeypatch, capsys):
    """The report write fails halfway (report.json written, then the disk fills): the bundle keeps
    its old report and manifest and still verifies."""
    import llamaship.targets.report as report_mod

    before = {p.relative_to(bundle_copy).as_posix(): p.read_bytes() for p in bundle_copy.rglob("*") if p.is_file()}
    real = report_mod.write_report

    def fail_after_json(report, folder):  # type: ignore[no-untyped-def]
        (Path(folder) / "report.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_mod, "write_report", fail_after_json)
    code, err = run(["validate", str(bundle_copy), "--profile", str(tiny_profile), "--eval-tokens", "256"], capsys)
    assert code == 4 and "No space left on device" in err and "left as it was" in err
    after = {p.relative_to(bundle_copy).as_posix(): p.read_bytes() for p in bundle_copy.rglob("*") if p.is_file()}
    assert after == before
    assert verify_bundle(bundle_copy) == []
    assert staging_leftovers(bundle_copy.parent) == []
    assert real is not fail_after_json


def test_bundle_files_are_readable_by_others(tiny_bundle):
    umask = os.umask(0)
    os.umask(umask)
    for path in [tiny_bundle, *tiny_bundle.rglob("*")]:
        want = (0o755 if path.is_dir() else 0o644) & ~umask
        assert path.stat().st_mode & 0o777 == want, path


# ---------------------------------------------------------------- 3. --force never deletes what is not ours

def _force_export(gguf_path: Path, out: str, capsys) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    return run(["export", "--model", str(gguf_path), "--out", out, "--force", "--no-validate"], capsys)


@pytest.mark.parametrize("out", ["", ".", "..", "~"], ids=["empty", "dot", "parent", "home"])
def test_force_refuses_the_users_folders(out, gguf_path, tmp_path, monkeypatch, capsys):
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    code, err = _force_export(gguf_path, str(Path(out).expanduser()) if out == "~" else out, capsys)
    assert code == 4, err
    assert "--out is empty" in err if out == "" else "holds your work" in err
    assert (work / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


def test_force_refuses_the_folder_holding_the_checkpoint(gguf_path, tmp_path, capsys):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    model = model_dir / "tiny.gguf"
    shutil.copyfile(gguf_path, model)
    code, err = run(["export", "--model", str(model), "--out", str(model_dir), "--force"], capsys)
    assert code == 4 and "holds the source checkpoint" in err
    assert model.read_bytes() == gguf_path.read_bytes()


def test_force_refuses_a_folder_that_is_not_a_bundle(gguf_path, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff\xd8")
    code, err = _force_export(gguf_path, str(out), capsys)
    assert code == 4 and "not a llamaship bundle" in err and "--force replaces only" in err
    assert (out / "cat.jpg").read_bytes() == b"\xff\xd8"


def test_force_refuses_a_file(gguf_path, tmp_path, capsys):
    out = tmp_path / "report.txt"
    out.write_text("keep me")
    code, err = _force_export(gguf_path, str(out), capsys)
    assert code == 4 and "is not a folder" in err and out.read_text() == "keep me"


# ---------------------------------------------------------------- 4. corrupt inputs never export

def _rewrite_header(folder: Path, edit: Callable[[dict], object], min_tensors: int = 1) -> None:
    """Edit the JSON header of the first shard holding `min_tensors` tensors, in place, keeping the
    data bytes where they were."""
    for path in sorted(folder.glob("*.safetensors")):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        if len([k for k in header if k != "__metadata__"]) >= min_tensors:
            break
    new = edit(header)
    text = new if isinstance(new, str) else json.dumps(header)
    encoded = text.encode()
    encoded += b" " * max(0, n - len(encoded))  # same length where possible: offsets stay valid
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _negative_offsets(header: dict) -> None:
    name = _first_tensor(header)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin - 16, end - 16]


def _overlap(header: dict) -> None:
    names = [k for k in header if k != "__metadata__"]
    a, b = sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + size]


def _duplicate_name(header: dict) -> str:
    name = _first_tensor(header)
    entry = dict(header[name], dtype="F16")
    body = json.dumps(header)[:-1]
    return body + f', "{name}": {json.dumps(entry)}' + "}"


def _edit_json(name: str, **changes: object) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        data.update(changes)
        (folder / name).write_text(json.dumps(data))
    return mutate


def _edit_config(**changes: object) -> Callable[[Path], None]:
    return _edit_json("config.json", **changes)


def _raw_config(text: str | bytes) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return mutate


def _config_fifo(folder: Path) -> None:
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")


def _config_endless(folder: Path) -> None:
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("/dev/zero")


def _config_huge(folder: Path) -> None:
    with open(folder / "config.json", "wb") as f:
        f.truncate(65 << 20)


def _edit_params(**changes: object) -> Callable[[Path], None]:
    return _edit_json("params.json", **changes)


def _tokenizer_config(data: bytes) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / "tokenizer_config.json").write_bytes(data)
    return mutate


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# (id, layout, mutation, exit code, message fragment)
CORRUPT: list[tuple[str, str, Callable[[Path], None], int, str]] = [
    ("st-negative-offsets", "hf", lambda f: _rewrite_header(f, _negative_offsets), 2, "not a non-negative integer"),
    ("st-overlapping-tensors", "hf", lambda f: _rewrite_header(f, _overlap, 2), 2, "claim the same bytes"),
    ("st-duplicate-name-other-dtype", "hf", lambda f: _rewrite_header(f, _duplicate_name), 2, "appears twice"),
    ("st-header-is-array", "hf", lambda f: _rewrite_header(f, lambda h: "[1, 2, 3]"), 2, "must be a JSON object"),
    ("st-header-deeply-nested", "hf", lambda f: _rewrite_header(f, lambda h: "[" * 50000 + "]" * 50000), 2,
     "nested too deeply"),
    ("st-float-shape", "hf", lambda f: _rewrite_header(
        f, lambda h: h[_first_tensor(h)].__setitem__("shape", [1.5, 2])), 2, "not a non-negative integer"),
    ("config-rope-theta-nan", "hf", _raw_config('{"model_type": "llama", "rope_theta": NaN}'), 2,
     "not a number JSON allows"),
    ("config-rope-theta-overflow", "hf", _edit_config(rope_theta=1e308 * 10), 2, "not a number JSON allows"),
    ("config-zero-heads", "hf", _edit_config(num_attention_heads=0), 2, "positive integer"),
    ("config-negative-kv-heads", "hf", _edit_config(num_key_value_heads=-1), 2, "positive integer"),
    ("config-rope-incomplete", "hf", _edit_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}), 2,
     "is incomplete"),
    ("config-rope-not-object", "hf", _edit_config(rope_scaling="llama3"), 2, "must be an object"),
    ("config-rope-equal-bands", "hf", _edit_config(rope_scaling=dict(LLAMA3_ROPE, high_freq_factor=1.0)), 2,
     "must exceed"),
    ("config-architectures-not-text", "hf", _edit_config(architectures=[1, 2]), 3, "not supported"),
    ("config-bool-layers", "hf", _edit_config(num_hidden_layers=True), 2, "positive integer"),
    ("config-is-fifo", "hf", _config_fifo, 2, "not a regular file"),
    ("config-is-endless", "hf", _config_endless, 2, "not a regular file"),
    ("config-is-huge", "hf", _config_huge, 2, "more than"),
    ("config-deeply-nested", "hf", _raw_config("[" * 100_000 + "]" * 100_000), 2, "nested too deeply"),
    ("config-is-string", "hf", _raw_config('"llama"'), 2, "must be a JSON object"),
    ("tokenizer-config-not-utf8", "hf", _tokenizer_config(b'{"chat_template": "\xff\xfe"}'), 2, "not UTF-8"),
    ("tokenizer-config-array", "hf", _tokenizer_config(b"[]"), 2, "must be a JSON object"),
    ("params-zero-multiple-of", "meta", _edit_params(multiple_of=0), 2, "multiple_of must be a positive integer"),
    ("params-negative-ffn-multiplier", "meta", _edit_params(ffn_dim_multiplier=-1.3), 2, "ffn_dim_multiplier"),
    ("params-zero-heads", "meta", _edit_params(n_heads=0), 2, "positive integers"),
    ("params-theta-infinite", "meta", lambda f: (f / "params.json").write_text(
        (f / "params.json").read_text()[:-1] + ', "rope_theta": Infinity}'), 2, "not a number JSON allows"),
]


@pytest.mark.parametrize("case", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_checkpoint_never_exports(case, llama2_hf_dir, llama2_meta_dir, tmp_path, capsys):
    name, layout, mutate, code, fragment = case
    model = tmp_path / "model"
    shutil.copytree(llama2_hf_dir if layout == "hf" else llama2_meta_dir, model)
    mutate(model)
    outdir = tmp_path / "out"
    outdir.mkdir()
    got, err = run(["export", "--model", str(model), "--out", str(outdir / "b"), "--no-validate"], capsys)
    with capsys.disabled():
        print(f"\nCASE {name}: exit {got}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    assert got == code, err
    assert fragment in err, err
    assert str(model) in err and "error: " in err and "Traceback" not in err
    assert list(outdir.iterdir()) == []


def test_gguf_with_malformed_tokenizer_metadata(gguf_model, bpe_vocab, tmp_path, capsys):
    from tests.checkpoints import write_gguf

    tokens, merges, types = bpe_vocab
    path = write_gguf(gguf_model, tmp_path / "bad.gguf", tokens, ["no-space-here", *merges], types[:-5])
    code, err = run(["export", "--model", str(path), "--out", str(tmp_path / "b"), "--no-validate"], capsys)
    assert code == 2 and "GGUF tokenizer metadata is malformed" in err and str(path) in err
    assert not (tmp_path / "b").exists() and staging_leftovers(tmp_path) == []


def test_smoke_answer_of_nothing_fails_the_export(llama2_hf_dir, tmp_path, capsys):
    """A zeroed output projection gives flat logits: greedy decoding emits token 0 (<unk>) forever.
    That bundle used to ship with exit 0; now the export stops and writes nothing."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(llama2_hf_dir, model)
    for shard in model.glob("*.safetensors"):
        tensors = load_file(shard)
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"].zero_()
            save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(["export", "--model", str(model), "--out", str(out / "b"), "--format", "onnx", "--no-validate",
                     "--max-context", "64", "--smoke-tokens", "4", "--quant", "fp32"], capsys)
    assert code == 5, err
    assert "no text, so the exported model is broken" in err and str(model) in err
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- profiles and the cache

@pytest.mark.parametrize(("content", "fragment"), [
    (None, "is a folder"),
    ('name = "x"\ndevice = "y"\nram_gb = "lots"\nram_budget_gb = 1\nbandwidth_gbs = 1\n', "bad field"),
    ('name = "x"\ndevice = "y"\nram_gb = -8\nram_budget_gb = -9\nbandwidth_gbs = 10\n', "must be a positive number"),
    ('name = "x"\ndevice = "y"\nram_gb = 8\nram_budget_gb = 9\nbandwidth_gbs = 10\n', "exceeds ram_gb"),
    ("name = [\n", "not valid TOML"),
], ids=["directory", "mistyped", "negative-ram", "budget-over-ram", "broken-toml"])
def test_bad_profile(content, fragment, tmp_path, capsys):
    path = tmp_path / "phone.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    code, err = run(["fit", "--profile", str(path)], capsys)
    assert code == 3 and fragment in err and str(path) in err and "Traceback" not in err


def test_reference_cache_that_is_a_file_or_corrupt(tiny_ckpt, tmp_path, monkeypatch):
    """LLAMASHIP_CACHE naming a file costs a recomputation, not the run; a corrupt cached .npy is
    replaced; a temp file of a killed process is swept."""
    from llamaship.export.llama.model import build_model
    from llamaship.targets import accuracy

    model = build_model(tiny_ckpt.spec, tiny_ckpt.state, max_context=128, impl="torch", full_logits=True)
    eval_slice = accuracy.EvalSlice(tuple(range(3, 3 + 256)), window=128)
    lines: list[str] = []
    not_a_folder = tmp_path / "cachefile"
    not_a_folder.write_text("x")
    monkeypatch.setenv("LLAMASHIP_CACHE", str(not_a_folder))
    fresh = np.array(accuracy.reference_logprobs(model, eval_slice, "sha", lines.append))
    assert any("not a writable folder" in line for line in lines)

    monkeypatch.setenv("LLAMASHIP_CACHE", str(tmp_path / "cache"))
    folder = accuracy.cache_dir()
    folder.mkdir(parents=True)
    (folder / f"{eval_slice.key('sha')}.npy").write_bytes(b"\x93NUMPY garbage")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = folder / f"other.tmp{dead.pid}.npy"
    stale.write_bytes(b"\0" * 1024)
    again = np.array(accuracy.reference_logprobs(model, eval_slice, "sha", lines.append))
    assert any("not a valid cached reference" in line for line in lines)
    assert np.array_equal(again, fresh) and not stale.exists()


# ---------------------------------------------------------------- flags: ranges, usage exit code

@pytest.mark.parametrize("argv", [
    ["validate", "B", "--eval-tokens", "-1"],
    ["validate", "B", "--eval-tokens", "0"],
    ["validate", "B", "--eval-tokens", "100000000"],
    ["generate", "B", "--prompt", "x", "--max-new-tokens", "0"],
    ["generate", "B", "--prompt", "x", "--max-new-tokens", "-3"],
    ["generate", "B", "--prompt", "x", "--max-new-tokens", str(10**12)],
    ["generate", "B", "--prompt", "x", "--temperature", "nan"],
    ["export", "--out", "B", "--max-context", "-5"],
    ["export", "--out", "B", "--max-context", "0"],
    ["export", "--out", "B", "--smoke-tokens", "0"],
    ["fit", "--context", "-5"],
    ["profile", "B", "--device", "D", "--runner", "R", "--runs", "0"],
    ["export", "--out", "B", "--no-such-flag"],
    ["frobnicate"],
], ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_out_of_range_flags_are_usage_errors(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run(argv, capsys)
    assert code == USAGE_EXIT == 64
    assert "error:" in err and ("out of range" in err or "not a" in err or "unrecognized" in err
                                or "invalid choice" in err)
    assert list(tmp_path.iterdir()) == []


def test_prompt_that_is_not_utf8(tiny_bundle):
    res = subprocess.run([sys.executable, "-m", "llamaship.cli", "generate", str(tiny_bundle).encode(),
                          "--prompt", b"caf\xe9 au lait"], capture_output=True, text=True)
    assert res.returncode == 64 and "not valid UTF-8" in res.stderr and "Traceback" not in res.stderr


def test_prompt_longer_than_the_onnx_context(tiny_bundle, capsys):
    code, err = run(["generate", str(tiny_bundle), "--format", "onnx", "--prompt", "tower " * 400], capsys)
    assert code == 3 and "context is 128" in err


def test_onnx_reports_no_speed_for_no_tokens(tiny_bundle):
    """No token generated: no prefill speed either (it once said 1e9 tok/s after 0 tokens)."""
    from llamaship.targets.onnx_runtime import generate_ids, load_genai

    new, st = generate_ids(load_genai(tiny_bundle / "onnx"), [1, 5, 9], 0)
    assert new == [] and st["generated_tokens"] == 0
    assert st["prefill_tok_s"] == 0.0 and st["decode_tok_s"] == 0.0


# ---------------------------------------------------------------- one error path

def test_internal_error_has_no_traceback_without_debug(gguf_path, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("llamaship.export.llama.load.load_spec", broken)
    code, err = run(["fit", "--model", str(gguf_path)], capsys)
    assert code == 1 and "internal error: ZeroDivisionError" in err and "--debug" in err
    assert "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "fit", "--model", str(gguf_path)])


def test_sigterm_mid_export_leaves_nothing(gguf_path, tmp_path):
    """SIGTERM (a CI timeout, `kill`, a container stop) behaves like Ctrl-C: message, exit 143,
    no bundle and no hidden staging folder."""
    from tests.signals import signal_mid_export

    outdir = tmp_path / "out"
    outdir.mkdir()
    code, err = signal_mid_export(gguf_path, outdir, signal.SIGTERM)
    assert code == 143, err[-2000:]
    assert "terminated (SIGTERM); nothing was written" in err
    assert list(outdir.iterdir()) == []
