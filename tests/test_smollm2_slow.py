"""The main job end to end on the real embedded model, through the installed `llamaship` command
(several minutes on 2 cores: marked slow, run by `make test-slow` and in CI when time allows)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def llamaship(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("llamaship")
    assert exe, "llamaship console script not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=1800)


def test_smollm2_bundle_answers_paris(tmp_path: Path):
    out = tmp_path / "smollm2"
    res = llamaship("export", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    smoke = manifest["smoke_test"]
    assert "Paris" in smoke["text"], smoke["text"]
    assert smoke["stats"]["decode_token_per_sec"] > 0
    assert manifest["quant"]["name"] == "8da4w-g32-emb4-head8"
    # 135M params at ~4.5 bits plus an 8-bit lm_head: well under the 190 MB stock export
    assert manifest["files"]["model.pte"]["size"] < 130e6
    assert llamaship("verify", str(out)).returncode == 0
    gen = llamaship("generate", str(out), "--prompt", "What is the capital of France?", "--chat",
                    "--max-new-tokens", "24", "--json")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "Paris" in gen.stdout
    stats = json.loads(gen.stdout.strip().splitlines()[-1])
    assert stats["decode_tok_s"] > 0
