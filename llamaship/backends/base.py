"""What a format is to the rest of llamaship: one Backend object per artifact format.

Why: the pipeline, validation, the smoke test, `llamaship generate` and the CLI each used to branch
on format names, so a sixth format meant touching nine places. A backend owns everything about its
format (which schemes it can hold, its export into the staging folder and its manifest entry, its
runtime module for accuracy, text generation, and speed on this host or why not), and everything
above it loops over the registry (`llamaship.backends`). The heavy lifting stays in `export/`
(writing artifacts) and `targets/` (running them); a backend is the glue that names both.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.storage import Storage

Progress = Callable[[str], None]


class Module(Protocol):
    """A runnable artifact for accuracy: logits of the last position after feeding `tokens` at
    `start_pos` through its own KV cache."""

    def forward(self, tokens: list[int], start_pos: int) -> Any: ...


@dataclass
class ExportJob:
    """Everything an exporter may use. `options` holds the backends' own CLI options by dest name."""

    ckpt: Any  # llamaship.export.llama.checkpoint.Checkpoint
    scheme: QuantScheme | None
    folder: Path  # the staging folder: the artifact goes inside it
    max_context: int
    max_seq_len: int
    profiles: list[Any]
    options: Mapping[str, Any]
    progress: Progress
    quantized: Any = None  # llamaship.quantize.checkpoint.QuantizedCheckpoint: the stage's codes


@dataclass
class Exported:
    entry: dict[str, Any]  # the artifact's manifest entry
    timings: dict[str, float] = field(default_factory=dict)
    wait: Callable[[], dict[str, float]] | None = None  # set when the export still runs elsewhere


@dataclass
class Generated:
    text: str
    stats: dict[str, Any]  # the runtime's own stats, as the manifest's smoke test records them
    runtime: str  # where it ran, in words

    def summary(self) -> dict[str, Any]:
        """The keys `llamaship generate --json` prints, whatever the runtime."""
        st = self.stats
        return {"prompt_tokens": st.get("prompt_tokens"), "generated_tokens": st.get("generated_tokens"),
                "ttft_ms": st.get("ttft_ms", 0.0), "prefill_tok_s": st.get("prefill_token_per_sec", 0.0),
                "decode_tok_s": st.get("decode_token_per_sec", 0.0)}


@dataclass
class Request:
    """A generation request against a bundle (or the staging folder during export)."""

    folder: Path
    manifest: Mapping[str, Any]  # needs "tokenizer" and "artifacts"
    art: Mapping[str, Any]
    prompt: str
    max_new_tokens: int
    temperature: float = 0.0
    on_text: Callable[[str], None] | None = None
    smoke: bool = False  # the export's smoke test (some runtimes take fewer tokens then)

    @property
    def tokenizer(self) -> Mapping[str, Any]:
        return self.manifest.get("tokenizer") or {}

    @property
    def num_bos(self) -> int:
        tok = self.tokenizer
        n = 1 if tok.get("add_bos") and tok.get("bos_id") is not None else 0
        if n and tok.get("bos_token") and self.prompt.startswith(tok["bos_token"]):
            return 0  # a chat template already put BOS first
        return n

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(self.tokenizer.get("stop_ids") or [])


class Backend:
    """Defaults describe a format that runs on a CPU of this host; subclasses override."""

    name: ClassVar[str]
    help: ClassVar[str]  # one sentence for `export --format` and `generate --format`
    runtime: ClassVar[str]  # what validation scores it on, in words
    disk_factor: ClassVar[float] = 1.1  # bytes on disk per byte of fit-model weights (preflight)
    fp32_graph_on_disk: ClassVar[bool] = False  # the export writes an fp32 graph first (preflight)
    disk_copies: ClassVar[float] = 1.0  # copies of its predicted size on disk at the export's peak (preflight)
    needs_calibration_text: ClassVar[bool] = False  # calibrates on WikiText-2 validation (preflight)
    speed_elsewhere: ClassVar[str | None] = None  # why its speed is not measured on this host
    shares_eval_slice: ClassVar[bool] = True  # False: scored on a slice of its own
    # seconds per scored token at Llama 3 8B on this 2-core class of machine (bench/fullsize.py):
    # sizes the default slice of large models (targets/validate.default_eval_tokens)
    eval_s_per_token_8b: ClassVar[float] = 0.2
    scored_while_lowering: ClassVar[bool] = True  # may be scored while another artifact lowers
    cpu_reference: ClassVar[bool] = False  # the artifact NPU graphs are compared with
    can_export_in_background: ClassVar[bool] = False
    storage: ClassVar[Storage | None] = None  # how it stores quantized weights: its predicted file size
    packages: ClassVar[tuple[str, ...]] = ()  # the pip packages whose versions the manifest records
    # how the artifact holds the quantize stage's codes (the manifest's "weights" line)
    weights: ClassVar[str] = "the quantize stage's codes"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        """Flags only this format reads (e.g. --onnx-accuracy-level); their dests reach ExportJob.options."""

    def check(self, scheme: QuantScheme | None, options: Mapping[str, Any]) -> None:
        """Refuse a scheme this format cannot hold, before any work (raise UnsupportedError)."""

    def export(self, job: ExportJob) -> Exported:
        raise NotImplementedError

    def export_in_background(self, job: ExportJob, stack: Any) -> Exported:
        raise NotImplementedError

    def load_module(self, folder: Path, art: Mapping[str, Any]) -> Module:
        raise NotImplementedError

    def generate(self, req: Request) -> Generated:
        raise NotImplementedError

    def accuracy(self, ctx: Any, art: Mapping[str, Any]) -> dict[str, Any]:
        """Accuracy on the shared slice, token by token through the artifact's KV cache."""
        from llamaship.targets import accuracy

        module = self.load_module(ctx.folder, art)
        try:
            return accuracy.evaluate_stepwise(module.forward, ctx.eval_slice, ctx.reference, ctx.progress).to_json()
        finally:
            close = getattr(module, "close", None)
            if close is not None:
                close()

    def speed(self, folder: Path, art: Mapping[str, Any], manifest: Mapping[str, Any], ckpt: Any,
              prompt_ids: list[int], n_gen: int) -> dict[str, Any]:
        raise NotImplementedError


class NotRunnableHere(Exception):
    """The artifact is fine but this host cannot run it (e.g. too large for the Core ML evaluator):
    the smoke test is skipped with this reason instead of failing the export."""


def bundle_tokenizer(req: Request) -> Any:
    """The tokenizer file the bundle ships (what an app loads), not the checkpoint's."""
    from llamaship.bundle import bundle_path
    from llamaship.export.llama.tokenizer import load_tokenizer_json, load_tokenizer_model

    path = bundle_path(req.folder, req.tokenizer.get("path"))
    return load_tokenizer_json(path, {}) if path.suffix == ".json" else load_tokenizer_model(path)


def greedy(module: Any, req: Request, runtime: str) -> Generated:
    """Greedy decoding over a module with reset()/forward() (the Core ML programs, the NPU graph)."""
    from llamaship.errors import UnsupportedError
    from llamaship.targets.greedy import generate_ids

    if req.temperature != 0.0:
        raise UnsupportedError(f"--temperature is not supported for {req.art.get('format')} yet (greedy only)")
    tokenizer = bundle_tokenizer(req)
    ids = ([req.tokenizer["bos_id"]] if req.num_bos else []) + tokenizer.encode(req.prompt, bos=False, special=True)
    stops, on_text = req.stop_ids, req.on_text
    on_token = None if on_text is None else (lambda t: None if t in stops else on_text(tokenizer.decode([t])))
    new, stats = generate_ids(module, ids, req.max_new_tokens, stops, on_token=on_token)
    return Generated(tokenizer.decode(new), stats, runtime)
