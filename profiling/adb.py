"""A thin adb wrapper: one device, every call checked, every failure said in words.

The command runner is a parameter so tests can check the exact commands built; real calls need
a device, which this development machine does not have."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from llamaship.errors import RuntimeFailure

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]


def run_command(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True)


class Adb:
    def __init__(self, serial: str, adb: str = "adb", run: Runner = run_command) -> None:
        if run is run_command and shutil.which(adb) is None:
            raise RuntimeFailure(f"{adb!r} not found: install Android platform-tools and put adb on PATH")
        self.serial, self.adb, self._run = serial, adb, run

    def _call(self, *args: str) -> str:
        cmd = [self.adb, "-s", self.serial, *args]
        res = self._run(cmd)
        if res.returncode != 0:
            detail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeFailure(f"`{shlex.join(cmd)}` failed (exit {res.returncode}): {detail[0]}")
        return res.stdout

    def check_device(self) -> None:
        state = self._call("get-state").strip()
        if state != "device":
            raise RuntimeFailure(f"device {self.serial} is {state!r}, not ready (authorize USB debugging?)")

    def shell(self, command: str) -> str:
        """`command` is one shell string run by the device's sh; quote arguments with shlex.quote."""
        return self._call("shell", command)

    def push(self, local: Path, remote: str) -> None:
        if not local.exists():
            raise RuntimeFailure(f"{local}: not found, cannot push it to the device")
        self._call("push", str(local), remote)
