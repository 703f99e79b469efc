"""Where the first command's time goes: the .pte export of the embedded SmolLM2-135M, stage by
stage, with ExecuTorch's stock lowering and with ours, side by side in one run, and the two
programs compared byte for byte.

    python bench/export_stages.py [--layers N] [--model PATH] [--out bench/results/export_stages.json]

"stock" is `to_edge_transform_and_lower` with a plain `XnnpackPartitioner` (two whole-program
decompositions, all 17 XNNPACK passes on every partition); "llamaship" is what `llamaship export`
runs (one decomposition, the passes that can apply). Both lower the same graph, so the programs
must be identical. Read the ratio: this 2-core machine is shared and its absolute times drift.
With `--layers N` only the first N blocks are exported (quick look; the full model by default).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import llamaship.export.executorch as executorch_export
from llamaship.export.llama.load import load_checkpoint
from llamaship.pipeline import default_model
from llamaship.quantize.scheme import QuantScheme
from llamaship.quiet import quiet_library_warnings


def stock_partitioner() -> Any:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    part = XnnpackPartitioner()
    part.kept_whole = set()
    return part


def export(ckpt: Any, n_layers: int, out: Path, stock: bool) -> dict[str, float]:
    spec = ckpt.spec.replace(n_layers=n_layers)
    state = {k: v for k, v in ckpt.state.items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers}
    saved = executorch_export.one_decomposition_partitioner, executorch_export.xnnpack_passes_that_apply
    if stock:
        executorch_export.one_decomposition_partitioner = stock_partitioner
        executorch_export.xnnpack_passes_that_apply = contextlib.nullcontext
    try:
        return executorch_export.export_pte(spec, state, QuantScheme(), out, max_context=2048, max_seq_len=128,
                                            progress=lambda s: print(f"  {s}", file=sys.stderr))
    finally:
        executorch_export.one_decomposition_partitioner, executorch_export.xnnpack_passes_that_apply = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded SmolLM2-135M GGUF)")
    ap.add_argument("--layers", type=int, default=None, help="export only the first N blocks (default: all)")
    ap.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    quiet_library_warnings()
    ckpt = load_checkpoint(args.model or default_model(), progress=lambda s: None)
    n = args.layers or ckpt.spec.n_layers
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, stock in (("stock", True), ("llamaship", False)):
            print(f"{name}: exporting {ckpt.spec.name}, {n} blocks, 8da4w-g32", file=sys.stderr)
            rows[name] = export(ckpt, n, Path(tmp) / f"{name}.pte", stock)
        same = (Path(tmp) / "stock.pte").read_bytes() == (Path(tmp) / "llamaship.pte").read_bytes()
    stages = list(rows["stock"])
    print(f"\n{ckpt.spec.name}, {n} blocks, .pte export stages (s)")
    print("| stage | stock | llamaship | ratio |\n| --- | --- | --- | --- |")
    for stage in [*stages, "total"]:
        a = sum(rows["stock"].values()) if stage == "total" else rows["stock"][stage]
        b = sum(rows["llamaship"].values()) if stage == "total" else rows["llamaship"][stage]
        print(f"| {stage.removesuffix('_s')} | {a:.1f} | {b:.1f} | x{a / b:.2f} |")
    print(f"programs byte-identical: {same}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": ckpt.spec.name, "blocks": n, "stages_s": rows,
                                              "byte_identical": same}, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
