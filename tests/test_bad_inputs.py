"""A corpus of hostile and broken inputs. Each case: the CLI exits with the documented code, the
message names the file (or the flag) and says what to do, and nothing is left at --out or beside
it. Inputs are generated here from the tiny checkpoints, not checked in."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llamaship.cli import main

Mutator = Callable[[Path], None]


def _edit_json(name: str, **changes) -> Mutator:  # type: ignore[no-untyped-def]
    def mutate(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        for k, v in changes.items():
            if v is None:
                data.pop(k, None)
            else:
                data[k] = v
        (folder / name).write_text(json.dumps(data))
    return mutate


def _truncate(pattern: str, keep: float) -> Mutator:
    def mutate(folder: Path) -> None:
        f = sorted(folder.glob(pattern))[-1]
        f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])
    return mutate


def _write(name: str, data: bytes) -> Mutator:
    def mutate(folder: Path) -> None:
        (folder / name).write_bytes(data)
    return mutate


def _delete(pattern: str) -> Mutator:
    def mutate(folder: Path) -> None:
        for f in folder.glob(pattern):
            f.unlink()
    return mutate


def _meta_state(edit: Callable[[dict], None]) -> Mutator:
    def mutate(folder: Path) -> None:
        state = torch.load(folder / "consolidated.00.pth", weights_only=True)
        edit(state)
        torch.save(state, folder / "consolidated.00.pth")
    return mutate


def _nan(state: dict) -> None:
    state["layers.0.attention.wq.weight"][0, 0] = float("nan")


def _inf(state: dict) -> None:
    state["layers.1.feed_forward.w2.weight"][3, 3] = float("inf")


def _drop_layer(state: dict) -> None:
    del state["layers.1.feed_forward.w1.weight"]


def _wrong_shape(state: dict) -> None:
    state["layers.0.attention.wk.weight"] = state["layers.0.attention.wk.weight"][:8]


class _Exploit:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch /tmp/llamaship-pwned",))


def _pickle_exploit(folder: Path) -> None:
    torch.save({"tok_embeddings.weight": _Exploit()}, folder / "consolidated.00.pth")


# (id, source layout, mutation, exit code, message fragment)
CASES: list[tuple[str, str, Mutator, int, str]] = [
    ("safetensors-truncated", "hf", _truncate("*.safetensors", 0.5), 2, "truncated or corrupt"),
    ("safetensors-header-garbage", "hf", _truncate("*.safetensors", 0.0001), 2, "truncated or corrupt"),
    ("safetensors-random-bytes", "hf", lambda f: [p.write_bytes(os.urandom(4096)) for p in f.glob("*.safetensors")],
     2, "cannot read safetensors"),
    ("index-lists-missing-shard", "hf", _delete("model-00001-of-*.safetensors"), 2, "shards that are missing"),
    ("no-weights", "hf", lambda f: [p.unlink() for p in f.glob("*.safetensors*")], 2, "no *.safetensors"),
    ("config-not-json", "hf", _write("config.json", b"{not json"), 2, "not valid JSON"),
    ("config-missing-hidden-size", "hf", _edit_json("config.json", hidden_size=None), 2, "'hidden_size' is missing"),
    ("config-negative-layers", "hf", _edit_json("config.json", num_hidden_layers=-2), 2, "positive integer"),
    ("config-absurd-vocab", "hf", _edit_json("config.json", vocab_size=10**9), 2, "absurdly large"),
    ("config-heads-not-divisible", "hf", _edit_json("config.json", num_key_value_heads=3), 2, "not a multiple"),
    ("config-mixtral", "hf", _edit_json("config.json", model_type="mixtral", architectures=["MixtralForCausalLM"]),
     3, "not supported"),
    ("config-qwen2", "hf", _edit_json("config.json", model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
     3, "not supported"),
    ("config-attention-bias", "hf", _edit_json("config.json", attention_bias=True), 3, "biases are not supported"),
    ("config-rope-yarn", "hf", _edit_json("config.json", rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     3, "rope scaling type 'yarn'"),
    ("config-shapes-mismatch", "hf", _edit_json("config.json", intermediate_size=256), 2, "shape"),
    ("tokenizer-missing-hf", "hf", _delete("tokenizer.*"), 2, "no tokenizer found"),
    ("tokenizer-garbage", "hf", _write("tokenizer.model", b"\x00\x01garbage" * 10), 2, "not a SentencePiece"),
    ("tokenizer-wrong-model", "hf_small", lambda f: None, 2, "belongs to another model"),
    ("pth-truncated", "meta", _truncate("consolidated.*.pth", 0.5), 2, "truncated or corrupt"),
    ("pth-pickle-executes-code", "meta", _pickle_exploit, 2, "refused to load"),
    ("pth-nan-weights", "meta", _meta_state(_nan), 2, "NaN or Inf"),
    ("pth-inf-weights", "meta", _meta_state(_inf), 2, "NaN or Inf"),
    ("pth-missing-tensor", "meta", _meta_state(_drop_layer), 2, "lacks"),
    ("pth-wrong-shape", "meta", _meta_state(_wrong_shape), 2, "has shape"),
    ("params-missing-dim", "meta", _edit_json("params.json", dim=None), 2, "'dim' is missing"),
    ("params-string-dim", "meta", _edit_json("params.json", dim="4096"), 2, "positive integers"),
    ("params-moe", "meta", _edit_json("params.json", moe={"num_experts": 8}), 3, "mixture-of-experts"),
    ("params-two-shards", "meta", lambda f: shutil.copyfile(f / "consolidated.00.pth", f / "consolidated.01.pth"),
     3, "model-parallel shards"),
    ("meta-tokenizer-missing", "meta", _delete("tokenizer.model"), 2, "tokenizer.model is missing"),
    ("gguf-truncated", "gguf", _truncate("*.gguf", 0.3), 2, "GGUF"),
    ("gguf-not-gguf", "gguf", lambda f: [p.write_bytes(b"NOTGGUF" * 100) for p in f.glob("*.gguf")], 2,
     "cannot read GGUF"),
    ("empty-folder", "empty", lambda f: None, 2, "not a checkpoint folder"),
    ("no-such-path", "missing", lambda f: None, 2, "no such file or folder"),
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, llama2_hf_dir, llama2_meta_dir, gguf_path) -> dict[str, Path]:
    from tests.checkpoints import LLAMA2_TOKENIZER, tiny_hf_model, write_hf

    root = tmp_path_factory.mktemp("sources")
    # a 320-token model shipped with Llama 2's 32000-token tokenizer
    small_hf = write_hf(tiny_hf_model(320, n_kv_heads=4), root / "hf_small", LLAMA2_TOKENIZER)
    gguf_dir = root / "gguf"
    gguf_dir.mkdir()
    shutil.copyfile(gguf_path, gguf_dir / "tiny.gguf")
    (root / "empty").mkdir()
    return {"hf": llama2_hf_dir, "meta": llama2_meta_dir, "gguf": gguf_dir, "hf_small": small_hf,
            "empty": root / "empty", "missing": root / "missing"}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()] if folder.exists() else []


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoint(case, sources, tmp_path, capsys):
    name, layout, mutate, code, fragment = case
    src = sources[layout]
    model = tmp_path / "model"
    if src.exists():
        shutil.copytree(src, model)
        mutate(model)
    else:
        model = src
    if layout == "gguf":
        model = next(model.glob("*.gguf"))
    outdir = tmp_path / "out"
    outdir.mkdir()
    got = main(["export", "--model", str(model), "--out", str(outdir / "bundle"), "--no-validate"])
    err = capsys.readouterr().err
    with capsys.disabled():  # the message users see, for the record (pytest -s)
        print(f"\nCASE {name}: exit {got}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    assert got == code, err
    assert fragment in err, err
    assert str(model) in err  # names the file or folder at fault
    assert err.startswith("error: ") or "\nerror: " in err
    assert leftovers(outdir) == []  # no bundle, no .partial temp folder
    assert not Path("/tmp/llamaship-pwned").exists()


def test_group_size_not_dividing_is_refused_before_work(gguf_path, tmp_path, capsys):
    assert main(["export", "--model", str(gguf_path), "--out", str(tmp_path / "b"), "--group-size", "128"]) == 3
    assert "use --group-size 32 or 64" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_unknown_target_profile(gguf_path, tmp_path, capsys):
    assert main(["export", "--model", str(gguf_path), "--out", str(tmp_path / "b"), "--target", "pixel9"]) == 3
    assert "unknown profile 'pixel9'" in capsys.readouterr().err


def test_permission_denied_on_output(gguf_path, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the disk-full case covers write failures")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["export", "--model", str(gguf_path), "--out", str(ro / "b"), "--no-validate"]) == 4
    finally:
        ro.chmod(0o700)


def test_output_under_a_file_is_refused(gguf_path, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["export", "--model", str(gguf_path), "--out", str(tmp_path / "afile" / "b"), "--no-validate"]) == 4
    assert "cannot create the bundle" in capsys.readouterr().err


def test_sigint_mid_export_leaves_nothing(gguf_path, tmp_path):
    """Ctrl-C while the exporter is lowering: exit 130, no bundle, no staging folder."""
    from tests.signals import signal_mid_export

    outdir = tmp_path / "out"
    outdir.mkdir()
    code, err = signal_mid_export(gguf_path, outdir, signal.SIGINT)
    assert code == 130, err[-2000:]
    assert "interrupted; nothing was written" in err
    assert leftovers(outdir) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--asymmetric"], "asymmetric 4-bit weights are not supported for ExecuTorch"),
        (["--format", "onnx", "--embedding-bits", "8"], "4-bit embeddings only"),
        (["--format", "onnx", "--quant", "8da8w"], "4-bit weights"),
    ],
)
def test_unsupported_format_scheme_pairs_refused_before_work(gguf_path, tmp_path, capsys, args, message):
    out = tmp_path / "b"
    assert main(["export", "--model", str(gguf_path), "--out", str(out), *args]) == 3
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_export_are_swept(tmp_path):
    """SIGKILL (the OOM killer) runs no cleanup: the next export beside it removes the staging
    folder of a process that no longer exists, and leaves a live process's alone."""
    from llamaship.bundle import staging_dir

    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = tmp_path / f".b.partial-{proc.pid}-abc"
    (stale / "model.pte").parent.mkdir()
    (stale / "model.pte").write_bytes(b"half")
    live = tmp_path / f".b.partial-{os.getppid()}-def"
    live.mkdir()
    with staging_dir(tmp_path / "b") as tmp:
        (tmp / "x").write_text("ok")
    assert not stale.exists() and live.exists()
    assert (tmp_path / "b" / "x").read_text() == "ok"
