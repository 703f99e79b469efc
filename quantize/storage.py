"""How each format stores the same quantized weights, as bits per weight: the size model behind
`llamaship fit`'s per-format file sizes and the export's disk-space check.

Why per format: the codes are 4-bit everywhere, but the side data differs. XNNPACK keeps a bf16
scale per group; onnxruntime's MatMulNBits an fp32 scale per block, and a 4-bit zero point only
for an asymmetric scheme (the export drops the default ones); Core ML an fp16 scale and a 4-bit
offset per block; the HTP's LPBQ a 4-bit scale per block under an fp32 scale per channel. Fitted to and tested against
the full-size bench's measured artifacts (bench/results/fullsize.json, within 3%).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Storage:
    scale_bits: int  # per group of a 4-bit linear weight
    zero_bits: int = 0  # per group (0: symmetric)
    channel_bits: int = 0  # per output channel, on top of the groups' scales (LPBQ)
    head8_block: int | None = None  # 8-bit lm_head: None, a scale per channel; 0, per group; else per block
    head8_scale_bits: int = 32
    head8_zero_bits: int = 0
    emb_scale_bits: int = 32
    emb_zero_bits: int = 0
    measured: bool = True  # False: no full-size artifact of this format was measured yet (an estimate)
    zeros_when_symmetric: bool = True  # False: the zero points above are stored for asymmetric schemes only

    def _zeros(self, zero_bits: int, symmetric: bool) -> int:
        """`zero_bits` when this format stores zero points for the scheme, else 0."""
        return zero_bits if self.zeros_when_symmetric or not symmetric else 0

    def linear_bpw(self, bits: int, group: int, in_features: int, symmetric: bool = True) -> float:
        if bits == 0:
            return 32.0
        if bits == 8:
            block = in_features if self.head8_block is None else (self.head8_block or group)
            return 8 + (self.head8_scale_bits + self._zeros(self.head8_zero_bits, symmetric)) / block
        side = self.scale_bits + self._zeros(self.zero_bits, symmetric)
        return bits + side / group + self.channel_bits / in_features

    def embedding_bpw(self, bits: int, group: int, symmetric: bool = True) -> float:
        return 32.0 if bits == 0 else bits + (self.emb_scale_bits + self._zeros(self.emb_zero_bits, symmetric)) / group


XNNPACK = Storage(scale_bits=16)  # int4 groups with a bf16 scale; int8 lm_head with an fp32 scale per channel
MATMULNBITS = Storage(scale_bits=32, zero_bits=4, head8_block=0, head8_scale_bits=32, head8_zero_bits=8,
                      emb_scale_bits=32, emb_zero_bits=4, zeros_when_symmetric=False)
COREML = Storage(scale_bits=16, zero_bits=4, head8_scale_bits=16, head8_zero_bits=8, emb_scale_bits=16,
                 emb_zero_bits=4)
LPBQ = Storage(scale_bits=4, channel_bits=32, measured=False)
