"""Chat templates are code that arrives as data: render them without trusting them.

A chat template comes from a GGUF, a tokenizer_config.json or a bundle's manifest, any of which a
stranger may have written. A plain `jinja2.Environment` lets `{{ cycler.__init__.__globals__.os
.system(...) }}` run a shell command. Here templates render in Jinja's `ImmutableSandboxedEnvironment`
(no private attributes, no mutation of the arguments), with three budgets the sandbox lacks:
template size, output size (`*` and `**` on big operands are refused before they allocate), and
wall time (a trace function checks a deadline on every line of the compiled template, so nested
loops over `range(100000)` stop at the budget instead of burning a minute).

Written by hand because neither jinja2 nor transformers bounds size or time; transformers itself
uses the same sandbox class for the same reason.
"""

from __future__ import annotations

import sys
import time
from types import FrameType
from typing import Any

from llamaship.errors import LlamashipError

MAX_TEMPLATE_CHARS = 200_000  # real chat templates are 1-20 kB
MAX_OUTPUT_CHARS = 4_000_000
MAX_SECONDS = 2.0
MAX_POWER = 1 << 16


class ChatTemplateError(LlamashipError):
    """A chat template failed or was refused by the sandbox. The caller says whose template it was."""

    exit_code = 2


class _Budget(Exception):
    pass


def _environment() -> Any:
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**":
                if not (isinstance(left, (int, float)) and isinstance(right, (int, float))) or abs(right) > 64 \
                        or abs(left) > MAX_POWER:
                    raise SecurityError("'**' on large operands is not allowed in a chat template")
                return left**right
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    if len(seq) * max(times, 0) > MAX_OUTPUT_CHARS:
                        raise SecurityError("'*' would build a value larger than a chat prompt can be")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: str) -> None:  # what transformers gives templates (Llama 3.1 uses it)
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return time.strftime(str(fmt)[:64])

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


def _refusal(exc: Exception) -> ChatTemplateError:
    from jinja2.exceptions import SecurityError, TemplateError

    if isinstance(exc, ChatTemplateError):
        return exc
    if isinstance(exc, _Budget):
        return ChatTemplateError(f"the chat template ran longer than {MAX_SECONDS:.0f} s; refused")
    if isinstance(exc, SecurityError):
        return ChatTemplateError(f"the chat template tried something a template may not ({exc})")
    if isinstance(exc, TemplateError):
        return ChatTemplateError(f"the chat template failed: {exc}")
    if isinstance(exc, (RecursionError, MemoryError)):
        return ChatTemplateError(f"the chat template exhausted the stack or memory ({type(exc).__name__})")
    return ChatTemplateError(f"the chat template failed ({type(exc).__name__}: {exc})")


def render_sandboxed(template: str, **context: Any) -> str:
    """Render `template` with `context`; ChatTemplateError when it fails or breaks a budget."""
    if not isinstance(template, str):
        raise ChatTemplateError(f"the chat template is a {type(template).__name__}, not text")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"the chat template is {len(template)} characters; more than "
                                f"{MAX_TEMPLATE_CHARS} is not a chat template")
    deadline = time.monotonic() + MAX_SECONDS

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _Budget
        return tracer if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    pieces: list[str] = []
    size = 0
    try:
        compiled = _environment().from_string(template)
        sys.settrace(tracer)
        try:
            for piece in compiled.generate(**context):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise ChatTemplateError(f"the chat template's output passed {MAX_OUTPUT_CHARS} characters")
                pieces.append(piece)
                if time.monotonic() > deadline:
                    raise _Budget
        finally:
            sys.settrace(previous)
    except Exception as exc:  # noqa: BLE001  (each kind becomes one clear refusal below)
        raise _refusal(exc) from exc
    return "".join(pieces)


def template_problem(template: str | None, bos_token: str, eos_token: str) -> str | None:
    """Why this template cannot be shipped (it fails or breaks a budget on a plain user turn), or None."""
    if not template:
        return None
    try:
        render_sandboxed(template, messages=[{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                         bos_token=bos_token, eos_token=eos_token)
    except ChatTemplateError as exc:
        return str(exc)
    return None
