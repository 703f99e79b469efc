"""Find and load a checkpoint, whatever its layout: the dispatcher over the loaders.

Kept apart from `checkpoint.py` (the `Checkpoint` type and the helpers the loaders share) so the
loaders import downward only: load -> load_hf / load_meta / load_gguf -> checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from llamaship.errors import CheckpointError
from llamaship.export.llama.checkpoint import Checkpoint, check_state, read_json
from llamaship.export.llama.spec import ModelSpec


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
        from llamaship.export.llama.load_hf import load_hf

        ckpt = load_hf(path)
    elif layout == "meta":
        from llamaship.export.llama.load_meta import load_meta

        ckpt = load_meta(path)
    else:
        from llamaship.export.llama.load_gguf import load_gguf

        ckpt = load_gguf(path if path.is_file() else sorted(path.glob("*.gguf"))[0])
    check_state(ckpt.spec, ckpt.state, ckpt.source)
    if ckpt.tokenizer.vocab_size > ckpt.spec.vocab_size:
        raise CheckpointError(
            f"{ckpt.tokenizer.path}: tokenizer has {ckpt.tokenizer.vocab_size} tokens but the "
            f"model's vocabulary is {ckpt.spec.vocab_size}; this tokenizer belongs to another model"
        )
    return ckpt


def load_spec(model: str | Path) -> ModelSpec:
    """The ModelSpec alone, without reading weights: enough for `llamaship fit` on a 70 GB
    checkpoint, or on just its config.json / params.json; or a named preset ("llama3-8b", or a Hub
    id of a preset's repository), or another Hub id's config.json alone."""
    if not Path(model).expanduser().exists():
        from llamaship.export.llama.presets import find_preset, hub_config_spec

        preset = find_preset(str(model))
        if preset is not None:
            return preset.spec()
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)):
            return hub_config_spec(str(model))
    path = resolve_model(model)
    if path.is_file() and path.name == "config.json":
        from llamaship.export.llama.load_hf import spec_from_config

        return spec_from_config(read_json(path), path, name=path.parent.name)
    if path.is_file() and path.name == "params.json":
        return _meta_spec(path)
    layout = detect_layout(path)
    if layout == "hf":
        return load_spec(path / "config.json")
    if layout == "meta":
        return _meta_spec(path / "params.json")
    from llamaship.export.llama.load_gguf import gguf_spec, read_gguf

    gguf_path = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
    return gguf_spec(read_gguf(gguf_path)[1], gguf_path)


def _meta_spec(params_path: Path) -> ModelSpec:
    from llamaship.export.llama.load_meta import spec_from_params

    params = read_json(params_path)
    vocab = params.get("vocab_size", -1)
    if not isinstance(vocab, int) or vocab <= 0:  # Llama 2's params.json says -1
        tok = params_path.parent / "tokenizer.model"
        if not tok.exists():
            raise CheckpointError(
                f"{params_path}: vocab_size is {vocab}; the vocabulary comes from tokenizer.model, "
                "which is not beside it"
            )
        from llamaship.export.llama.tokenizer import load_tokenizer_model

        vocab = load_tokenizer_model(tok).vocab_size
    return spec_from_params(params, vocab, params_path, name=params_path.parent.name)
