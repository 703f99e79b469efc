"""How the NPU graph is cut into parts, and each part's inputs and outputs.

Why parts: the Hexagon HTP addresses a context's weights in a 32-bit space, so a 7B/8B model does
not fit one context binary; Qualcomm AI Hub ships Llama 2 7B and Llama 3 8B in several parts
(qualcomm/ai-hub-models issue 100, a Llama 2 7B in 8 binaries: "the address space limitation of
the Hexagon"). Qualcomm does not publish the limit as a number; the default here (1.5 GiB of
weights per binary) gives Llama 3 8B 4 parts of 1.1-1.3 GiB and Llama 2 7B 3, and a profile can
set its own. A part holds a
contiguous range of layers; the first also holds the embedding, the last the final norm and
lm_head, and each holds its own copy of the small RoPE tables. The app passes the hidden state from
one part to the next and owns every layer's KV cache.

Sizes here are what each unit's weights take in the context binary (LPBQ int4 codes + 4-bit block
scales + an fp32 scale per channel, the 16-bit embedding table, the int8 lm_head), the figure the
limit is compared against.
"""

from __future__ import annotations

import math

from llamaship.errors import UnsupportedError
from llamaship.export.llama.spec import ModelSpec
from llamaship.export.qnn_units import hidden, new, past
from llamaship.quantize.scheme import QuantScheme

HTP_CONTEXT_LIMIT_GB = 1.5  # weights per context binary; a profile's `htp_context_limit_gb` overrides it


def unit_bytes(spec: ModelSpec, scheme: QuantScheme, ctx: int) -> dict[str, int]:
    """Weight bytes of the embedding, one block, the head and the RoPE tables in a context binary."""
    d, f, hd, b = spec.dim, spec.hidden_dim, spec.head_dim, scheme.group_size
    q, kv = spec.n_heads * hd, spec.n_kv_heads * hd
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # (K, N) of wq wk wv wo w1 w3 w2
    lpbq = lambda k, n: k * n // 2 + (k // b) * n // 2 + 4 * n  # noqa: E731
    block = sum(lpbq(k, n) for k, n in shapes) + 2 * 2 * d  # + the two norms' 16-bit weights
    head = (spec.vocab_size * d + 4 * spec.vocab_size if scheme.lm_head_bits == 8
            else lpbq(d, spec.vocab_size)) + 2 * d
    return {"embed": 2 * spec.vocab_size * d, "block": block, "head": head, "rope": 2 * 2 * ctx * hd}


def part_bytes(spec: ModelSpec, scheme: QuantScheme, ctx: int, first: int, last: int) -> int:
    u = unit_bytes(spec, scheme, ctx)
    return (u["rope"] + u["block"] * (last - first) + u["embed"] * (first == 0)
            + u["head"] * (last == spec.n_layers))


def _greedy(spec: ModelSpec, scheme: QuantScheme, ctx: int, cap: int) -> list[tuple[int, int]] | None:
    """Parts filled layer by layer up to `cap` bytes; None when one layer does not fit."""
    bounds, first = [], 0
    while first < spec.n_layers:
        last = first
        while last < spec.n_layers and part_bytes(spec, scheme, ctx, first, last + 1) <= cap:
            last += 1
        if last == first:
            return None
        bounds.append((first, last))
        first = last
    return bounds


def plan_parts(spec: ModelSpec, scheme: QuantScheme, ctx: int, limit_bytes: int) -> list[tuple[int, int]]:
    """The fewest parts whose every context fits `limit_bytes` (filling greedily is optimal for
    contiguous ranges under a cap), then the split of that many parts whose largest is smallest
    (a bisection on the cap), so no part sits at the limit when it need not."""
    fewest = _greedy(spec, scheme, ctx, limit_bytes)
    if fewest is None:
        one = max(part_bytes(spec, scheme, ctx, 0, 1), part_bytes(spec, scheme, ctx, spec.n_layers - 1, spec.n_layers))
        raise UnsupportedError(f"{spec.name}: even one layer per part needs {one / 2**30:.2f} GiB in a context "
                               f"binary, above the HTP limit of {limit_bytes / 2**30:.2f} GiB "
                               "(htp_context_limit_gb in the profile)")
    low, high = 0, limit_bytes  # the smallest cap that still gives len(fewest) parts
    while high - low > 1 << 16:
        mid = (low + high) // 2
        plan = _greedy(spec, scheme, ctx, mid)
        low, high = (low, mid) if plan is not None and len(plan) <= len(fewest) else (mid, high)
    return _greedy(spec, scheme, ctx, high) or fewest


def part_io(first: int, last: int, n_layers: int) -> tuple[list[str], list[str]]:
    """(graph inputs, graph outputs) of the part holding layers [first, last)."""
    inputs = ["input_ids" if first == 0 else hidden(first), "position_ids", "attention_mask"]
    inputs += [name for i in range(first, last) for name in past(i)]
    outputs = ["logits" if last == n_layers else hidden(last)]
    return inputs, outputs + [name for i in range(first, last) for name in new(i)]


def io_shapes(spec: ModelSpec, first: int, last: int, ar: int, ctx: int) -> dict[str, list[int]]:
    """Static shape of every input and output of a part's graph taking `ar` tokens per call."""
    shapes = {"input_ids": [1, ar], "position_ids": [1, ar], "attention_mask": [1, 1, ar, ctx],
              "logits": [1, ar, spec.vocab_size], hidden(first): [1, ar, spec.dim], hidden(last): [1, ar, spec.dim]}
    for i in range(first, last):
        for name in past(i):
            shapes[name] = [spec.n_kv_heads, ctx - ar, spec.head_dim]
        for name in new(i):
            shapes[name] = [spec.n_kv_heads, ar, spec.head_dim]
    return shapes


def limit_bytes(limit_gb: float | None) -> int:
    return math.floor((HTP_CONTEXT_LIMIT_GB if limit_gb is None else limit_gb) * 2**30)
