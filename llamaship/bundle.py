"""Device bundles: a folder with the artifacts, the tokenizer and manifest.json.

Bundles are built in a hidden temp folder beside the destination and renamed into place only when
complete, so an interrupted or failed export leaves nothing at the destination and no temp folder
behind. The manifest lists every file with its sha256 and size; `verify` re-checks them and rejects
anything that does not match, is missing, is extra, or names a path outside the bundle.

The manifest itself is covered by the bundle digest: the sha256 of manifest.json's bytes, written
beside it as `manifest.json.sha256` (sha256sum's format, so `sha256sum -c` checks it too) and
printed by `export`. The file catches accidents; a digest the user keeps elsewhere and passes to
`verify --digest` catches tampering, since whoever edits the manifest can rewrite the file too.

A bundle is closed: every path the manifest names must be relative, stay inside the bundle once
symlinks are resolved, and be a regular file (or, for folders, a real folder), so a manifest
cannot make `generate` read /etc/passwd or a FIFO.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from llamaship.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DIGEST = "manifest.json.sha256"
MAX_MANIFEST_BYTES = 16 << 20


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _safe_relpath(name: object) -> PurePosixPath:
    if not isinstance(name, str) or not name or "\x00" in name:
        raise BundleError(f"manifest names an invalid path {name!r}")
    rel = PurePosixPath(name)
    if rel.is_absolute() or name.startswith(("/", "\\")) or ".." in rel.parts or not rel.parts \
            or "\\" in name:
        raise BundleError(f"manifest names an unsafe path {name!r} (absolute or outside the bundle)")
    return rel


def bundle_path(bundle: Path, name: object, folder: bool = False) -> Path:
    """`bundle / name`, after checking that it stays inside the bundle with symlinks resolved and
    is a regular file (a real folder when `folder`). Every path read from a manifest goes here."""
    path = bundle / _safe_relpath(name)
    root = bundle.resolve()
    real = path.resolve()
    if real != root and root not in real.parents:
        raise BundleError(f"{bundle}: {name!r} leads outside the bundle (to {real}); refusing it")
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise BundleError(f"{bundle}: {name} is missing; re-export or re-copy the bundle") from exc
    if folder and not stat.S_ISDIR(st.st_mode):
        raise BundleError(f"{bundle}: {name} should be a folder")
    if not folder and not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{bundle}: {name} is not a regular file")
    return path


def work_dir(parent: Path, kind: str) -> Path:
    """A hidden temp folder in `parent` named after this process (`.{kind}-{pid}-xxxx`), after
    removing any such folder a killed process left (SIGKILL, OOM: no handler runs then)."""
    sweep_stale(parent, kind)
    return Path(tempfile.mkdtemp(prefix=f".{kind}-{os.getpid()}-", dir=parent))


def sweep_stale(parent: Path, kind: str) -> list[Path]:
    """Remove `.{kind}-{pid}-*` folders in `parent` whose process is gone; returns them."""
    removed = []
    for path in parent.glob(f".{kind}-*-*"):
        if process_gone(path.name[len(kind) + 2 :].split("-", 1)[0]):  # else another export's work
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def process_gone(pid: str) -> bool:
    """True when `pid` (text from a temp file's name) names no running process and is not ours;
    what makes a temp file stale."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's, alive
        return False
    return False


def check_replaceable(out: Path, force: bool, keep: Path | None = None) -> None:
    """`--out` may be created, or replaced with --force only when it is ours to replace: an
    existing llamaship bundle (its manifest says so) or an empty folder. Never the working folder,
    a folder above it, the home folder or /, nor anything holding `keep` (the source checkpoint):
    `--out '' --force` once deleted the user's working folder, checkpoint included."""
    if not str(out).strip():
        raise BundleError("--out is empty; name the bundle folder to create, e.g. --out bundles/my-model")
    real = out.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if real == Path(real.anchor) or real == home or real == cwd or real in cwd.parents:
        raise BundleError(f"--out {str(out)!r} is {real}, which holds your work (the working folder, one above "
                          "it, your home folder or /); choose a new folder for the bundle")
    if keep is not None:
        src = keep.resolve()
        if src == real or real in src.parents:
            raise BundleError(f"--out {out} holds the source checkpoint {keep}; choose a bundle folder "
                              "outside it")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise BundleError(f"{out} already exists; choose another --out or pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise BundleError(f"{out} exists and is not a folder; --force replaces only a llamaship bundle or an "
                          "empty folder: remove it yourself or choose another --out")
    if not any(out.iterdir()):
        return
    try:
        read_manifest(out)
    except BundleError as exc:
        raise BundleError(f"{out} is not a llamaship bundle ({exc}); --force replaces only a bundle or an "
                          "empty folder: choose another --out, or remove that folder yourself") from exc


@contextmanager
def staging_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder; on normal exit it replaces `out` atomically, on any exception
    (KeyboardInterrupt included) it is removed and `out` is untouched."""
    check_replaceable(out, force)
    out = out.resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = work_dir(out.parent, f"{out.name}.partial")
    except OSError as exc:
        raise BundleError(f"cannot create the bundle at {out} ({exc.strerror or exc}); check the path "
                          "and its permissions") from exc
    try:
        yield tmp
        _fsync_tree(tmp)
        normal_permissions(tmp)
        _replace(out, tmp)
    except OSError as exc:  # disk full, permission denied: say where, after cleaning up
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(
            f"cannot write the bundle for {out} ({exc.strerror or exc}); free disk space or fix "
            "permissions and run again; nothing was written"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A temp folder beside `out` that becomes `out` on normal exit (an existing `out`, which the
    caller has checked is its own to replace, is moved aside first) and is removed on any
    exception: a report folder is never left half-written."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = work_dir(out.parent, f"{out.name}.partial")
    try:
        yield tmp
        _replace(out, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(out: Path, tmp: Path) -> None:
    """Put the finished `tmp` at `out`, moving an existing `out` aside first (two renames)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


REWRITTEN_BY_VALIDATE = (MANIFEST, DIGEST, "report.json", "report.md", "report.png")


@contextmanager
def updating(bundle: Path) -> Iterator[Path]:
    """A staging copy of `bundle` to write new files into (validate's report and manifest): the
    unchanged files are hard links, so nothing large is copied. On success the copy replaces the
    bundle by rename; on any failure it is removed and the bundle is exactly as it was (a failed
    report write once left report.* unlisted, and the bundle failing `verify`)."""
    bundle = bundle.resolve()
    if not os.access(bundle.parent, os.W_OK | os.X_OK):
        raise BundleError(f"{bundle}: its folder {bundle.parent} is read-only, so the report cannot be written "
                          "into the bundle; copy the bundle somewhere writable and validate the copy")
    try:
        tmp = work_dir(bundle.parent, f"{bundle.name}.partial")
    except OSError as exc:
        raise BundleError(f"{bundle}: cannot stage the updated bundle beside it ({exc.strerror or exc})") from exc
    try:
        for path in sorted(bundle.rglob("*")):
            rel = path.relative_to(bundle)
            if path.is_dir():
                (tmp / rel).mkdir(exist_ok=True)
            elif rel.as_posix() not in REWRITTEN_BY_VALIDATE:
                try:
                    os.link(path, tmp / rel)
                except OSError:
                    shutil.copy2(path, tmp / rel)
        yield tmp
        _fsync_tree(tmp)
        _replace(bundle, tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"cannot update the bundle {bundle} ({exc.strerror or exc}); it was left as it "
                          "was") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def normal_permissions(folder: Path) -> None:
    """0644 files and 0755 folders within the umask. mkdtemp makes 0700 and some writers 0600,
    which locks out the app's or a CI service account that reads the bundle."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o755 & ~umask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o755 if path.is_dir() else 0o644) & ~umask)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file in `folder` into the manifest and write manifest.json and its digest.
    Values JSON cannot hold (NaN, Infinity) are refused rather than written as invalid JSON."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in (MANIFEST, DIGEST):
            continue
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
    try:
        text = json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except ValueError as exc:
        raise BundleError(f"{folder}: the manifest would hold a value JSON cannot ({exc}); nothing was "
                          "written") from exc
    data = text.encode()
    (folder / MANIFEST).write_bytes(data)
    (folder / DIGEST).write_text(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n")
    return manifest


def bundle_digest(bundle: Path) -> str:
    """sha256 of manifest.json's bytes: one value that pins every file of the bundle."""
    path = bundle / MANIFEST
    from llamaship.safe_io import regular_file

    regular_file(path, BundleError, "manifest", MAX_MANIFEST_BYTES)
    return sha256_file(path)


def read_manifest(bundle: Path) -> dict[str, Any]:
    from llamaship.safe_io import read_json_object

    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a bundle folder")
    if not path.exists():
        raise BundleError(f"{path}: missing; this folder is not a llamaship bundle")
    manifest = read_json_object(path, BundleError, "manifest", MAX_MANIFEST_BYTES)
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path}: malformed manifest (no 'files' table)")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise BundleError(
            f"{path}: schema version {version!r} is newer than this llamaship understands "
            f"({SCHEMA_VERSION}); upgrade llamaship"
        )
    for name, entry in manifest["files"].items():
        _safe_relpath(name)
        if not isinstance(entry, dict):
            raise BundleError(f"{path}: malformed entry for {name!r}")
    artifacts = manifest.get("artifacts", [])
    if not isinstance(artifacts, list) or not all(isinstance(a, dict) for a in artifacts):
        raise BundleError(f"{path}: malformed manifest ('artifacts' must be a list of objects)")
    if not isinstance(manifest.get("tokenizer", {}), dict):
        raise BundleError(f"{path}: malformed manifest ('tokenizer' must be an object)")
    return manifest


FILE_KEYS = ("path", "external_data", "config", "genai_config")


def named_paths(manifest: dict[str, Any]) -> list[tuple[str, bool]]:
    """(path, is_folder) for every path the manifest names outside its files table."""
    named: list[tuple[str, bool]] = []
    for art in manifest.get("artifacts", []):
        package = art.get("format") == "coreml"  # an .mlpackage is a folder
        named += [(art[k], package and k == "path") for k in FILE_KEYS if k in art]
        if "folder" in art:
            named.append((art["folder"], True))
    tok = manifest.get("tokenizer", {})
    if "path" in tok:
        named.append((tok["path"], False))
    report = (manifest.get("validation") or {}).get("report")
    if report:
        named.append((report, False))
    return named


def verify_bundle(bundle: Path, digest: str | None = None, hashes: bool = True) -> list[str]:
    """Return a list of problems (empty when the bundle is intact). `digest`: the bundle digest
    the user expects (from export's output). `hashes=False` checks sizes but skips the sha256 of
    every file (generate --no-verify on multi-GB bundles); paths and the manifest are checked always."""
    manifest = read_manifest(bundle)
    listed = set(manifest["files"])
    return (_digest_problems(bundle, digest) + _file_problems(bundle, manifest["files"], hashes)
            + _named_path_problems(bundle, manifest, listed) + _stray_problems(bundle, listed))


def _digest_problems(bundle: Path, digest: str | None) -> list[str]:
    problems = []
    actual = bundle_digest(bundle)
    if digest is not None and digest.lower().removeprefix("sha256:") != actual:
        problems.append(f"{MANIFEST}: bundle digest {actual} is not the expected {digest} (the manifest was "
                        "changed, or this is another bundle)")
    if not (bundle / DIGEST).exists():
        return problems + [f"{DIGEST}: missing (bundles from before the digest: re-export)"]
    try:
        recorded = bundle_path(bundle, DIGEST).read_text(errors="replace").split()[0]
    except (BundleError, IndexError) as exc:
        return problems + [f"{DIGEST}: unreadable ({exc})"]
    if recorded != actual:
        problems.append(f"{MANIFEST}: changed after export (its sha256 is not the one in {DIGEST})")
    return problems


def _file_problems(bundle: Path, files: dict[str, Any], hashes: bool) -> list[str]:
    problems = []
    for name, entry in files.items():
        if not os.path.lexists(bundle / name):
            problems.append(f"{name}: missing")
            continue
        try:
            path = bundle_path(bundle, name)
        except BundleError as exc:
            problems.append(f"{name}: {str(exc).split(': ', 1)[-1]}")
            continue
        if path.stat().st_size != entry.get("size"):
            problems.append(f"{name}: size {path.stat().st_size} != manifest {entry.get('size')}")
        elif hashes and sha256_file(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 mismatch (file modified or corrupt)")
    return problems


def _named_path_problems(bundle: Path, manifest: dict[str, Any], listed: set[str]) -> list[str]:
    problems = []
    for name, folder in named_paths(manifest):
        try:
            bundle_path(bundle, name, folder=folder)
        except BundleError as exc:
            problems.append(f"manifest names {name!r}: {str(exc).split(': ', 1)[-1]}")
            continue
        if not folder and name not in listed:
            problems.append(f"manifest names {name!r}, which its files table does not list")
    return problems


def _stray_problems(bundle: Path, listed: set[str]) -> list[str]:
    """Symlinks anywhere, and files the manifest does not list."""
    problems = []
    for root, dirs, names in os.walk(bundle):
        for entry in dirs + names:
            path = Path(root) / entry
            rel = path.relative_to(bundle).as_posix()
            if path.is_symlink():
                problems.append(f"{rel}: a symlink (bundles hold real files only)")
            elif entry in names and rel not in (MANIFEST, DIGEST) and rel not in listed:
                problems.append(f"{rel}: not listed in the manifest")
    return problems


def artifact_path(bundle: Path, manifest: dict[str, Any], fmt: str) -> Path:
    for art in manifest.get("artifacts", []):
        if art.get("format") == fmt:
            return bundle_path(bundle, art.get("path"), folder=fmt == "coreml")
    raise BundleError(f"{bundle}: bundle has no {fmt} artifact")
