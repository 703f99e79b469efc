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

Why validation runs the parts' source graphs and not the bundle's context binaries: the phone loads
one weight-sharing binary per part (prefill + decode graphs), and the x86 simulator refuses every
weight-sharing context ("contextCreateFromBinary ... QNN_COMMON_ERROR_NOT_SUPPORTED"). So each
graph's source (the quantized ONNX graph the binary was compiled from) is compiled by the
simulator when first called, graph by graph.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any, TypeVar

from llamaship.errors import RuntimeFailure
from llamaship.runtime.qnn_session import (  # noqa: F401  (this runtime's session helpers, re-exported)
    EP,
    available,
    compile_context,
    htp_session,
    in_child,
    session_options,
)
from llamaship.targets.greedy import generate_ids  # noqa: F401  (this runtime's generation)

T = TypeVar("T")

def _serve(conn: Any, folder: str, art: dict[str, Any]) -> None:
    """The child of a QnnModule: holds the HTP sessions (one per part and graph, made when first
    called) and the app-side cache, answers forward calls."""
    import json

    from llamaship.targets.qnn_app import PartsRunner

    try:
        qnn = Path(folder) / art["folder"]
        cfg = json.loads((Path(folder) / art["config"]).read_text())
        if "parts" not in cfg:
            raise RuntimeFailure(f"{qnn}: a bundle from before the prefill/decode parts; export it again")
        sessions: dict[tuple[int, str], Any] = {}

        def run(part: int, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
            if (part, graph) not in sessions:  # the simulator compiles the source graph on load
                sessions[part, graph] = htp_session(qnn / cfg["parts"][part]["source"][graph], cfg["soc_model"])
            sess = sessions[part, graph]
            names = [o.name for o in sess.get_outputs()]
            return dict(zip(names, sess.run(names, feeds), strict=True))

        runner = PartsRunner(run, cfg, decode=art.get("decode", True))
        conn.send(("ok", cfg))
    except Exception as e:  # reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        msg = conn.recv()
        if msg[0] == "close":
            return
        try:
            if msg[0] == "calls":
                conn.send(("ok", dict(runner.calls)))
            else:
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
        """Logits [len(tokens), vocab] of every token: a prompt in prefill calls of 128 tokens, one
        token after it in a decode call."""
        import torch

        return torch.from_numpy(self._call(("forward", list(tokens), start_pos)))

    def calls(self) -> dict[str, int]:
        """How many calls each graph (prefill, decode) has had."""
        return dict(self._call(("calls",)))

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
