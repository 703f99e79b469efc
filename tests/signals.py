"""Stop an export mid-lowering with a signal, the way a user (Ctrl-C) or a scheduler (SIGTERM) does."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def signal_mid_export(gguf_path: Path, outdir: Path, signum: int) -> tuple[int, str]:
    """Start `llamaship export` into `outdir`, send `signum` once it stages, return (exit code, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamaship.cli", "export", "--model", str(gguf_path), "--out",
         str(outdir / "bundle"), "--no-validate", "--max-context", "128"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a test run started in the background (nohup, `&`) ignores SIGINT, and exec inherits that
        preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while time.time() < deadline and not any(".partial-" in p.name for p in outdir.iterdir()):
        time.sleep(0.2)
    assert any(".partial-" in p.name for p in outdir.iterdir()), "export never started staging"
    time.sleep(2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err
