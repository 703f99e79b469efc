"""The .pte export in a child process, so the other formats and their accuracy runs use the second
core while it lowers.

ExecuTorch's lowering is single-threaded Python: on the 2-core machines we measure on, it held
one core for 3 of the 5.5 minutes of the embedded default's export while the other idled. The child
reloads the checkpoint from its source (seconds for a small model) and reads the quantize stage's
codes from its folder rather than receiving the weights; it is used only below `OFFLOAD_PARAMS`,
where a second copy of the weights is cheap.
Progress lines come back through a pipe; errors come back as the same `LlamashipError` class.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from llamaship import errors
from llamaship.errors import ExportError, LlamashipError
from llamaship.quantize.scheme import QuantScheme


def _child(conn: Connection, source: str, scheme: dict[str, Any] | None, quantized: str | None, out_path: str,
           max_context: int, max_seq_len: int) -> None:
    try:
        from llamaship.export.executorch import export_pte
        from llamaship.export.llama.load import load_checkpoint
        from llamaship.quiet import quiet_library_warnings

        quiet_library_warnings()
        ckpt = load_checkpoint(source)
        from llamaship.quantize.checkpoint import QuantizedCheckpoint

        quant = QuantScheme(**scheme) if scheme is not None else None
        codes = QuantizedCheckpoint(Path(quantized)) if quantized is not None else None
        timings = export_pte(ckpt.spec, ckpt.state, quant, Path(out_path), max_context=max_context,
                             max_seq_len=max_seq_len, progress=lambda m: conn.send(("progress", m)),
                             quantized=codes)
        from llamaship.runtime.memory import peak_rss_mb

        conn.send(("done", {**timings, "peak_rss_mb": peak_rss_mb()}))
    except LlamashipError as exc:
        conn.send(("error", (type(exc).__name__, str(exc))))
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # noqa: BLE001  (the parent reports it; nothing else sees this process)
        conn.send(("error", ("ExportError", f"{type(exc).__name__}: {exc}")))
    finally:
        conn.close()


class BackgroundPteExport:
    """`export_pte` running in a spawned child; `wait()` returns its timings or raises its error.
    Use as a context manager: leaving the block early (an error, Ctrl-C) terminates the child."""

    def __init__(self, source: Path, scheme: QuantScheme | None, out_path: Path, max_context: int,
                 max_seq_len: int, progress: Callable[[str], None], quantized: Path | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=False)
        scheme_args = None if scheme is None else {
            k: v for k, v in scheme.to_json().items() if k in QuantScheme.__dataclass_fields__}
        self._proc = ctx.Process(target=_child, args=(child_conn, str(source), scheme_args,
                                                      None if quantized is None else str(quantized), str(out_path),
                                                      max_context, max_seq_len), daemon=True)
        self._progress = progress
        self._result: tuple[str, Any] | None = None
        self._proc.start()
        child_conn.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                kind, payload = self._conn.recv()
            except (EOFError, OSError):
                return
            if kind == "progress":
                self._progress(f".pte (background): {payload}")
            else:
                self._result = (kind, payload)
                return

    def wait(self) -> dict[str, float]:
        """The stage timings (seconds), and the child's own peak RSS as `peak_rss_mb`."""
        self._reader.join()
        self._proc.join()
        if self._result is None:
            raise ExportError(f"the .pte export process died (exit code {self._proc.exitcode}); "
                              "run again, or export --format executorch alone to see its output")
        kind, payload = self._result
        if kind == "error":
            name, message = payload
            cls = getattr(errors, name, ExportError)
            raise (cls if isinstance(cls, type) and issubclass(cls, LlamashipError) else ExportError)(message)
        return dict(payload)

    def __enter__(self) -> BackgroundPteExport:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()
