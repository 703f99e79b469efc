"""Device bundles: a folder with the artifacts, the tokenizer and manifest.json.

Bundles are built in a hidden temp folder beside the destination and renamed into place only when
complete, so an interrupted or failed export leaves nothing at the destination and no temp folder
behind. The manifest lists every file with its sha256 and size; `verify` re-checks them and rejects
anything that does not match, is missing, is extra, or names a path outside the bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from llamaship.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _safe_relpath(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or name.startswith(("/", "\\")) or ".." in rel.parts or not rel.parts:
        raise BundleError(f"manifest names an unsafe path {name!r} (absolute or outside the bundle)")
    return rel


def work_dir(parent: Path, kind: str) -> Path:
    """A hidden temp folder in `parent` named after this process (`.{kind}-{pid}-xxxx`), after
    removing any such folder a killed process left (SIGKILL, OOM: no handler runs then)."""
    sweep_stale(parent, kind)
    return Path(tempfile.mkdtemp(prefix=f".{kind}-{os.getpid()}-", dir=parent))


def sweep_stale(parent: Path, kind: str) -> list[Path]:
    """Remove `.{kind}-{pid}-*` folders in `parent` whose process is gone; returns them."""
    removed = []
    for path in parent.glob(f".{kind}-*-*"):
        pid = path.name[len(kind) + 2 :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running: another export's work
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except PermissionError:
            continue
    return removed


@contextmanager
def staging_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder; on normal exit it replaces `out` atomically, on any exception
    (KeyboardInterrupt included) it is removed and `out` is untouched."""
    out = out.resolve()
    if out.exists() and not force:
        raise BundleError(f"{out} already exists; choose another --out or pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = work_dir(out.parent, f"{out.name}.partial")
    except OSError as exc:
        raise BundleError(f"cannot create the bundle at {out} ({exc.strerror or exc}); check the path "
                          "and its permissions") from exc
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:  # disk full, permission denied: say where, after cleaning up
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(
            f"cannot write the bundle for {out} ({exc.strerror or exc}); free disk space or fix "
            "permissions and run again; nothing was written"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file in `folder` into the manifest and write manifest.json."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a bundle folder")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: missing; this folder is not a llamaship bundle") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path}: malformed manifest (no 'files' table)")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise BundleError(
            f"{path}: schema version {version!r} is newer than this llamaship understands "
            f"({SCHEMA_VERSION}); upgrade llamaship"
        )
    for name in manifest["files"]:
        _safe_relpath(name)
    return manifest


def verify_bundle(bundle: Path) -> list[str]:
    """Return a list of problems (empty when the bundle is intact)."""
    manifest = read_manifest(bundle)
    problems: list[str] = []
    listed = set(manifest["files"])
    for name, entry in manifest["files"].items():
        path = bundle / _safe_relpath(name)
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        if path.stat().st_size != entry.get("size"):
            problems.append(f"{name}: size {path.stat().st_size} != manifest {entry.get('size')}")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 mismatch (file modified or corrupt)")
    for path in sorted(bundle.rglob("*")):
        rel = path.relative_to(bundle).as_posix()
        if path.is_file() and rel != MANIFEST and rel not in listed:
            problems.append(f"{rel}: not listed in the manifest")
    return problems


def artifact_path(bundle: Path, manifest: dict[str, Any], fmt: str) -> Path:
    for art in manifest.get("artifacts", []):
        if art.get("format") == fmt:
            return bundle / _safe_relpath(art["path"])
    raise BundleError(f"{bundle}: bundle has no {fmt} artifact")
