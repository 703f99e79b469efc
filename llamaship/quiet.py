"""Library noise off by default: torch.export / ExecuTorch / torchao emit hundreds of deprecation
warnings per export that bury the progress lines. `llamaship --verbose` (LLAMASHIP_VERBOSE=1) or
PYTHONWARNINGS keeps them."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator


def quiet_library_warnings() -> None:
    """Also claims the root logger at WARNING: onnxruntime's quantization modules call
    `logging.basicConfig(level=INFO)` on import, which would print a line per ONNX node."""
    if os.environ.get("LLAMASHIP_VERBOSE"):
        return
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if not os.environ.get("PYTHONWARNINGS"):
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|executorch|torchao)\.")
    import torch  # noqa: F401  (torch configures its loggers on import: set ours after)

    for name in ("torch", "torchao", "executorch", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """The root logger at ERROR for the block: onnxruntime's quantizer logs its advice (pre-process
    the model, opset 21 is used) on the root logger at WARNING on every call, and the NPU build calls
    it once per unit (33 times for SmolLM2). `--verbose` keeps them."""
    root = logging.getLogger()
    level = root.level
    if not os.environ.get("LLAMASHIP_VERBOSE"):
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
