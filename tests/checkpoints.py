"""Writers for tiny checkpoints in the real on-disk layouts (HF, Meta, GGUF).

Each starts from a seeded random transformers `LlamaForCausalLM`, the reference every loader is
compared against, and writes it the way the real producers do: `save_pretrained` for HF (sharded
safetensors + index), Meta's names and interleaved q/k rows for `consolidated.00.pth`, llama.cpp's
names and q/k permutation for GGUF.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaship.data import CALIB_FILE, data_file


def _llama3_tokenizer() -> Path:
    """Meta's own copy, from the `llama-models` wheel (a test dependency, installed --no-deps; found
    without importing the package, whose __init__ wants its own dependencies)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Llama 3 tokenizer comes from Meta's llama-models wheel: "
                                "`pip install --no-deps llama-models==0.3.0` (the Makefile's set-up does)")
    return Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"


# The real files, byte for byte (test_tokenizers checks the sha256): Llama 2's SentencePiece model is
# vendored beside the tests with Meta's licence (tests/data/README.md); Llama 3's comes from Meta's wheel.
LLAMA2_TOKENIZER = Path(__file__).resolve().parent / "data" / "llama2-tokenizer.model"
LLAMA3_TOKENIZER = _llama3_tokenizer()
LLAMA2_TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
LLAMA3_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
# SmolLM2-135M-Instruct's chat template, as its GGUF carries it (ChatML with a default system turn)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# Written out here rather than imported from the loaders on purpose: a wrong mapping in a loader
# must make the parity tests fail, not be mirrored by the writer.
META_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
META_LAYER = {
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
GGUF_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.down_proj": "ffn_down",
    "mlp.up_proj": "ffn_up",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def tiny_hf_model(
    vocab_size: int,
    *,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    hidden: int = 192,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    tied: bool = False,
    bos: int = 1,
    eos: int | list[int] = 2,
    seed: int = 0,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        intermediate_size=hidden,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the default init so layers matter in the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.uniform_(0.8, 1.2)
    return model


def write_hf(model, folder: Path, tokenizer_model: Path | None = None, shard: str | None = "100KB") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, folder / "tokenizer.model")
    return folder


def _interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (half-split) q/k rows -> Meta's interleaved pairs, as Meta's reference stores them."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def meta_state(model) -> dict[str, torch.Tensor]:
    cfg = model.config
    state = {}
    for name, tensor in model.state_dict().items():
        if name in META_NAMES:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            state[META_NAMES[name]] = tensor.clone()
            continue
        parts = name.split(".")
        module = ".".join(parts[3:-1])
        ours = f"layers.{parts[2]}.{META_LAYER[module]}.{parts[-1]}"
        if module == "self_attn.q_proj":
            tensor = _interleave(tensor, cfg.num_attention_heads)
        elif module == "self_attn.k_proj":
            tensor = _interleave(tensor, cfg.num_key_value_heads)
        state[ours] = tensor.clone()
    return state


def write_meta(model, folder: Path, tokenizer_model: Path, multiple_of: int = 32) -> Path:
    cfg = model.config
    folder.mkdir(parents=True, exist_ok=True)
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "multiple_of": multiple_of,
        "norm_eps": cfg.rms_norm_eps,
        "rope_theta": _rope(cfg).get("rope_theta", 10000.0),
    }
    if _rope(cfg).get("rope_type") == "llama3":
        params["use_scaled_rope"] = True
    (folder / "params.json").write_text(json.dumps(params))
    torch.save(meta_state(model), folder / "consolidated.00.pth")
    shutil.copyfile(tokenizer_model, folder / "tokenizer.model")
    return folder


def _rope(cfg) -> dict[str, Any]:
    rp = getattr(cfg, "rope_parameters", None) or {}
    if not rp:
        rp = dict(getattr(cfg, "rope_scaling", None) or {})
        rp.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return dict(rp)


def write_gguf(model, path: Path, tokens: list[str], merges: list[str], token_types: list[int]) -> Path:
    """A float32 llama GGUF with a byte-level BPE vocabulary, laid out as llama.cpp writes it."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(_rope(cfg).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            gname = {"model.embed_tokens.weight": "token_embd.weight",
                     "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        else:
            parts = name.split(".")
            module = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{GGUF_LAYER[module]}.{parts[-1]}"
            if module == "self_attn.q_proj":
                tensor = _interleave(tensor, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                tensor = _interleave(tensor, cfg.num_key_value_heads)
        w.add_tensor(gname, tensor.float().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def train_bpe(vocab_size: int = 320) -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE trained on WikiText-2 valid, with ChatML specials like SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = data_file(CALIB_FILE).read_text().splitlines()[:4000]
    tok.train_from_iterator(lines, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if t in specials else 1 for t in tokens]
    return tokens, merges, types
