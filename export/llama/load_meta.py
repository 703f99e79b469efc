"""Meta folder: params.json + consolidated.00.pth + tokenizer.model (Llama 2 SentencePiece or
Llama 3 tiktoken). Weights are opened with `weights_only=True` (no code in a pickle can run) and
`mmap=True` (an 8B checkpoint is not read into RAM up front)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from llamaship.errors import CheckpointError, UnsupportedError
from llamaship.export.llama.checkpoint import Checkpoint, check_state, config_errors, permute_meta_to_half, read_json
from llamaship.export.llama.lazy_state import LazyState
from llamaship.export.llama.spec import ModelSpec, RopeScaling
from llamaship.export.llama.tokenizer import load_tokenizer_model

# Meta's reference applies this scaling when params.json says use_scaled_rope (Llama 3.1+).
LLAMA31_ROPE_SCALING = RopeScaling(8.0, 1.0, 4.0, 8192)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The FFN width Meta's model.py derives from params.json."""
    if not isinstance(multiple_of, int) or isinstance(multiple_of, bool) or multiple_of <= 0:
        raise CheckpointError(f"multiple_of must be a positive integer, got {multiple_of!r}")
    if ffn_dim_multiplier is not None and not (isinstance(ffn_dim_multiplier, (int, float))
                                               and 0 < ffn_dim_multiplier < 100):
        raise CheckpointError(f"ffn_dim_multiplier must be a positive number, got {ffn_dim_multiplier!r}")
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def spec_from_params(params: dict[str, Any], vocab_size: int, source: Path, name: str) -> ModelSpec:
    if "moe" in params or "n_experts" in params:
        raise UnsupportedError(f"{source}: mixture-of-experts checkpoints are not supported")
    with config_errors(source):
        dim, n_heads = params["dim"], params["n_heads"]
        if not isinstance(dim, int) or not isinstance(n_heads, int) or n_heads <= 0 or dim <= 0:
            raise CheckpointError(f"{source}: dim and n_heads must be positive integers")
        vocab = params.get("vocab_size", -1)
        return ModelSpec(
            name=name,
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            hidden_dim=ffn_hidden_dim(
                dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")
            ),
            vocab_size=vocab if isinstance(vocab, int) and vocab > 0 else vocab_size,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=LLAMA31_ROPE_SCALING if params.get("use_scaled_rope") else None,
            max_context=int(params.get("max_seq_len", 8192 if vocab_size > 100_000 else 4096)),
        )


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    from llamaship.safe_io import regular_file

    regular_file(path, CheckpointError, "weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        # torch's own message suggests retrying with weights_only=False: never pass that on
        culprit = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "global" in ln), "")
        raise CheckpointError(
            f"{path}: refused to load: the file holds Python objects other than tensors, which could "
            f"run code when unpickled ({culprit[:200] or 'not a plain state dict'}). Get the weights "
            "from a trusted source, preferably as safetensors"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: cannot read the .pth file ({str(exc).splitlines()[0]}); it is truncated or "
            "corrupt: download it again"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state


def load_meta(folder: Path) -> Checkpoint:
    params_path = folder / "params.json"
    params = read_json(params_path)
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{folder}: no consolidated.*.pth weights next to params.json")
    if len(shards) > 1:
        raise UnsupportedError(
            f"{folder}: {len(shards)} model-parallel shards; merge them first (7B/8B ship as one)"
        )
    tok_path = folder / "tokenizer.model"
    if not tok_path.exists():
        raise CheckpointError(
            f"{folder}: tokenizer.model is missing; copy the one that came with these weights"
        )
    tokenizer = load_tokenizer_model(tok_path)
    spec = spec_from_params(params, tokenizer.vocab_size, params_path, name=folder.name)
    raw = load_pth(shards[0])
    raw.pop("rope.freqs", None)
    if "output.weight" not in raw:
        spec = spec.replace(tied_embeddings=True)
    # the .pth is memory-mapped; each tensor is reordered (q/k) and converted only when the model
    # is built from it, so an 8B checkpoint is never held in RAM whole
    state = LazyState(shards[0])
    for key, tensor in raw.items():
        state.add(key, lambda t=tensor: t, tuple(tensor.shape))
        if key.endswith("attention.wq.weight"):
            state.map(key, lambda t, h=spec.n_heads: permute_meta_to_half(t, h))
        elif key.endswith("attention.wk.weight"):
            state.map(key, lambda t, h=spec.n_kv_heads: permute_meta_to_half(t, h))
    check_state(spec, state, shards[0])  # shapes now; NaN/Inf per tensor as it is read
    spec = tokenizer.complete_spec(spec)
    return Checkpoint(spec, state, tokenizer, folder, "meta", [params_path, shards[0]])
