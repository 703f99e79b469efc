"""Reading small structured files (JSON, TOML) that a user or a stranger handed us.

Why a module of its own: `json.loads(path.read_text())` hangs forever on a FIFO, reads an endless
device until memory runs out, accepts NaN and duplicate keys, and raises RecursionError or
UnicodeDecodeError as a traceback. Every config, manifest, header and profile goes through here,
so each of those failures becomes one error that names the file, of the caller's error class.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from llamaship.errors import LlamashipError

MAX_JSON_BYTES = 64 << 20  # tokenizer_config.json of a big vocabulary is a few MB


def regular_file(path: Path, error: type[LlamashipError], what: str = "file",
                 max_bytes: int | None = None) -> int:
    """The size of `path`, after checking it is a regular file (symlinks followed: the Hub's
    cache links every file to a blob) and, when given, no larger than `max_bytes`. Raises
    `error` naming the file otherwise; never opens it, so a FIFO cannot block."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise error(f"{path}: {what} is missing") from exc
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, device or socket)"
        raise error(f"{path}: the {what} is {kind}; pass a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{path}: the {what} is {st.st_size} bytes, more than the {max_bytes} a {what} can "
                    "reasonably be; is it the right file?")
    return st.st_size


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def parse_json_object(text: bytes | str, source: Path | str, error: type[LlamashipError],
                      what: str = "JSON file") -> dict[str, Any]:
    """Strict JSON: one object, no NaN/Infinity, no duplicate keys, bounded nesting."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise error(f"{source}: the {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except RecursionError as exc:
        raise error(f"{source}: the {what} is nested too deeply to be a real one") from exc
    except ValueError as exc:  # JSONDecodeError included
        raise error(f"{source}: the {what} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{source}: the {what} must be a JSON object, not {type(data).__name__}")
    return data


def read_json_object(path: Path, error: type[LlamashipError], what: str = "JSON file",
                     max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    regular_file(path, error, what, max_bytes)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    return parse_json_object(raw, path, error, what)


def read_toml(path: Path, error: type[LlamashipError], what: str = "TOML file",
              max_bytes: int = 1 << 20) -> dict[str, Any]:
    regular_file(path, error, what, max_bytes)
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path}: the {what} is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: the {what} is not valid TOML ({exc})") from exc
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
