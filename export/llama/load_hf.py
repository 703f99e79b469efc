"""Hugging Face folder: config.json + model.safetensors (or shards + index) + tokenizer files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamaship.errors import CheckpointError, UnsupportedError
from llamaship.export.llama.checkpoint import Checkpoint, config_errors, read_json
from llamaship.export.llama.lazy_state import LazyState, read_safetensors_lazy
from llamaship.export.llama.spec import ModelSpec, RopeScaling
from llamaship.export.llama.tokenizer import load_tokenizer

HF_TO_OURS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_MAP = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def hf_name(ours: str) -> str:
    """Inverse of the mapping; used by tests that write HF folders from our state dicts."""
    for hf, o in HF_TO_OURS.items():
        if o == ours:
            return hf
    _, i, rest = ours.split(".", 2)
    module, param = rest.rsplit(".", 1)
    for hf, o in LAYER_MAP.items():
        if o == module:
            return f"model.layers.{i}.{hf}.{param}"
    raise KeyError(ours)


def our_name(hf: str) -> str | None:
    if hf in HF_TO_OURS:
        return HF_TO_OURS[hf]
    parts = hf.split(".")
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers":
        module, param = ".".join(parts[3:-1]), parts[-1]
        if module in LAYER_MAP:
            return f"layers.{parts[2]}.{LAYER_MAP[module]}.{param}"
    return None  # rotary_emb.inv_freq and similar buffers


def spec_from_config(cfg: dict[str, Any], source: Path, name: str) -> ModelSpec:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    archs = [str(a) for a in archs] if isinstance(archs, list) else [str(archs)]
    if model_type != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise UnsupportedError(
            f"{source}: architecture {model_type!r} ({', '.join(archs) or 'no architectures'}) is "
            "not supported; llamaship exports LlamaForCausalLM checkpoints (Llama 2, Llama 3/3.1, "
            "SmolLM2 and other Llama-architecture models)"
        )
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedError(f"{source}: attention/MLP biases are not supported")
    with config_errors(source):
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise CheckpointError(f"rope_scaling must be an object, got {type(rope).__name__}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = None
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            absent = [k for k in keys if k not in rope]
            if absent:
                raise CheckpointError(f"rope_scaling of type 'llama3' is incomplete: {absent} missing "
                                      "(Llama 3.1's config.json has all four)")
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type not in ("default", None):
            raise UnsupportedError(f"{source}: rope scaling type {rope_type!r} is not supported")
    with config_errors(source):
        heads = cfg["num_attention_heads"]
        return ModelSpec(
            name=name,
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads,
            hidden_dim=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_context=int(cfg.get("max_position_embeddings", 2048)),
            head_dim=cfg.get("head_dim") or _div(cfg["hidden_size"], heads, "num_attention_heads"),
        )


def _div(a: Any, b: Any, name: str) -> int:
    if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
        raise CheckpointError(f"{name} must be a positive integer, got {b!r}")
    return int(a) // b


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index}: lists shards that are missing: {absent}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{folder}: no *.safetensors weights (.bin pickles are not loaded for safety: convert "
            "them to safetensors)"
        )
    return files


def read_safetensors(files: list[Path], rename) -> LazyState:  # type: ignore[no-untyped-def]
    """Tensors are read when the model is built, one at a time (see export/lazy_state.py)."""
    state = LazyState(files[0].parent)
    read_safetensors_lazy(files, rename, state)
    return state


def load_hf(folder: Path) -> Checkpoint:
    cfg_path = folder / "config.json"
    spec = spec_from_config(read_json(cfg_path), cfg_path, name=folder.name)
    files = weight_files(folder)
    state = read_safetensors(files, our_name)
    tokenizer = load_tokenizer(folder)
    gen_path = folder / "generation_config.json"
    gen = read_json(gen_path) if gen_path.exists() else {}
    spec = tokenizer.complete_spec(spec, eos_override=gen.get("eos_token_id"))
    extra = [p for p in (cfg_path, gen_path) if p.exists()]
    return Checkpoint(spec, state, tokenizer, folder, "hf", files + extra)
