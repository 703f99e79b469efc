"""Run an ONNX bundle on this host: plain onnxruntime for logits, onnxruntime-genai for text.

`OnnxModule.forward` feeds the graph exactly as onnxruntime-genai does for one sequence (input_ids,
an all-ones attention_mask over past + new tokens, the past key/values), so accuracy is measured on
the shipped graph and its KV path, not on a PyTorch stand-in. `generate` and the speed child use
onnxruntime-genai's Generator: the same loop an app built on onnxruntime-genai runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaship.errors import RuntimeFailure, UnsupportedError


def _decoder_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise RuntimeFailure(f"{folder / 'genai_config.json'}: missing or malformed ({exc})") from exc


class OnnxModule:
    """`forward(tokens, start_pos) -> logits [1, vocab]` of the last position, KV cache as state."""

    def __init__(self, folder: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        dec = _decoder_config(folder)
        self._names = dec["inputs"], dec["outputs"]
        self._layers = int(dec["num_hidden_layers"])
        self._kv_shape = (1, int(dec["num_key_value_heads"]), 0, int(dec["head_size"]))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(folder / dec["filename"]), so,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise RuntimeFailure(f"{folder / dec['filename']}: onnxruntime could not load it ({exc})") from exc
        kv_type = self._session.get_inputs()[2].type  # float, float16, or int8 for a quantized KV cache
        self._dtype = {"tensor(float16)": np.float16, "tensor(int8)": np.int8}.get(kv_type, np.float32)
        self.reset()

    def reset(self) -> None:
        self._past = [np.zeros(self._kv_shape, self._dtype) for _ in range(2 * self._layers)]
        self._pos = 0

    def feeds(self, tokens: list[int], start_pos: int) -> dict[str, np.ndarray]:
        """The graph's inputs for `tokens` at `start_pos` with the cache as it stands (what an app
        built on onnxruntime-genai feeds; `profile --hub` sends the same to a phone)."""
        if start_pos == 0 and self._pos:
            self.reset()
        if start_pos != self._pos:
            raise RuntimeFailure(f"ONNX KV cache is at position {self._pos}, asked for {start_pos}")
        ins = self._names[0]
        feed: dict[str, np.ndarray] = {
            ins["input_ids"]: np.asarray([tokens], dtype=np.int64),
            ins["attention_mask"]: np.ones((1, start_pos + len(tokens)), dtype=np.int64),
        }
        for i in range(self._layers):
            feed[ins["past_key_names"] % i] = self._past[2 * i]
            feed[ins["past_value_names"] % i] = self._past[2 * i + 1]
        return feed

    def forward(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        feed = self.feeds(tokens, start_pos)
        outs = self._names[1]
        out_names = [outs["logits"]]
        for i in range(self._layers):
            out_names += [outs["present_key_names"] % i, outs["present_value_names"] % i]
        logits, *present = self._session.run(out_names, feed)
        self._past = present
        self._pos += len(tokens)
        return torch.from_numpy(np.ascontiguousarray(logits[0, -1:], dtype=np.float32))


def load_genai(folder: Path) -> Any:
    import onnxruntime_genai as og

    try:
        return og.Model(str(folder))
    except Exception as exc:
        raise RuntimeFailure(f"{folder}: onnxruntime-genai could not load the model ({exc})") from exc


def generate_ids(
    model: Any, prompt_ids: list[int], max_new_tokens: int, on_token: Callable[[int], None] | None = None,
    min_length: int = 0,
) -> tuple[list[int], dict[str, float]]:
    """Greedy generation with onnxruntime-genai's Generator, stopping where genai_config's eos ids
    say; returns the new ids (stop token included) and timing stats."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new_tokens,
                              min_length=min_length)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    try:
        gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        new: list[int] = []
        first = t0
        while not gen.is_done() and len(new) < max_new_tokens:
            gen.generate_next_token()
            tid = int(gen.get_next_tokens()[0])
            if not new:
                first = time.perf_counter()
            new.append(tid)
            if on_token:
                on_token(tid)
    except Exception as exc:
        raise RuntimeFailure(f"onnxruntime-genai generation failed ({exc})") from exc
    end = time.perf_counter()
    decoded = max(len(new) - 1, 0)  # the first new token comes out of the prefill
    return new, {
        "prompt_tokens": len(prompt_ids), "generated_tokens": len(new),
        "ttft_ms": (first - t0) * 1000,
        "prefill_tok_s": len(prompt_ids) / max(first - t0, 1e-9) if new else 0.0,
        "decode_tok_s": decoded / max(end - first, 1e-9) if decoded else 0.0,
    }


def generate_text(
    folder: Path, prompt: str, max_new_tokens: int, on_text: Callable[[str], None] | None = None,
    bos_id: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """Tokenize with onnxruntime-genai's own tokenizer (the one an app links), generate, detokenize
    as a stream. Its encode() adds no BOS: pass `bos_id` for models that want one (Llama 2/3), as
    the ExecuTorch runner's num_bos does. Stats use the runner's key names so reports read the same."""
    import onnxruntime_genai as og

    t = time.perf_counter()
    model = load_genai(folder)
    load_ms = (time.perf_counter() - t) * 1000
    tokenizer = og.Tokenizer(model)
    stream = tokenizer.create_stream()
    config = json.loads((folder / "genai_config.json").read_text())["model"]
    eos = config.get("eos_token_id")
    stops = {eos} if isinstance(eos, int) else set(eos or [])
    pieces: list[str] = []

    def emit(tid: int) -> None:
        if tid in stops:
            return
        piece = stream.decode(tid)
        pieces.append(piece)
        if on_text and piece:
            on_text(piece)

    prompt_ids = [int(i) for i in tokenizer.encode(prompt)]
    if bos_id is not None and prompt_ids[:1] != [bos_id]:
        prompt_ids.insert(0, bos_id)
    context = int(config.get("context_length") or 0)
    if context and len(prompt_ids) >= context:
        raise UnsupportedError(f"the prompt is {len(prompt_ids)} tokens but {folder}'s context is {context}: "
                               "shorten it, or export with a larger --max-context")
    if context:
        max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
    _, st = generate_ids(model, prompt_ids, max_new_tokens, emit)
    return "".join(pieces), {
        "prompt_tokens": st["prompt_tokens"], "generated_tokens": st["generated_tokens"],
        "prefill_token_per_sec": st["prefill_tok_s"], "decode_token_per_sec": st["decode_tok_s"],
        "ttft_ms": st["ttft_ms"], "model_load_ms": load_ms,
    }
