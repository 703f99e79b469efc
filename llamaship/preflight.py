"""Checks that run before the first expensive step of an export, so that a missing input or a full
disk fails in seconds with the file and the fix named, not after minutes of lowering."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from llamaship import backends
from llamaship.data import CALIB_FILE, EVAL_FILE, data_file
from llamaship.errors import BundleError
from llamaship.export.llama.spec import ModelSpec
from llamaship.quantize.scheme import QuantScheme

MARGIN = 1.25
SLACK_BYTES = 64 << 20


def existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def check_output_folder(out: Path) -> Path:
    """The folder the bundle will be created in must be a writable folder; returns it."""
    parent = existing_ancestor(out.resolve().parent)
    if not parent.is_dir():
        raise BundleError(f"cannot create the bundle at {out}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"cannot create the bundle at {out}: {parent} is not writable; choose another --out "
                          "or fix the folder's permissions")
    return parent


def expected_bytes(spec: ModelSpec, scheme: QuantScheme | None, formats: Iterable[str],
                   weight_bytes: float = 0.0) -> int:
    """What the export writes, at most, for these formats (an estimate with a margin): each
    format's predicted file size (`targets.fit.predict_sizes`, the numbers `llamaship fit` prints),
    times the copies it holds at its peak, plus an fp32 graph where the export writes one first (the
    NPU's streamed build: its largest unit's). A format without a size model counts `disk_factor`
    times `weight_bytes`."""
    from llamaship.targets.fit import predict_sizes

    predicted = predict_sizes(spec, scheme)
    total = 0.0
    for fmt in formats:
        backend = backends.get(fmt)
        total += backend.disk_copies * predicted.get(fmt, backend.disk_factor * weight_bytes)
        if backend.fp32_graph_on_disk:
            total += 4.0 * spec.param_count()
        elif backend.disk_copies > 1:  # a streamed build: one unit's fp32 graph at a time, the largest vocab-sized
            total += 4.0 * spec.vocab_size * spec.dim
    return int(MARGIN * total) + SLACK_BYTES


def check_disk_space(folder: Path, need: int, out: Path) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise BundleError(f"not enough disk space for the bundle at {out}: the export needs about "
                          f"{need / 1e9:.2f} GB in {folder}, {free / 1e9:.2f} GB are free; free some space or "
                          "choose an --out on another disk")


def check_data(validate: bool, formats: Iterable[str]) -> None:
    """The evaluation text (for validation) and the calibration text (for the NPU route) exist."""
    if validate:
        data_file(EVAL_FILE)
    if any(backends.get(f).needs_calibration_text for f in formats):
        data_file(CALIB_FILE)
