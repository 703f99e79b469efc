"""An ONNX export whose weights exceed protobuf's 2 GB limit: a random-weight Llama of ~0.7B
parameters in fp32 (2.8 GB), exported through the same path as any checkpoint, loaded back by
onnxruntime, and checked against the PyTorch module's logits.

    python bench/onnx_over_2gb.py [--layers 12] [--keep DIR]

Random weights are enough here: what is exercised is external data handling (one model.onnx.data
file beside a small model.onnx), not accuracy. Takes a few minutes and ~10 GB of RAM on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from llamaship.export.llama.model import build_model
from llamaship.export.llama.spec import ModelSpec
from llamaship.export.llama.tokenizer import load_tokenizer_model
from llamaship.export.onnx import export_onnx
from llamaship.targets.onnx_runtime import OnnxModule
from llamaship.targets.speed import peak_rss_mb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12, help="transformer layers (default 12: 2.8 GB fp32)")
    ap.add_argument("--keep", default=None, help="write the ONNX folder here instead of a temp folder")
    args = ap.parse_args()

    tokenizer = load_tokenizer_model(Path(__file__).resolve().parents[1] / "tests" / "data" / "llama2-tokenizer.model")
    spec = ModelSpec(name="random-0.7b", dim=2048, n_layers=args.layers, n_heads=32, n_kv_heads=4,
                     hidden_dim=5632, vocab_size=32000, max_context=256)
    spec = tokenizer.complete_spec(spec)
    torch.manual_seed(0)
    state = {name: (torch.randn(shape) * 0.02 if len(shape) == 2 else torch.ones(shape))
             for name, shape in spec.expected_shapes().items()}
    params = sum(t.numel() for t in state.values())
    print(f"{spec.name}: {params / 1e9:.2f}B params, {params * 4 / 2**30:.2f} GiB fp32", flush=True)
    with tempfile.TemporaryDirectory(prefix="onnx-2gb-") as work:
        out = Path(args.keep) if args.keep else Path(work) / "onnx"
        t = time.perf_counter()
        export_onnx(spec, state, tokenizer, None, out, max_context=256, progress=print)
        secs = time.perf_counter() - t
        data = out / "model.onnx.data"
        size = data.stat().st_size
        print(f"export {secs:.0f} s; model.onnx {(out / 'model.onnx').stat().st_size / 1e6:.1f} MB, "
              f"model.onnx.data {size / 2**30:.2f} GiB (> 2 GiB: {size > 2**31})")
        ids = [1, 450, 1576, 310, 3444, 338]
        got = OnnxModule(out).forward(ids, 0)
        model = build_model(spec, state, max_context=256)
        with torch.no_grad():
            ref = model(torch.tensor([ids]), torch.tensor([0]))
        diff = (got - ref).abs().max().item()
        print(f"onnxruntime vs PyTorch max |dlogit| {diff:.2e}; peak RSS of this process {peak_rss_mb():.0f} MB")
        return 0 if size > 2**31 and diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
