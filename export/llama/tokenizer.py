"""Tokenizers in the three forms Llama models ship, behind one small interface.

* "sentencepiece": Llama 2's tokenizer.model (protobuf), via sentencepiece;
* "tiktoken": Llama 3's tokenizer.model (base64 rank lines), via pytorch_tokenizers' Meta port;
* "hf": tokenizer.json (HF folders, and GGUF vocabularies converted by transformers).

Every kind can write the file ExecuTorch's C++ runner loads (`write_runner_file`); the tests check
that Python and the runner's own C++ tokenizers agree token for token, because validation figures
are only meaningful if the bundle tokenizes the way the phone will.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

from llamaship.errors import CheckpointError
from llamaship.export.llama.spec import ModelSpec

MAX_TOKENIZER_BYTES = 256 << 20  # Llama 3's tokenizer.json is 9 MB, its tiktoken file 2 MB

LLAMA2_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} "
    "[/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")


class Tokenizer:
    def __init__(
        self,
        kind: str,
        path: Path | None,
        impl: Any,
        *,
        bos: str | None,
        eos: str | None,
        stops: tuple[str, ...] = (),
        add_bos: bool = True,
        chat_template: str | None = None,
    ) -> None:
        self.kind, self.path, self._impl = kind, path, impl
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.bos_id = self.token_id(bos) if bos else None
        self.eos_id = self.token_id(eos) if eos else None
        stop_ids = [self.token_id(s) for s in (eos, *stops) if s]
        self.stop_ids = tuple(dict.fromkeys(i for i in stop_ids if i is not None))

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return int(self._impl.vocab_size())
        if self.kind == "tiktoken":
            return int(self._impl.n_words)
        return int(self._impl.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int | None:
        if self.kind == "sentencepiece":
            i = self._impl.piece_to_id(token)
            return None if i == self._impl.unk_id() and token != "<unk>" else int(i)
        if self.kind == "tiktoken":
            return self._impl.special_tokens.get(token)
        return self._impl.token_to_id(token)

    def encode(self, text: str, bos: bool | None = None, special: bool = False) -> list[int]:
        """`special=True` turns special-token text (chat markup) into its ids."""
        if self.kind == "sentencepiece":
            ids = list(self._impl.encode(text))
        elif self.kind == "tiktoken":
            ids = self._impl.encode(
                text, bos=False, eos=False, allowed_special="all" if special else set()
            )
        else:
            # tokenizers always matches added tokens in text, as the runner's HF tokenizer does
            ids = self._impl.encode(text, add_special_tokens=False).ids
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        if self.kind == "sentencepiece":
            return str(self._impl.decode(ids))
        if self.kind == "tiktoken":
            return str(self._impl.decode(ids))
        return str(self._impl.decode(ids, skip_special_tokens=False))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return render_chat(
            self.chat_template, messages, self.token_text(self.bos_id), self.token_text(self.eos_id)
        )

    def token_text(self, tid: int | None) -> str:
        if tid is None:
            return ""
        if self.kind == "sentencepiece":
            return str(self._impl.id_to_piece(tid))
        if self.kind == "tiktoken":
            return {v: k for k, v in self._impl.special_tokens.items()}.get(tid, "")
        return str(self._impl.id_to_token(tid))

    def runner_file_name(self) -> str:
        return "tokenizer.json" if self.kind == "hf" else "tokenizer.model"

    def write_runner_file(self, folder: Path) -> Path:
        """Write the file ExecuTorch's runner (and the Android app) loads; returns its path."""
        dest = folder / self.runner_file_name()
        if self.kind == "hf":
            self._impl.save(str(dest))
        else:
            assert self.path is not None
            shutil.copyfile(self.path, dest)
        return dest

    def complete_spec(self, spec: ModelSpec, eos_override: int | list[int] | None = None) -> ModelSpec:
        """Fill BOS/EOS/stop ids and the chat template from the tokenizer (and the checkpoint's
        generation_config eos list, which is how Llama 3 Instruct names <|eot_id|>)."""
        stops = list(self.stop_ids)
        if isinstance(eos_override, int):
            stops.append(eos_override)
        elif isinstance(eos_override, list):
            stops.extend(int(i) for i in eos_override)
        return spec.replace(
            bos_id=self.bos_id,
            add_bos=self.add_bos,
            eos_id=self.eos_id,
            stop_ids=tuple(dict.fromkeys(stops)),
            chat_template=self.chat_template,
        )


def render_chat(
    template: str | None, messages: list[dict[str, str]], bos_token: str, eos_token: str
) -> str:
    """Render a Jinja chat template the way transformers does, ending with the assistant's turn.

    The template is data from a checkpoint or a bundle, so it runs in Jinja's immutable sandbox
    (no attribute walks to `os`, no mutation), within a size and time budget (see llamaship.chat)."""
    from llamaship.chat import render_sandboxed

    if not template:
        raise CheckpointError("this model has no chat template; use a plain prompt")
    return render_sandboxed(template, messages=messages, add_generation_prompt=True,
                            bos_token=bos_token, eos_token=eos_token)


def is_tiktoken_file(path: Path) -> bool:
    """Llama 3's tokenizer.model is text: `<base64 bytes> <rank>` per line."""
    from llamaship.safe_io import regular_file

    regular_file(path, CheckpointError, "tokenizer file", MAX_TOKENIZER_BYTES)
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        first = head.split(b"\n", 1)[0].decode("ascii")
        token, rank = first.split(" ")
        base64.b64decode(token, validate=True)
        return rank.isdigit()
    except (UnicodeDecodeError, ValueError):
        return False


def load_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"{path}: not a SentencePiece or tiktoken tokenizer ({exc})") from exc
    bos = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
    eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
    return Tokenizer("sentencepiece", path, sp, bos=bos, eos=eos, chat_template=LLAMA2_CHAT_TEMPLATE)


def load_tiktoken(path: Path) -> Tokenizer:
    from pytorch_tokenizers import TiktokenTokenizer

    try:
        tt = TiktokenTokenizer(model_path=str(path))
    except Exception as exc:  # tiktoken raises ValueError/binascii errors on bad lines
        raise CheckpointError(f"{path}: cannot read tiktoken ranks ({exc})") from exc
    return Tokenizer(
        "tiktoken",
        path,
        tt,
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        stops=LLAMA3_STOP_TOKENS,
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )


def load_tokenizer_model(path: Path) -> Tokenizer:
    return load_tiktoken(path) if is_tiktoken_file(path) else load_sentencepiece(path)


def load_tokenizer_json(path: Path, config: dict[str, Any]) -> Tokenizer:
    from tokenizers import Tokenizer as HFTok

    from llamaship.safe_io import regular_file

    regular_file(path, CheckpointError, "tokenizer file", MAX_TOKENIZER_BYTES)

    try:
        tok = HFTok.from_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read tokenizer.json ({exc})") from exc
    return from_hf_tokenizer(tok, path, config)


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # older tokenizer_config: {"content": "<s>", ...}
        return value.get("content")
    return value


def from_hf_tokenizer(tok: Any, path: Path | None, config: dict[str, Any]) -> Tokenizer:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{path}: chat_template is a {type(template).__name__}, not text")
    bos = _token_str(config.get("bos_token"))
    eos = _token_str(config.get("eos_token"))
    add_bos = bool(config.get("add_bos_token", bos is not None and _post_processor_adds(tok, bos)))
    stops = tuple(t for t in LLAMA3_STOP_TOKENS if tok.token_to_id(t) is not None)
    return Tokenizer("hf", path, tok, bos=bos, eos=eos, stops=stops, add_bos=add_bos, chat_template=template)


def _post_processor_adds(tok: Any, bos: str) -> bool:
    """Llama 3's tokenizer.json adds BOS through its TemplateProcessing post-processor."""
    processor = json.loads(tok.to_str()).get("post_processor") or {}
    return bos in json.dumps(processor)


def load_tokenizer(folder: Path) -> Tokenizer:
    """Prefer tokenizer.model (what Meta ships, and what the runner reads natively), then
    tokenizer.json."""
    config_path = folder / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_path.exists():
        from llamaship.safe_io import read_json_object

        config = read_json_object(config_path, CheckpointError, "tokenizer_config.json")
        template = config.get("chat_template")
        if template is not None and not isinstance(template, (str, list)):
            raise CheckpointError(f"{config_path}: chat_template is a {type(template).__name__}, not text")
    model_file, json_file = folder / "tokenizer.model", folder / "tokenizer.json"
    if model_file.exists():
        tok = load_tokenizer_model(model_file)
        if config.get("chat_template"):
            tok.chat_template = config["chat_template"]
        return tok
    if json_file.exists():
        return load_tokenizer_json(json_file, config)
    raise CheckpointError(
        f"{folder}: no tokenizer found (expected tokenizer.model or tokenizer.json); copy the "
        "tokenizer that came with these weights into the folder"
    )
