"""The format registry: name -> Backend, in the order a bundle lists its artifacts.

The CLI takes its `--format` choices and help from here, `export_bundle` loops over it, validation
takes each artifact's runtime from it, and `generate()` dispatches through it. Adding a format is
one module (a `Backend` subclass) plus one line below, or `register()` from outside the package.
Backend modules import their exporters and runtimes inside methods, so importing the registry
(for `--help`) stays cheap.
"""

from __future__ import annotations

from llamaship.backends.base import (
    Backend,
    Exported,
    ExportJob,
    Generated,
    Module,
    NotRunnableHere,
    Request,
)
from llamaship.backends.coreml import CoreML
from llamaship.backends.executorch import ExecuTorch
from llamaship.backends.executorch_coreml import ExecuTorchCoreML
from llamaship.backends.onnx import Onnx
from llamaship.backends.qnn import Qnn
from llamaship.errors import UnsupportedError

REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def get(name: str) -> Backend:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnsupportedError(f"format {name!r} is not supported; available: {', '.join(REGISTRY)}") from None


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


register(ExecuTorch())
register(Onnx())
register(CoreML())
register(ExecuTorchCoreML())
register(Qnn())

__all__ = ["REGISTRY", "Backend", "ExportJob", "Exported", "Generated", "Module", "NotRunnableHere", "Request",
           "get", "names", "register", "unregister"]
