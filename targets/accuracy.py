"""Accuracy of an artifact against the fp32 reference, llama.cpp perplexity-tool style.

The evaluation slice is the first N tokens of WikiText-2 test after the model's own tokenizer,
cut into windows of `window` tokens; the second half of each window is scored (so every scored
token has at least window/2 tokens of context). The reference is the fp32 Llama module's
log-probabilities, cached on disk as float16 keyed by the checkpoint's sha256 and the slice.

The artifact is run on its own runtime exactly as shipped: the .pte is fed one token at a time
through its KV cache (the decode path a phone runs), so no second "full logits" export is needed
and what is measured is the bundle itself.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaship.data import EVAL_FILE, data_file
from llamaship.errors import DataError, UnsupportedError
from llamaship.progress import advance

CACHE_VERSION = 1


def find_eval_text(name: str = EVAL_FILE) -> Path:
    """The evaluation text the package carries (or LLAMASHIP_DATA's copy)."""
    return data_file(name)


@dataclass(frozen=True)
class EvalSlice:
    tokens: tuple[int, ...]
    window: int

    @property
    def n_windows(self) -> int:
        return len(self.tokens) // self.window

    @property
    def first_scored(self) -> int:
        return self.window // 2 - 1  # logits at this position predict token window//2

    @property
    def n_scored(self) -> int:
        return self.window - 1 - self.first_scored

    def windows(self) -> Iterator[list[int]]:
        for w in range(self.n_windows):
            yield list(self.tokens[w * self.window : (w + 1) * self.window])

    def key(self, model_sha: str) -> str:
        h = hashlib.sha256(f"{CACHE_VERSION}|{model_sha}|{self.window}|".encode())
        h.update(np.asarray(self.tokens, dtype=np.int64).tobytes())
        return h.hexdigest()[:32]

    def describe(self) -> str:
        return (f"first {len(self.tokens)} tokens of WikiText-2 test, {self.n_windows} windows of "
                f"{self.window}, {self.n_windows * self.n_scored} scored")


def make_slice(tokenizer: Any, n_tokens: int, window: int) -> EvalSlice:
    if window < 4:
        raise UnsupportedError(f"evaluation window {window} is too small")
    text = find_eval_text().read_text()
    ids = tokenizer.encode(text[: n_tokens * 12], bos=False)  # ~4 chars/token: plenty, not all
    if len(ids) < n_tokens:
        ids = tokenizer.encode(text, bos=False)
    n = min(n_tokens, len(ids)) // window * window
    if n == 0:
        raise DataError(f"evaluation slice of {n_tokens} tokens is shorter than one window ({window})")
    return EvalSlice(tuple(ids[:n]), window)


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMASHIP_CACHE", Path.home() / ".cache" / "llamaship")) / "reference"


def usable_cache(progress: Callable[[str], None]) -> Path | None:
    """The reference cache folder, or None (with a warning) when it cannot be used: LLAMASHIP_CACHE
    naming a file or a read-only folder costs a recomputation, not the run."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
    except OSError:
        pass
    progress(f"warning: the reference cache {folder} is not a writable folder (LLAMASHIP_CACHE); computing the "
             "fp32 reference without caching it")
    return None


def sweep_stale_tmp(folder: Path) -> None:
    """Remove `*.tmp<pid>.npy` files whose process is gone (a validation killed with SIGKILL runs
    no cleanup and once left 1.8 GB behind)."""
    from llamaship.bundle import process_gone

    for path in folder.glob("*.tmp*.npy"):
        if process_gone(path.name.rsplit(".tmp", 1)[-1].removesuffix(".npy")):
            path.unlink(missing_ok=True)


def _load_cached(path: Path, shape: tuple[int, ...], progress: Callable[[str], None]) -> np.ndarray | None:
    try:
        cached = np.load(path, mmap_mode="r")
        if cached.shape == shape and cached.dtype == np.float16:
            return cached
    except (OSError, ValueError, EOFError):
        pass
    progress(f"warning: {path} is not a valid cached reference; recomputing it")
    path.unlink(missing_ok=True)
    return None


def cached_reference(
    eval_slice: EvalSlice, model_sha: str, vocab: int, fill: Callable[[np.ndarray, Path], None],
    progress: Callable[[str], None] = print,
) -> np.ndarray:
    """[n_windows, n_scored, vocab] float16 reference log-probs from the cache, or computed by
    `fill(out, stem)` into a fresh memory-mapped file (`stem`: a path prefix in the cache folder
    for any resumable work files) that becomes the cache entry only once complete."""
    shape = (eval_slice.n_windows, eval_slice.n_scored, vocab)
    folder = usable_cache(progress)
    transient = folder is None
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="llamaship-reference-"))
    path = folder / f"{eval_slice.key(model_sha)}.npy"
    if path.exists() and (cached := _load_cached(path, shape, progress)) is not None:
        return cached
    sweep_stale_tmp(folder)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        fill(out, path.with_suffix(""))
        out.flush()
        del out
        os.replace(tmp, path)
        result = np.load(path, mmap_mode="r")
    except OSError as exc:
        raise DataError(f"cannot write the fp32 reference in {folder} ({exc.strerror or exc}); free disk "
                             "space there or point LLAMASHIP_CACHE at another disk") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
        if transient:
            shutil.rmtree(folder, ignore_errors=True)  # the memory map keeps the data readable
    return result


def reference_logprobs(
    model: torch.nn.Module, eval_slice: EvalSlice, model_sha: str,
    progress: Callable[[str], None] = print,
) -> np.ndarray:
    """The reference from a whole fp32 module in memory (`targets.reference.streamed_logprobs` is
    what validation uses: one block at a time). `model` must be a Llama built with impl="torch",
    full_logits=True."""
    s, e = eval_slice.first_scored, eval_slice.first_scored + eval_slice.n_scored

    def fill(out: np.ndarray, stem: Path) -> None:
        for w, window in enumerate(eval_slice.windows()):
            with torch.no_grad():
                logits = model(torch.tensor([window]), torch.tensor([0]))[0, s:e]
            out[w] = torch.log_softmax(logits.float(), -1).numpy().astype(np.float16)
            advance(progress, "fp32 reference windows", w + 1, eval_slice.n_windows)

    spec: Any = getattr(model, "spec")  # noqa: B009  (a Llama's; nn.Module does not declare it)
    return cached_reference(eval_slice, model_sha, int(spec.vocab_size), fill, progress)


@dataclass
class Accuracy:
    ppl: float
    ref_ppl: float
    ppl_ratio: float
    mean_kld: float
    top1_agreement: float
    rms_dp: float  # RMS of the change in probability of the correct token
    scored_tokens: int
    slice: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Accumulator:
    def __init__(self) -> None:
        self.n = 0
        self.nll = self.ref_nll = self.kld = self.dp2 = 0.0
        self.agree = 0

    def add(self, logits: torch.Tensor, ref_lp: torch.Tensor, targets: torch.Tensor) -> None:
        """logits [n, V] from the artifact, ref_lp [n, V] reference log-probs, targets [n]."""
        lq = torch.log_softmax(logits.float(), -1)
        lp = ref_lp.float()
        lp = lp - torch.logsumexp(lp, -1, keepdim=True)  # renormalize after fp16 storage
        idx = targets[:, None]
        self.nll += float(-lq.gather(1, idx).sum())
        self.ref_nll += float(-lp.gather(1, idx).sum())
        self.kld += float((lp.exp() * (lp - lq)).sum())
        self.agree += int((lq.argmax(-1) == lp.argmax(-1)).sum())
        self.dp2 += float(((lq.gather(1, idx).exp() - lp.gather(1, idx).exp()) ** 2).sum())
        self.n += len(targets)

    def result(self, slice_text: str) -> Accuracy:
        ppl, ref_ppl = math.exp(self.nll / self.n), math.exp(self.ref_nll / self.n)
        return Accuracy(
            ppl=ppl, ref_ppl=ref_ppl, ppl_ratio=ppl / ref_ppl, mean_kld=self.kld / self.n,
            top1_agreement=self.agree / self.n, rms_dp=math.sqrt(self.dp2 / self.n),
            scored_tokens=self.n, slice=slice_text,
        )


def evaluate_stepwise(
    step: Callable[[list[int], int], torch.Tensor],
    eval_slice: EvalSlice,
    reference: np.ndarray,
    progress: Callable[[str], None] = print,
) -> Accuracy:
    """`step(tokens, start_pos) -> logits [1, V]` is the artifact's forward; it is called once per
    token, so the KV cache path is what gets measured."""
    acc = _Accumulator()
    s = eval_slice.first_scored
    start, calls = time.perf_counter(), 0
    for w, window in enumerate(eval_slice.windows()):
        rows = []
        for pos in range(eval_slice.window - 1):
            logits = step([window[pos]], pos)
            if pos >= s:
                rows.append(logits.reshape(-1))
        calls += eval_slice.window - 1
        targets = torch.tensor(window[s + 1 :])
        acc.add(torch.stack(rows), torch.from_numpy(np.array(reference[w], dtype=np.float32)), targets)
        rate = calls / max(time.perf_counter() - start, 1e-9)
        advance(progress, "artifact windows", w + 1, eval_slice.n_windows, f"{rate:.1f} tok/s")
    return acc.result(eval_slice.describe())


def evaluate_reference_self(eval_slice: EvalSlice, reference: np.ndarray) -> float:
    """PPL of the fp32 reference itself on the slice (for the report's baseline row)."""
    nll, n = 0.0, 0
    s = eval_slice.first_scored
    for w, window in enumerate(eval_slice.windows()):
        lp = torch.from_numpy(np.array(reference[w], dtype=np.float32))
        lp = lp - torch.logsumexp(lp, -1, keepdim=True)
        targets = torch.tensor(window[s + 1 :])
        nll += float(-lp.gather(1, targets[:, None]).sum())
        n += len(targets)
    return math.exp(nll / n)


def evaluate_chunked(
    forward: Callable[[list[int], int], torch.Tensor],
    eval_slice: EvalSlice,
    reference: np.ndarray,
    progress: Callable[[str], None] = print,
) -> Accuracy:
    """`forward(tokens, 0) -> logits [n, V]` takes a whole window at once: for static-shape graphs
    (the HTP's fixed prompt chunks), where one call per token would run the full chunk each time."""
    acc = _Accumulator()
    s = eval_slice.first_scored
    for w, window in enumerate(eval_slice.windows()):
        logits = forward(window[:-1], 0)[s:]
        targets = torch.tensor(window[s + 1 :])
        acc.add(logits, torch.from_numpy(np.array(reference[w], dtype=np.float32)), targets)
        advance(progress, "artifact windows", w + 1, eval_slice.n_windows)
    return acc.result(eval_slice.describe())
