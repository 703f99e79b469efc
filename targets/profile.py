"""Target profiles: what a device can hold and read, and the gates an artifact must pass for it.

Profiles are TOML files: the built-in ones sit next to this module (qualcomm, apple,
x86_emulator); `--profile FILE` loads a user's own with the same keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaship.errors import UnsupportedError
from llamaship.safe_io import read_toml

HERE = Path(__file__).parent
BUILTIN = ("x86_emulator", "qualcomm", "apple")


@dataclass(frozen=True)
class Profile:
    name: str
    device: str
    formats: tuple[str, ...]  # what an export for this profile ships by default
    measured_here: bool
    ram_gb: float
    ram_budget_gb: float
    bandwidth_gbs: float
    max_context: int
    group_size: int = 32
    gates: dict[str, float] = field(default_factory=dict)
    eval_tokens: int = 32768
    eval_window: int = 512
    npu_eval_tokens: int = 1024  # the NPU graph runs on a simulator here: a short slice of its own
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    also_validates: tuple[str, ...] = ()  # opt-in formats (--format) gated by this profile when present

    def check(self) -> None:
        """Numbers a device can have: a negative RAM budget once made every model 'fit'."""
        positive = {"ram_gb": self.ram_gb, "ram_budget_gb": self.ram_budget_gb, "bandwidth_gbs": self.bandwidth_gbs,
                    "max_context": self.max_context, "group_size": self.group_size, "eval.tokens": self.eval_tokens,
                    "eval.window": self.eval_window, "eval.npu_tokens": self.npu_eval_tokens}
        for key, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise UnsupportedError(f"{self.source}: {key} = {value} must be a positive number")
        if self.ram_budget_gb > self.ram_gb:
            raise UnsupportedError(
                f"{self.source}: ram_budget_gb ({self.ram_budget_gb}) exceeds ram_gb ({self.ram_gb})")
        for gate, limit in self.gates.items():
            if not math.isfinite(limit):
                raise UnsupportedError(f"{self.source}: gate {gate} = {limit} must be a finite number")

    def gates_format(self, fmt: str) -> bool:
        return fmt in self.formats or fmt in self.also_validates


def load_profile(name_or_path: str) -> Profile:
    path = Path(name_or_path)
    if not path.suffix:
        if name_or_path not in BUILTIN:
            raise UnsupportedError(
                f"unknown profile {name_or_path!r}; built-in: {', '.join(BUILTIN)}, or pass a .toml file"
            )
        path = HERE / f"{name_or_path}.toml"
    if not path.exists():
        raise UnsupportedError(f"{path}: profile file not found")
    data = read_toml(path, UnsupportedError, "profile")
    try:
        profile = Profile(
            name=str(data["name"]),
            device=str(data["device"]),
            formats=tuple(data.get("formats", ["executorch"])),
            measured_here=bool(data.get("measured_here", False)),
            ram_gb=float(data["ram_gb"]),
            ram_budget_gb=float(data["ram_budget_gb"]),
            bandwidth_gbs=float(data["bandwidth_gbs"]),
            max_context=int(data.get("max_context", 2048)),
            group_size=int(data.get("quant", {}).get("group_size", 32)),
            gates={k: float(v) for k, v in data.get("gates", {}).items()},
            eval_tokens=int(data.get("eval", {}).get("tokens", 32768)),
            eval_window=int(data.get("eval", {}).get("window", 512)),
            npu_eval_tokens=int(data.get("eval", {}).get("npu_tokens", 1024)),
            extra={k: v for k, v in data.items() if k in ("soc_model", "htp_arch", "htp_context_limit_gb")},
            source=str(path),
            also_validates=tuple(data.get("also_validates", [])),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UnsupportedError(f"{path}: profile is missing or has a bad field ({exc})") from exc
    profile.check()
    return profile
