"""The fixed token script every runtime test feeds an artifact and its PyTorch module: a prefill,
then single-token decode steps, so the KV cache path is exercised the same way everywhere."""

from __future__ import annotations

import torch

PROMPT = [5, 17, 42, 99, 7, 250, 31]
DECODE = [12, 64, 3]


def run_steps(step) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """Prefill PROMPT, then feed DECODE one token at a time: exercises the KV cache state."""
    outs = [step(PROMPT, 0)]
    for i, tok in enumerate(DECODE):
        outs.append(step([tok], len(PROMPT) + i))
    return outs


def eager_steps(model) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    def step(tokens, pos):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return model(torch.tensor([tokens]), torch.tensor([pos]))

    return run_steps(step)
