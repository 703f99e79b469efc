"""Errors users see. Each names the file involved and what to do; the CLI maps them to exit codes."""

from __future__ import annotations


class LlamashipError(Exception):
    """Base class: the CLI prints `error: <message>` and exits with `exit_code`."""

    exit_code = 1


class CheckpointError(LlamashipError):
    """The checkpoint (weights, config, tokenizer) is missing, corrupt or not a supported Llama."""

    exit_code = 2


class DataError(LlamashipError):
    """Evaluation or calibration text is missing (LLAMASHIP_DATA names a folder without it, or the
    installation lost the copy the package carries)."""

    exit_code = 2


class UnsupportedError(LlamashipError):
    """A valid request this tool does not support (architecture, format x scheme combination)."""

    exit_code = 3


class BundleError(LlamashipError):
    """A bundle failed verification or cannot be written."""

    exit_code = 4


class ExportError(LlamashipError):
    """Lowering or serialization failed."""

    exit_code = 5


class RuntimeFailure(LlamashipError):
    """Running an artifact on its runtime failed."""

    exit_code = 6
