"""Run a .pte on this host with ExecuTorch's own runtime.

`generate` uses the C++ LLM runner (TextLLMRunner: the same code the Android app links), so its
stats are the runner's own. `forward_logits` calls the program's `forward` method directly, which
is how accuracy is measured on the artifact itself rather than on a PyTorch stand-in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamaship.errors import RuntimeFailure


def load_kernels() -> None:
    """The Python runtime links only the portable kernels: register the custom LLM ops
    (sdpa, kv cache) and the quantized ones (4-bit embedding) before loading a program."""
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


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
    load_kernels()
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    try:
        runner = TextLLMRunner(str(pte), str(tokenizer))
    except RuntimeError as exc:
        raise RuntimeFailure(f"{pte}: ExecuTorch runner could not load it ({exc})") from exc
    pieces: list[str] = []
    stats: list[str] = []

    def token_cb(piece: str) -> None:
        pieces.append(piece)
        if on_text:
            on_text(piece)

    config = GenerationConfig(
        echo=False,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        num_bos=num_bos,
    )
    truncated = False
    try:
        runner.generate(prompt, config, token_cb, lambda st: stats.append(st.to_json_string()))
    except UnicodeDecodeError:
        # The binding decodes each piece as UTF-8 before calling back, so a token that splits a
        # multi-byte character (emoji, CJK, or a random model's byte tokens) aborts generation.
        # Re-run without the text callback so the runner's own stats are still reported, and
        # mark the text as cut at that point.
        truncated = True
        runner.reset()
        runner.generate(prompt, config, None, lambda st: stats.append(st.to_json_string()))
    except RuntimeError as exc:
        raise RuntimeFailure(f"{pte}: generation failed ({exc})") from exc
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
