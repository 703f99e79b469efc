"""onnxruntime-qnn sessions on the QNN HTP backend, which runs as a simulator on x86_64 Linux.

Why the plugin-EP registration and `disable_cpu_ep_fallback`: onnxruntime-qnn 2.x is a plugin
execution provider. The classic `providers=["QNNExecutionProvider"]` finds nothing and silently runs
every node on the CPU EP; with the fallback disabled, a graph the HTP cannot run fully fails to load
instead of passing validation on the CPU.

Why every HTP session lives in a child process (`QnnModule`, `in_child`): once the QNN libraries
are loaded, ExecuTorch's LLM runner crashed in the same process (a segfault in _llm_runner during
the .pte smoke test of a SmolLM2 Qualcomm export), and the simulator itself can crash. In a
spawned child, a crash becomes a RuntimeFailure naming its exit code, and the rest of the export
and its other runtimes never share an address space with the QNN libraries.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from llamaship.errors import RuntimeFailure, UnsupportedError
from llamaship.targets.greedy import generate_ids  # noqa: F401  (this runtime's generation)

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


def check_loads(model: Path, soc_model: str) -> None:
    """Raise RuntimeFailure unless `model` loads with every node on the HTP."""
    htp_session(model, soc_model)


def _serve(conn: Any, folder: str, art: dict[str, Any]) -> None:
    """The child of a QnnModule: holds the session and the app-side cache, answers forward calls."""
    import json

    from llamaship.export.qnn_graph import StaticCacheRunner

    try:
        cfg = json.loads((Path(folder) / art["config"]).read_text())
        session = htp_session(Path(folder) / art["path"], cfg["soc_model"])
        runner = StaticCacheRunner(lambda f: session.run(None, f), cfg["prompt_chunk"], cfg["context"],
                                   cfg["n_layers"], cfg["n_kv_heads"], cfg["head_dim"])
        conn.send(("ok", cfg))
    except Exception as e:  # reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        msg = conn.recv()
        if msg[0] == "close":
            return
        try:
            conn.send(("ok", runner.forward(msg[1], msg[2]).numpy()))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))


class QnnModule:
    """A bundle's NPU artifact on the HTP (simulated here), driven the way an app drives it, in a
    child process of its own."""

    def __init__(self, folder: Path, art: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, str(folder), art), daemon=True)
        self._proc.start()
        child.close()
        self.config = self._call(None)

    def _call(self, msg: tuple | None) -> Any:
        try:
            if msg is not None:
                self._conn.send(msg)
            status, payload = self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError) as e:
            self._proc.join(5)
            raise RuntimeFailure(f"the QNN HTP simulator process died (exit code {self._proc.exitcode})") from e
        if status != "ok":
            raise RuntimeFailure(f"QNN HTP: {payload}")
        return payload

    def reset(self) -> None:
        """Nothing to do: a forward from position 0 empties the child's cache."""

    def forward(self, tokens: list[int], start_pos: int) -> Any:
        """Logits [len(tokens), vocab] of every token (one graph call per chunk)."""
        import torch

        return torch.from_numpy(self._call(("forward", list(tokens), start_pos)))

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
        self._conn.close()

    def __enter__(self) -> QnnModule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
