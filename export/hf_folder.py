"""Write any loaded checkpoint back out as a Hugging Face folder (config.json + safetensors +
tokenizer files).

Why: onnxruntime-genai's model builder (our ONNX route) reads only Hugging Face folders. Routing
every source through our loaders first means a Meta `consolidated.pth` or a GGUF file reaches the
builder with the same checks, the same q/k layout and the same tokenizer fixes as the .pte route.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llamaship.export.llama.load_hf import hf_name
from llamaship.export.llama.spec import ModelSpec
from llamaship.export.llama.tokenizer import Tokenizer


def hf_config(spec: ModelSpec, dtype: torch.dtype) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.dim,
        "intermediate_size": spec.hidden_dim,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "max_position_embeddings": spec.max_context,
        "tie_word_embeddings": spec.tied_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": spec.bos_id,
        "eos_token_id": spec.eos_id,
    }
    if spec.rope_scaling is not None:
        rs = spec.rope_scaling
        cfg["rope_scaling"] = {
            "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    return cfg


def write_tokenizer_files(tokenizer: Tokenizer, spec: ModelSpec, folder: Path) -> list[str]:
    """tokenizer.json (or tokenizer.model for SentencePiece) + tokenizer_config.json, in the form
    onnxruntime-genai's tokenizer (onnxruntime-extensions) and transformers both read."""
    written = [tokenizer.write_runner_file(folder).name]
    if tokenizer.kind == "tiktoken":
        # Llama 3's tiktoken ranks: onnxruntime-genai wants the tokenizer.json form of the same BPE
        (folder / "tokenizer.model").unlink()
        written = [_tiktoken_to_json(tokenizer, folder / "tokenizer.json").name]
    config = {
        "tokenizer_class": "LlamaTokenizer" if tokenizer.kind == "sentencepiece" else "PreTrainedTokenizerFast",
        "bos_token": tokenizer.token_text(spec.bos_id) or None,
        "eos_token": tokenizer.token_text(spec.eos_id) or None,
        "add_bos_token": spec.add_bos,
        "add_eos_token": False,
        "model_max_length": spec.max_context,
        "clean_up_tokenization_spaces": False,
    }
    if spec.chat_template:
        config["chat_template"] = spec.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    gen = {"bos_token_id": spec.bos_id, "eos_token_id": list(spec.stop_ids) or spec.eos_id}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=1))
    return [*written, "tokenizer_config.json", "generation_config.json"]


def _tiktoken_to_json(tokenizer: Tokenizer, dest: Path) -> Path:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    assert tokenizer.path is not None
    specials = sorted(tokenizer._impl.special_tokens.items(), key=lambda kv: kv[1])  # noqa: SLF001
    converter = TikTokenConverter(
        vocab_file=str(tokenizer.path), additional_special_tokens=[s for s, _ in specials]
    )
    converter.converted().save(str(dest))
    return dest


def write_hf_folder(
    spec: ModelSpec, state: dict[str, torch.Tensor], tokenizer: Tokenizer, folder: Path,
    shard_bytes: int = 2 << 30,
) -> Path:
    """Weights keep their dtype; shards of at most `shard_bytes` with an index, like HF's own."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(state.values())).dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        if spec.tied_embeddings and name == "output.weight":
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][hf_name(name)] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, fname)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}  # transformers needs both
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(hf_config(spec, dtype), indent=1))
    write_tokenizer_files(tokenizer, spec, folder)
    return folder
