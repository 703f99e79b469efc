"""onnxruntime-qnn sessions on the QNN HTP backend, which runs as a simulator on x86_64 Linux.

Why the plugin-EP registration and `disable_cpu_ep_fallback`: onnxruntime-qnn 2.x is a plugin
execution provider. The classic `providers=["QNNExecutionProvider"]` finds nothing and silently runs
every node on the CPU EP; with the fallback disabled, a graph the HTP cannot run fully fails to load
instead of passing validation on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamaship.errors import LlamashipError, RuntimeFailure

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
        raise LlamashipError("onnxruntime-qnn is not installed: `pip install onnxruntime-qnn==2.7.0`") from e
    if not _registered:
        ort.register_execution_provider_library(EP, onnxruntime_qnn.get_library_path())
        _registered = True
    return onnxruntime_qnn


def session_options(soc_model: str, extra: dict[str, str] | None = None,
                    config: dict[str, str] | None = None) -> Any:
    """Options for an HTP session for `soc_model` (e.g. "SM8650"); `config` are session config
    entries (e.g. the ep.context_* ones that compile a context binary)."""
    import onnxruntime as ort

    qnn = _register()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP]
    if not devices:
        raise LlamashipError("onnxruntime lists no QNN device after registering onnxruntime-qnn")
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    options = {"backend_path": qnn.get_qnn_htp_path(), "soc_model": soc_model} | (extra or {})
    so.add_provider_for_devices(devices[:1], options)
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
    return htp_session(model, soc_model, config={
        "ep.context_enable": "1", "ep.context_file_path": str(ctx_model), "ep.context_embed_mode": "0",
    })


class QnnModule:
    """A bundle's NPU artifact on the HTP (simulated here), driven the way an app drives it."""

    def __init__(self, folder: Path, art: dict[str, Any]) -> None:
        import json

        from llamaship.export.qnn_graph import StaticCacheRunner

        cfg = json.loads((folder / art["config"]).read_text())
        self.config = cfg
        self.session = htp_session(folder / art["path"], cfg["soc_model"])
        self.runner = StaticCacheRunner(lambda f: self.session.run(None, f), cfg["prompt_chunk"], cfg["context"],
                                        cfg["n_layers"], cfg["n_kv_heads"], cfg["head_dim"])

    def forward(self, tokens: list[int], start_pos: int) -> Any:
        """Logits [len(tokens), vocab] of every token (one graph call per chunk)."""
        return self.runner.forward(tokens, start_pos)


def generate_ids(module: QnnModule, prompt: list[int], n_tokens: int, stop_ids: tuple[int, ...] | list[int],
                 ) -> tuple[list[int], dict[str, Any]]:
    """Greedy decoding: the prompt in chunks, then one token per call."""
    import time

    t = time.perf_counter()
    logits = module.forward(prompt, 0)[-1]
    prefill_s = time.perf_counter() - t
    out: list[int] = []
    t = time.perf_counter()
    while len(out) < n_tokens:
        tok = int(logits.argmax())
        out.append(tok)
        if tok in stop_ids or len(out) == n_tokens:
            break
        logits = module.forward([tok], len(prompt) + len(out) - 1)[-1]
    return out, {"prompt_tokens": len(prompt), "generated_tokens": len(out),
                 "simulator_prefill_s": round(prefill_s, 1),
                 "simulator_decode_s": round(time.perf_counter() - t, 1),
                 "note": "HTP simulator on x86: seconds say nothing about the phone's speed"}
