"""Drives a bundle's NPU parts the way an app does (qnn_config.json is the contract): the prompt in
chunks through every part's prefill graph, each generated token through the decode graphs, the
hidden state handed from part to part, and one KV cache per layer kept outside the graphs.

`run(part, graph, feeds)` is the session of that part's graph (the HTP simulator in validation;
onnxruntime's CPU EP on the source graphs in tests and probes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from llamaship.export.qnn_graph import attention_mask

Run = Callable[[int, str, dict[str, np.ndarray]], dict[str, np.ndarray]]


class PartsRunner:
    def __init__(self, run: Run, config: dict[str, Any], decode: bool = True) -> None:
        """`decode` False sends single tokens through the prefill graph too (a bundle built before
        the decode graph existed, or a comparison)."""
        self.run, self.cfg, self.use_decode = run, config, decode
        self.ctx = int(config["context"])
        self.tokens_per_call = {g: int(v["tokens_per_call"]) for g, v in config["graphs"].items()}
        shape = (config["n_kv_heads"], self.ctx - 1, config["head_dim"])  # the decode graph's past slots
        self.keys = [np.zeros(shape, np.float32) for _ in range(config["n_layers"])]
        self.values = [np.zeros(shape, np.float32) for _ in range(config["n_layers"])]
        self.n_past = 0
        self.calls = {g: 0 for g in self.tokens_per_call}

    def reset(self) -> None:
        for c in (*self.keys, *self.values):
            c[:] = 0
        self.n_past = 0

    def feeds(self, part: dict[str, Any], graph: str, chunk: list[int],
              h: np.ndarray | None) -> dict[str, np.ndarray]:
        """The inputs of one call of `part`'s `graph` for `chunk` at the current cache position."""
        ar, p = self.tokens_per_call[graph], self.n_past
        slots = self.ctx - ar
        feeds: dict[str, np.ndarray] = {"position_ids": (np.arange(ar, dtype=np.int32) + p)[None],
                                        "attention_mask": attention_mask(ar, self.ctx, p)}
        first, last = part["layers"]
        if first == 0:
            ids = np.zeros((1, ar), np.int32)
            ids[0, : len(chunk)] = chunk
            feeds["input_ids"] = ids
        else:
            assert h is not None
            feeds[f"hidden_{first}"] = h
        for i in range(first, last):
            feeds[f"past_keys_{i}"] = np.ascontiguousarray(self.keys[i][:, :slots])
            feeds[f"past_values_{i}"] = np.ascontiguousarray(self.values[i][:, :slots])
        return feeds

    def call(self, graph: str, chunk: list[int]) -> np.ndarray:
        """One call of every part's `graph`: the chunk's logits [n, vocab]; the cache moves on."""
        ar, p, n = self.tokens_per_call[graph], self.n_past, len(chunk)
        if p > self.ctx - ar:
            raise ValueError(f"context full: {p} tokens cached, the {graph} graph has {self.ctx - ar} past slots "
                             f"(context {self.ctx} - {ar} tokens per call)")
        h = None
        for part in self.cfg["parts"]:
            out = self.run(part["index"], graph, self.feeds(part, graph, chunk, h))
            first, last = part["layers"]
            for i in range(first, last):
                if p + n <= self.ctx - 1:
                    self.keys[i][:, p : p + n] = out[f"new_keys_{i}"][:, :n]
                    self.values[i][:, p : p + n] = out[f"new_values_{i}"][:, :n]
            h = out.get(f"hidden_{last}")
        self.n_past += n
        self.calls[graph] += 1
        return out["logits"][0, :n]

    def forward(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Logits [len(tokens), vocab] of every token: one token after the prompt goes through the
        decode graphs, anything else through the prefill graphs in chunks."""
        if start_pos == 0:
            self.reset()
        if start_pos != self.n_past:
            raise ValueError(f"start_pos {start_pos} but the cache holds {self.n_past} tokens")
        if len(tokens) == 1 and start_pos > 0 and self.use_decode and "decode" in self.tokens_per_call:
            return torch.from_numpy(np.ascontiguousarray(self.call("decode", tokens)))
        ar = self.tokens_per_call["prefill"]
        rows = [self.call("prefill", tokens[c : c + ar]) for c in range(0, len(tokens), ar)]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(rows)))
