"""This machine's memory bandwidth (a STREAM-like copy) and the decode-speed roofline it implies
for a bundle: decode reads every weight once per token, so tok/s <= bandwidth / bytes per token.

    python bench/bandwidth.py [--bundle DIR] [--gib 1.0] [--threads 2]

Copy bandwidth counts bytes read + written (STREAM's convention). The roofline uses the bytes the
artifact itself stores (its file size: the weights, all read once per token); the KV cache read at
the bench's short context is ignored, so the ceiling is slightly optimistic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def copy_bandwidth_gbs(gib: float = 1.0, threads: int = 2, repeats: int = 7) -> float:
    """Best of `repeats` copies of a `gib` GiB float32 buffer, in GB/s (read + write)."""
    torch.set_num_threads(threads)
    n = int(gib * 2**30 / 4)
    src = torch.ones(n)
    dst = torch.empty(n)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="bundle folder: print each artifact's decode roofline and measured share")
    ap.add_argument("--gib", type=float, default=1.0, help="buffer size in GiB (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="threads for the copy (default 2)")
    args = ap.parse_args()
    bw = copy_bandwidth_gbs(args.gib, args.threads)
    print(f"copy bandwidth: {bw:.1f} GB/s ({args.threads} threads, {args.gib:g} GiB buffers)")
    if args.bundle:
        bundle = Path(args.bundle)
        report = json.loads((bundle / "report.json").read_text())
        for art in report["artifacts"]:
            ceiling = bw * 1e9 / art["size_bytes"]
            sp = art.get("speed")
            measured = sp["decode_tok_s"]["median"] if sp else None
            share = f", measured {measured:.1f} tok/s = {measured / ceiling:.0%} of it" if measured else ""
            print(f"  {art['path']}: {art['size_bytes'] / 1e6:.1f} MB/token -> ceiling {ceiling:.1f} tok/s{share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
