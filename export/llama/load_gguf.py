"""GGUF file (llama.cpp's format): how the embedded default model arrives.

Weights are dequantized with gguf-py (the reference reader from llama.cpp) and q/k rows are
reordered back from llama.cpp's interleaved RoPE layout. The tokenizer is rebuilt from the GGUF
vocabulary with `tokenizers`: converting the GGUF through transformers once produced a wrong
post-processor and EOS (see DESIGN.md), so we build exactly what the GGUF says, and the tests compare
the result with transformers' own GGUF conversion.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaship.errors import CheckpointError, UnsupportedError
from llamaship.export.llama.checkpoint import Checkpoint, config_errors, permute_meta_to_half
from llamaship.export.llama.spec import ModelSpec
from llamaship.export.llama.tokenizer import LLAMA3_STOP_TOKENS, Tokenizer

# Meta's Llama 3 pre-tokenizer regex (llama.cpp calls it "llama-bpe").
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
TENSOR_NAMES = {
    "token_embd": "tok_embeddings",
    "output_norm": "norm",
    "output": "output",
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
CONTROL, USER_DEFINED = 3, 4


def _fields(reader: Any) -> dict[str, Any]:
    out = {}
    for key, f in reader.fields.items():
        try:
            out[key] = f.contents()
        except Exception:  # fields of types gguf-py cannot render are not needed
            continue
    return out


def _our_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in TENSOR_NAMES:
        return f"layers.{parts[1]}.{TENSOR_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TENSOR_NAMES:
        return f"{TENSOR_NAMES[parts[0]]}.{parts[1]}"
    return None  # rope_freqs and similar


def build_tokenizer(meta: dict[str, Any], source: Path) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedError(
            f"{source}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, "
            "'gpt2'); use the original Hugging Face or Meta checkpoint instead"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTok(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("llama-bpe", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in ("default", "gpt2", "gpt-2"):
        tok.pre_tokenizer = byte_level
    else:
        raise UnsupportedError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported")
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind_ in zip(tokens, types, strict=True)
            if kind_ in (CONTROL, USER_DEFINED)
        ]
    )

    def name(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    stops = tuple(
        t for t in (name("tokenizer.ggml.eot_token_id"), "<|endoftext|>", *LLAMA3_STOP_TOKENS)
        if t is not None and t in vocab
    )
    return Tokenizer(
        "hf",
        None,
        tok,
        bos=name("tokenizer.ggml.bos_token_id"),
        eos=name("tokenizer.ggml.eos_token_id"),
        stops=stops,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        chat_template=_text_or_none(meta.get("tokenizer.chat_template")),
    )


def _text_or_none(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise CheckpointError(f"tokenizer.chat_template is a {type(value).__name__}, not text")


def read_gguf(path: Path) -> tuple[Any, dict[str, Any]]:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError/struct.error on bad headers
        raise CheckpointError(
            f"{path}: cannot read GGUF file ({type(exc).__name__}: {exc}); it is truncated or corrupt"
        ) from exc
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    return reader, meta


GGUF_TYPE_SUFFIX = re.compile(r"[.-](?:[QI]Q?\d\w*|F16|F32|BF16)$", re.IGNORECASE)
GENERIC_STEMS = {"model", "ggml-model", "ggml-model-f16", "ggml-model-f32"}


def display_name(meta: dict[str, Any], path: Path) -> str:
    """A name a person recognises: the file's name without its llama.cpp type suffix
    ("SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"). `general.name` is often a
    training-run label ("Smollm2 135M 8k Lc100K Mix1 Ep2"); for a generic file name, the
    basename and size label stand in ("smollm2-135M")."""
    stem = GGUF_TYPE_SUFFIX.sub("", path.stem)
    if stem.lower() not in GENERIC_STEMS:
        return stem
    parts = [str(meta[k]) for k in ("general.basename", "general.size_label") if meta.get(k)]
    return "-".join(parts) or str(meta.get("general.name") or stem)


def gguf_spec(meta: dict[str, Any], path: Path) -> ModelSpec:
    with config_errors(path):
        dim = int(meta["llama.embedding_length"])
        heads = int(meta["llama.attention.head_count"])
        spec = ModelSpec(
            name=display_name(meta, path),
            dim=dim,
            n_layers=int(meta["llama.block_count"]),
            n_heads=heads,
            n_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
            hidden_dim=int(meta["llama.feed_forward_length"]),
            vocab_size=int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            max_context=int(meta.get("llama.context_length", 2048)),
            head_dim=int(meta.get("llama.rope.dimension_count", dim // heads)),
        )
    if meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise UnsupportedError(f"{path}: GGUF rope scaling is not supported yet")

    return spec


def load_gguf(path: Path) -> Checkpoint:
    import gguf

    reader, meta = read_gguf(path)
    try:
        tokenizer = build_tokenizer(meta, path)
    except Exception as exc:
        if isinstance(exc, (CheckpointError, UnsupportedError)):
            raise
        # the tokenizers library raises its own Exception subclasses on bad vocab/merges
        raise CheckpointError(f"{path}: the GGUF tokenizer metadata is malformed ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); re-convert the model with llama.cpp's convert script") from exc
    spec = gguf_spec(meta, path)

    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        ours = _our_name(t.name)
        if ours is None:
            continue
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise UnsupportedError(
                f"{path}: tensor {t.name} uses GGUF type {t.tensor_type.name}, which gguf-py cannot "
                "dequantize"
            ) from exc
        shape = [int(s) for s in reversed(t.shape.tolist())]
        if ours in state:
            raise CheckpointError(f"{path}: tensor {t.name} appears twice; the file is corrupt")
        try:
            tensor = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
        except ValueError as exc:
            raise CheckpointError(f"{path}: tensor {t.name} does not hold {shape} values ({exc}); the file "
                                  "is corrupt") from exc
        if ours.endswith("attention.wq.weight"):
            tensor = permute_meta_to_half(tensor, spec.n_heads)
        elif ours.endswith("attention.wk.weight"):
            tensor = permute_meta_to_half(tensor, spec.n_kv_heads)
        state[ours] = tensor
    spec = spec.replace(tied_embeddings="output.weight" not in state)
    spec = tokenizer.complete_spec(spec)
    return Checkpoint(spec, state, tokenizer, path, "gguf", [path])
