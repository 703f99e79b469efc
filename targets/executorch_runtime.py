"""Run a .pte on this host with ExecuTorch's own runtime.

`generate` uses the C++ LLM runner (TextLLMRunner: the same code the Android app links), so its
stats are the runner's own. `forward_logits` calls the program's `forward` method directly, which
is how accuracy is measured on the artifact itself rather than on a PyTorch stand-in.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamaship.errors import RuntimeFailure


def load_kernels() -> None:
    """The Python runtime links only the portable kernels: register the custom LLM ops
    (sdpa, kv cache) and the quantized ones (4-bit embedding) before loading a program.

    The kernels are in two shared libraries, registered into the runtime of the pybindings' C
    extension; loading those three is all a run needs. ExecuTorch's Python wrappers around them
    import its exporter (`portable_lib` imports `executorch.exir`: 4 s) and torch's inductor
    (`custom_ops`: 2 s), which made `generate` wait ~6 s before its first token; a run needs
    neither, so they are not imported here (`export.executorch.load_custom_ops` does for exports)."""
    global _KERNELS_LOADED
    if _KERNELS_LOADED:
        return
    import executorch.extension.llm.custom_ops as custom_ops_pkg
    import executorch.extension.pybindings._C  # noqa: F401  (the runtime the kernels register into)
    import executorch.kernels.quantized  # noqa: F401  (loads quantized_ops_aot_lib)

    if not hasattr(torch.ops.llama, "custom_sdpa"):
        libs = sorted(Path(next(iter(custom_ops_pkg.__path__))).glob("**/*custom_ops_aot_lib.*"))
        if not libs:
            raise RuntimeFailure("executorch's custom_ops_aot_lib is missing from the installed package; "
                                 "reinstall executorch==1.5.1")
        torch.ops.load_library(str(libs[0]))
    _KERNELS_LOADED = True


_KERNELS_LOADED = False


@contextmanager
def native_output_captured() -> Iterator[list[str]]:
    """ExecuTorch's C++ runner prints every token to stdout and its logs to stderr, which would
    interleave with (and duplicate) what we print. Point both file descriptors at a temp file for
    the duration; Python's sys.stdout/stderr keep writing to the terminal through duplicates. The
    yielded list receives the captured native text (for error messages; `llamaship --verbose`
    prints it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    sink = tempfile.TemporaryFile()
    old_streams = sys.stdout, sys.stderr
    captured: list[str] = []
    os.dup2(sink.fileno(), 1)
    os.dup2(sink.fileno(), 2)
    sys.stdout = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    sys.stderr = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        yield captured
    finally:
        sys.stdout.close()
        sys.stderr.close()
        sys.stdout, sys.stderr = old_streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        sink.seek(0)
        captured.append(sink.read().decode("utf-8", "replace"))
        sink.close()
        if os.environ.get("LLAMASHIP_VERBOSE"):  # `llamaship --verbose`: show what the runtime logged
            sys.stderr.write(captured[-1])
            sys.stderr.flush()


@dataclass
class Generation:
    text: str
    stats: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False  # text stops early: the runner emitted a partial UTF-8 sequence

    @property
    def decode_tok_s(self) -> float:
        return float(self.stats.get("decode_token_per_sec", 0.0))

    @property
    def prefill_tok_s(self) -> float:
        return float(self.stats.get("prefill_token_per_sec", 0.0))

    @property
    def ttft_ms(self) -> float:
        s = self.stats
        return float(s.get("first_token_ms", 0) - s.get("inference_start_ms", 0))


def generate(
    pte: Path,
    tokenizer: Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    num_bos: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Greedy (temperature 0) by default, so a smoke test is reproducible."""
    pieces: list[str] = []
    stats: list[str] = []

    def token_cb(piece: str) -> None:
        pieces.append(piece)
        if on_text:
            on_text(piece)

    def stats_cb(st: Any) -> None:
        stats.append(st.to_json_string())

    truncated = False
    failure: RuntimeError | None = None
    with native_output_captured() as native:
        # loading the runner's library logs "Registering override fallback regex" from C++: inside
        # the capture, so it never reaches the user's terminal
        load_kernels()
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

        config = GenerationConfig(
            echo=False, max_new_tokens=max_new_tokens, temperature=temperature, num_bos=num_bos
        )
        try:
            runner = TextLLMRunner(str(pte), str(tokenizer))
            try:
                runner.generate(prompt, config, token_cb, stats_cb)
            except UnicodeDecodeError:
                # The binding decodes each piece as UTF-8 before calling back, so a token that
                # splits a multi-byte character (emoji, CJK, a random model's byte tokens) aborts
                # generation. Re-run without the text callback so the runner's own stats are still
                # reported, and mark the text as cut at that point.
                truncated = True
                runner.reset()
                runner.generate(prompt, config, None, stats_cb)
        except RuntimeError as exc:
            failure = exc
    if failure is not None:
        detail = [ln for ln in native[0].splitlines() if "error" in ln.lower() or "exceeds" in ln.lower()]
        raise RuntimeFailure(f"{pte}: ExecuTorch runner failed ({failure}): {' | '.join(detail[-3:])}")
    return Generation("".join(pieces), json.loads(stats[-1]) if stats else {}, truncated)


class PteModule:
    """The program's `forward(tokens, input_pos) -> logits`, with its KV cache as state."""

    def __init__(self, pte: Path) -> None:
        load_kernels()
        from executorch.runtime import Runtime

        try:
            self._program = Runtime.get().load_program(str(pte))
            self._method = self._program.load_method("forward")
        except (RuntimeError, ValueError) as exc:
            raise RuntimeFailure(f"{pte}: ExecuTorch could not load it ({exc})") from exc

    def metadata(self, name: str) -> Any:
        return self._program.load_method(name).execute([])[0]

    def forward(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        out = self._method.execute(
            [torch.tensor([tokens], dtype=torch.long), torch.tensor([start_pos], dtype=torch.long)]
        )
        return out[0]
