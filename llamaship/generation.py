"""One `generate()` for every format: what `llamaship generate` and the export's smoke test call."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from llamaship import backends
from llamaship.backends import Generated, Request
from llamaship.errors import BundleError


def artifact_entry(manifest: Mapping[str, Any], fmt: str | None) -> Mapping[str, Any]:
    """The manifest entry of `fmt`, or of the first artifact when None."""
    arts = manifest.get("artifacts") or []
    for art in arts:
        if fmt is None or art.get("format") == fmt:
            return art
    has = ", ".join(str(a.get("format", "?")) for a in arts) or "none"
    raise BundleError(f"the bundle has no {fmt or 'artifact'} artifact (it has: {has})")


def generate(folder: Path, manifest: Mapping[str, Any], fmt: str | None, prompt: str, max_new_tokens: int,
             temperature: float = 0.0, on_text: Callable[[str], None] | None = None,
             smoke: bool = False) -> Generated:
    """Generate from the bundle in `folder` (the staging folder during export) with the runtime an app
    would use for that artifact on this host."""
    art = artifact_entry(manifest, fmt)
    backend = backends.get(str(art.get("format")))
    req = Request(folder, manifest, art, prompt, max_new_tokens, temperature, on_text, smoke)
    return backend.generate(req)
