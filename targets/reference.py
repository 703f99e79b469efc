"""The fp32 reference log-probs of the evaluation slice, computed one block at a time over all
windows, so validating a Llama 2 7B / Llama 3 8B bundle fits a 24 GB machine.

Why streamed: the whole fp32 module is 4 bytes per parameter (32 GB for 8B). Here only one
block's fp32 weights (0.9 GB at 8B; the embedding or the lm_head, 2.1 GB, at the ends) and the
slice's hidden states (windows x window x dim fp32: 34 MB per 2048 tokens at 8B) are alive at
once. The hidden states live in a file beside the cache entry, with a marker saying how many
blocks they have been through, so an interrupted run resumes at the next block instead of from
the start.

Each window goes through the same `Block` modules, in the same order, as `Llama.forward` runs
them, so the result is today's reference to fp32 rounding (tests/test_validate.py checks it); the
cache entry (name and format) is the one `accuracy.reference_logprobs` writes, and either reuses
the other's.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from llamaship.export.llama.model import Block, RMSNorm, position_tables
from llamaship.export.llama.spec import ModelSpec
from llamaship.progress import advance
from llamaship.targets.accuracy import EvalSlice, cached_reference


def _block(spec: ModelSpec, state: Mapping[str, torch.Tensor], i: int, window: int) -> Block:
    with torch.device("meta"):
        block = Block(spec, window, "torch")
    prefix = f"layers.{i}."
    block.load_state_dict({n: state[prefix + n].to(torch.float32) for n, _ in block.named_parameters()},
                          strict=False, assign=True)
    cache = (1, window, spec.n_kv_heads, spec.head_dim)  # real buffers: the meta ones hold no memory
    block.attention.k_cache = torch.zeros(cache)
    block.attention.v_cache = torch.zeros(cache)
    return block.eval()


def _norm(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> RMSNorm:
    norm = RMSNorm(spec.dim, spec.norm_eps)
    norm.load_state_dict({"weight": state["norm.weight"].to(torch.float32)})
    return norm.eval()


class _Spill:
    """The slice's hidden states [windows, window, dim] fp32 in a file, and how many blocks they
    have been through (-1: not yet embedded)."""

    def __init__(self, path: Path, shape: tuple[int, int, int]) -> None:
        self.path, self.marker, self.shape = path, path.with_suffix(".json"), shape
        self.done = -1
        if path.exists() and self.marker.exists():
            try:
                mark = json.loads(self.marker.read_text())
                if tuple(mark["shape"]) == shape:
                    self.hidden = np.lib.format.open_memmap(path, mode="r+")
                    self.done = int(mark["blocks_done"])
                    return
            except (OSError, ValueError, KeyError, TypeError):
                pass
        self.hidden = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)

    def mark(self, blocks_done: int) -> None:
        self.hidden.flush()
        tmp = self.marker.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"shape": list(self.shape), "blocks_done": blocks_done}))
        os.replace(tmp, self.marker)
        self.done = blocks_done

    def remove(self) -> None:
        del self.hidden
        self.path.unlink(missing_ok=True)
        self.marker.unlink(missing_ok=True)


def streamed_logprobs(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], eval_slice: EvalSlice, model_sha: str,
    progress: Callable[[str], None] = print,
) -> np.ndarray:
    """[n_windows, n_scored, vocab] float16 log-probs of the fp32 model, from cache if present."""

    def fill(out: np.ndarray, stem: Path) -> None:
        spill = _Spill(stem.with_suffix(".hidden.npy"), (eval_slice.n_windows, eval_slice.window, spec.dim))
        if spill.done >= 0:
            progress(f"fp32 reference: resuming after block {spill.done} of {spec.n_layers} ({spill.path})")
        _run_blocks(spec, state, eval_slice, spill, progress)
        _head(spec, state, eval_slice, spill, out)
        spill.remove()

    reference = cached_reference(eval_slice, model_sha, spec.vocab_size, fill, progress)
    _return_freed_heap()
    return reference


def _return_freed_heap() -> None:
    """Give the heap pages the blocks freed back to the kernel. Why: glibc keeps freed memory for
    reuse, so after an 8B reference (one block's fp32 weights at a time, the 2.1 GB embedding and
    lm_head at the ends) the process would carry gigabytes of free-but-held heap into the
    artifact it scores next, and the peak of validation is that artifact's runtime on top."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing held the same way
        pass


def _run_blocks(spec: ModelSpec, state: Mapping[str, torch.Tensor], eval_slice: EvalSlice, spill: _Spill,
                progress: Callable[[str], None]) -> None:
    windows = list(eval_slice.windows())
    if spill.done < 0:
        emb = state["tok_embeddings.weight"].to(torch.float32)
        for w, window in enumerate(windows):
            spill.hidden[w] = emb[torch.tensor(window)].numpy()
        del emb
        spill.mark(0)
    cos, sin = position_tables(spec, eval_slice.window)
    n = eval_slice.window
    mask = torch.arange(n)[None, :] <= torch.arange(n)[:, None]  # what Llama.forward builds at start_pos 0
    for i in range(spill.done, spec.n_layers):
        block = _block(spec, state, i, n)
        with torch.no_grad():
            for w in range(len(windows)):
                spill.hidden[w] = block(torch.from_numpy(np.array(spill.hidden[w]))[None], cos, sin, 0, mask)[0].numpy()
        del block
        spill.mark(i + 1)
        advance(progress, "fp32 reference blocks (streamed over every window)", i + 1, spec.n_layers)


def _head(spec: ModelSpec, state: Mapping[str, torch.Tensor], eval_slice: EvalSlice, spill: _Spill,
          out: np.ndarray) -> None:
    s, e = eval_slice.first_scored, eval_slice.first_scored + eval_slice.n_scored
    norm = _norm(spec, state)
    weight = state["output.weight"] if "output.weight" in state else state["tok_embeddings.weight"]
    out_w = weight.to(torch.float32)
    with torch.no_grad():
        for w in range(eval_slice.n_windows):
            h = norm(torch.from_numpy(np.array(spill.hidden[w, s:e])))
            out[w] = torch.log_softmax(torch.nn.functional.linear(h, out_w), -1).numpy().astype(np.float16)
