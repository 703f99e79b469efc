"""Find and load a checkpoint, whatever its layout, into (ModelSpec, state dict, tokenizer).

Layouts: a Hugging Face folder (config.json + safetensors), a Meta folder (params.json +
consolidated.*.pth), a GGUF file, or a Hub model id (resolved with huggingface_hub when the
network allows). The state dict uses `llamaship.export.model.Llama` names and its half-split RoPE
layout for q/k, and is checked against the spec's shapes before anything is built from it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llamaship.bundle import sha256_file
from llamaship.errors import CheckpointError
from llamaship.export.spec import ModelSpec
from llamaship.export.tokenizer import Tokenizer


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
    from llamaship.export.lazy_state import LazyState, shape_of

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


def detect_layout(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise CheckpointError(
            f"{path}: a single file must be a .gguf; for other layouts pass the folder that "
            "holds config.json (Hugging Face) or params.json (Meta)"
        )
    if (path / "config.json").exists():
        return "hf"
    if (path / "params.json").exists():
        return "meta"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise CheckpointError(
        f"{path}: not a checkpoint folder: expected config.json + *.safetensors (Hugging Face), "
        "params.json + consolidated.*.pth (Meta), or one .gguf file"
    )


def resolve_model(model: str | Path) -> Path:
    """A local path, or a Hub id like `meta-llama/Meta-Llama-3-8B` downloaded when possible."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)):
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(
                    str(model),
                    allow_patterns=["*.json", "*.safetensors", "tokenizer.model"],
                )
            )
        except Exception as exc:  # network, auth (gated Llama repos), unknown id
            raise CheckpointError(
                f"could not fetch {model!r} from the Hugging Face Hub ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Download it where the network "
                "allows (`huggingface-cli download ID --local-dir DIR`, accepting the licence "
                "for gated Llama repos) and pass --model DIR"
            ) from exc
    raise CheckpointError(f"{model}: no such file or folder")


def load_checkpoint(
    model: str | Path, progress: Callable[[str], None] | None = None
) -> Checkpoint:
    path = resolve_model(model)
    layout = detect_layout(path)
    if progress:
        progress(f"loading {layout} checkpoint {path}")
    if layout == "hf":
        from llamaship.export.load_hf import load_hf

        ckpt = load_hf(path)
    elif layout == "meta":
        from llamaship.export.load_meta import load_meta

        ckpt = load_meta(path)
    else:
        from llamaship.export.load_gguf import load_gguf

        ckpt = load_gguf(path if path.is_file() else sorted(path.glob("*.gguf"))[0])
    check_state(ckpt.spec, ckpt.state, ckpt.source)
    if ckpt.tokenizer.vocab_size > ckpt.spec.vocab_size:
        raise CheckpointError(
            f"{ckpt.tokenizer.path}: tokenizer has {ckpt.tokenizer.vocab_size} tokens but the "
            f"model's vocabulary is {ckpt.spec.vocab_size}; this tokenizer belongs to another model"
        )
    return ckpt


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


def load_spec(model: str | Path) -> ModelSpec:
    """The ModelSpec alone, without reading weights: enough for `llamaship fit` on a 70 GB
    checkpoint, or on just its config.json / params.json."""
    path = resolve_model(model)
    if path.is_file() and path.name == "config.json":
        from llamaship.export.load_hf import spec_from_config

        return spec_from_config(read_json(path), path, name=path.parent.name)
    if path.is_file() and path.name == "params.json":
        return _meta_spec(path)
    layout = detect_layout(path)
    if layout == "hf":
        return load_spec(path / "config.json")
    if layout == "meta":
        return _meta_spec(path / "params.json")
    from llamaship.export.load_gguf import gguf_spec, read_gguf

    gguf_path = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
    return gguf_spec(read_gguf(gguf_path)[1], gguf_path)


def _meta_spec(params_path: Path) -> ModelSpec:
    from llamaship.export.load_meta import spec_from_params

    params = read_json(params_path)
    vocab = params.get("vocab_size", -1)
    if not isinstance(vocab, int) or vocab <= 0:  # Llama 2's params.json says -1
        tok = params_path.parent / "tokenizer.model"
        if not tok.exists():
            raise CheckpointError(
                f"{params_path}: vocab_size is {vocab}; the vocabulary comes from tokenizer.model, "
                "which is not beside it"
            )
        from llamaship.export.tokenizer import load_tokenizer_model

        vocab = load_tokenizer_model(tok).vocab_size
    return spec_from_params(params, vocab, params_path, name=params_path.parent.name)
