"""Find and load a checkpoint, whatever its layout, into (ModelSpec, state dict, tokenizer).

Layouts: a Hugging Face folder (config.json + safetensors), a Meta folder (params.json +
consolidated.*.pth), a GGUF file, or a Hub model id (resolved with huggingface_hub when the
network allows). The state dict uses `llamaship.export.llama.model.Llama` names and its half-split RoPE
layout for q/k, and is checked against the spec's shapes before anything is built from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llamaship.bundle import sha256_file
from llamaship.errors import CheckpointError
from llamaship.export.llama.spec import ModelSpec
from llamaship.export.llama.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    spec: ModelSpec
    state: Mapping[str, torch.Tensor]  # a LazyState for HF and Meta checkpoints
    tokenizer: Tokenizer
    source: Path
    layout: str  # "hf" | "meta" | "gguf"
    files: list[Path] = field(default_factory=list)  # the files the weights came from

    def sha256(self) -> str:
        """One digest over the weight and config files, in name order (cheap to recompute,
        independent of where the folder lives)."""
        digest = hashlib.sha256()
        for path in sorted(self.files, key=lambda p: p.name):
            digest.update(path.name.encode())
            digest.update(sha256_file(path).encode())
        return digest.hexdigest()


def permute_meta_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta/GGUF store each head's q/k rows as interleaved (re, im) pairs; our RoPE (like HF)
    rotates the first half of a head against the second. Reorder rows to match."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_half_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_meta_to_half`: for tools that read Meta's layout (ExecuTorch's
    export_llama, in bench/peers.py)."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def check_state(spec: ModelSpec, state: Mapping[str, torch.Tensor], source: Path) -> None:
    """Shape and finiteness checks, so a mismatch names the tensor instead of failing deep in
    load_state_dict or, worse, exporting garbage."""
    expected = spec.expected_shapes()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"{source}: checkpoint lacks {len(missing)} weight(s) the config calls for, "
            f"e.g. {missing[:3]}; the config and the weights do not belong together"
        )
    from llamaship.export.llama.lazy_state import LazyState, shape_of

    for name, shape in expected.items():
        got = shape_of(state, name)
        if got != shape:
            raise CheckpointError(
                f"{source}: weight {name} has shape {list(got)} but the config implies "
                f"{list(shape)}; check that the config file matches these weights"
            )
    if isinstance(state, LazyState):
        return  # it checks each tensor for NaN/Inf as the model is built from it
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{source}: weight {name} contains NaN or Inf values; the checkpoint is corrupt "
                "(re-download or re-convert it)"
            )


@contextmanager
def config_errors(source: Path) -> Iterator[None]:
    """Turn what goes wrong while reading a config into one error that names the config file:
    a missing field, a field of the wrong type, or a value ModelSpec's own checks reject."""
    try:
        yield
    except KeyError as exc:
        raise CheckpointError(f"{source}: required field {exc} is missing") from exc
    except ZeroDivisionError as exc:
        raise CheckpointError(f"{source}: a count the model is divided by is zero ({exc})") from exc
    except (TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise CheckpointError(f"{source}: a field has the wrong type ({exc})") from exc
    except CheckpointError as exc:
        if str(source) in str(exc):
            raise
        raise CheckpointError(f"{source}: {exc}") from exc


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file: a regular file of sane size holding one strict JSON object."""
    from llamaship.safe_io import read_json_object

    return read_json_object(path, CheckpointError, f"{path.name}")
