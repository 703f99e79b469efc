"""Target profiles: what a device can hold and read, and the gates an artifact must pass for it.

Profiles are TOML files: the built-in ones sit next to this module (qualcomm, apple,
x86_emulator); `--profile FILE` loads a user's own with the same keys.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaship.errors import UnsupportedError

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
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise UnsupportedError(f"{path}: profile file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UnsupportedError(f"{path}: not valid TOML ({exc})") from exc
    try:
        return Profile(
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
            extra={k: v for k, v in data.items() if k in ("soc_model", "htp_arch")},
            source=str(path),
            also_validates=tuple(data.get("also_validates", [])),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedError(f"{path}: profile is missing or has a bad field ({exc})") from exc
