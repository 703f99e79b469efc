"""QNN HTP sessions through onnxruntime-qnn: registering the EP, HTP-only sessions, compiling a
context binary, and running a function in a fresh child process.

Why a child: the HTP simulator (x86_64) keeps process-wide state that a second context in the same
process can trip over, and a crash in it must not take the exporter or the validator with it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from llamaship.errors import RuntimeFailure, UnsupportedError

T = TypeVar("T")

EP = "QNNExecutionProvider"
_registered = False


def available() -> bool:
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        return False
    return True


def _register() -> Any:
    global _registered
    import onnxruntime as ort

    try:
        import onnxruntime_qnn
    except ImportError as e:
        raise UnsupportedError("onnxruntime-qnn is not installed: `pip install onnxruntime-qnn==2.7.0`") from e
    if not _registered:
        ort.register_execution_provider_library(EP, onnxruntime_qnn.get_library_path())
        _registered = True
    return onnxruntime_qnn


def session_options(soc_model: str, config: dict[str, str] | None = None) -> Any:
    """Options for an HTP session for `soc_model` (e.g. "SM8650"); `config` are session config
    entries (e.g. the ep.context_* ones that compile a context binary)."""
    import onnxruntime as ort

    qnn = _register()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP]
    if not devices:
        raise RuntimeFailure("onnxruntime lists no QNN device after registering onnxruntime-qnn")
    so = ort.SessionOptions()
    if not os.environ.get("LLAMASHIP_VERBOSE"):  # the EP's notices on every session: `--verbose` shows them
        so.log_severity_level = 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    so.add_provider_for_devices(devices[:1], {"backend_path": qnn.get_qnn_htp_path(), "soc_model": soc_model})
    return so


def htp_session(model: Path, soc_model: str, config: dict[str, str] | None = None) -> Any:
    """An inference session whose every node runs on the HTP (simulated here)."""
    import onnxruntime as ort

    so = session_options(soc_model, config=config)
    try:
        return ort.InferenceSession(str(model), so)
    except Exception as e:  # onnxruntime raises its own Fail/RuntimeException types
        raise RuntimeFailure(f"{model}: the QNN HTP backend cannot run this graph: {e}") from e


def compile_context(model: Path, ctx_model: Path, soc_model: str) -> Any:
    """Compile `model` for the HTP of `soc_model` into `ctx_model` (an EPContext node) plus
    `<stem>_qnn.bin` beside it (the QNN context binary the phone loads). Returns the session."""
    ctx_model.parent.mkdir(parents=True, exist_ok=True)
    return htp_session(model, soc_model, config={
        "ep.context_enable": "1", "ep.context_file_path": str(ctx_model), "ep.context_embed_mode": "0",
    })


def in_child(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a freshly spawned process (see the module docstring); its errors come back."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as e:
            raise RuntimeFailure(f"the QNN HTP simulator process died while running {fn.__name__}") from e
