"""How the quantize stage's time and memory grow with the model: each algorithm on 1- and 2-block
slices of the real Llama 3 8B shape (dim 4096, 32 / 8 heads, FFN 14336, vocab 128256, the real
tokenizer; random bf16 weights in the HF layout), extrapolated to the full 32 blocks.

time(L blocks) = fixed + L x per_block, with fixed (embedding, lm_head, calibration text) and
per_block solved from the 1- and 2-block runs. Each run is a child process whose anonymous
memory (RSS minus file-backed pages) is sampled every 0.5 s; the stage holds one block's fp32
weights and the calibration activations, so the peak should not grow with L.

    python bench/quant_scaling.py --algos rtn,gptq
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from fullsize import tree_anon_kb, write_hf  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "quant_scaling.json"
FULL_BLOCKS = 32


def child(model: str, algo: str, out: str, calib: int) -> None:
    from llamaship.export.llama.load import load_checkpoint
    from llamaship.quantize.scheme import QuantScheme
    from llamaship.quantize.stage import quantize_checkpoint

    ckpt = load_checkpoint(model)
    t = time.perf_counter()
    quantize_checkpoint(ckpt.spec, ckpt.state, ckpt.tokenizer, QuantScheme(algorithm=algo, calibration_tokens=calib),
                        Path(out), lambda s: None)
    print(json.dumps({"seconds": time.perf_counter() - t}))


def run(model: Path, algo: str, work: Path, calib: int) -> dict[str, float]:
    out = work / f"codes-{algo}"
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(model), algo, str(out), str(calib)],
                            stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_anon_kb(proc.pid))
        time.sleep(0.5)
    assert proc.stdout is not None and proc.returncode == 0, f"{algo} failed"
    seconds = json.loads(proc.stdout.read().strip().splitlines()[-1])["seconds"]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return {"seconds": round(seconds, 1), "peak_anon_gib": round(peak / 2**20, 2)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default="rtn,hqq,gptq,awq")
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamaship-quant-scaling"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models = {n: p if (p := args.work / f"l3-{n}").exists() else write_hf("llama3-8b", p, n) for n in (1, 2)}
    rows = []
    for algo in args.algos.split(","):
        one, two = run(models[1], algo, args.work, args.calibration_tokens), \
            run(models[2], algo, args.work, args.calibration_tokens)
        per_block = two["seconds"] - one["seconds"]
        fixed = one["seconds"] - per_block
        rows.append({"algorithm": algo, "calibration_tokens": args.calibration_tokens, "one_block": one,
                     "two_blocks": two, "per_block_s": round(per_block, 1), "fixed_s": round(fixed, 1),
                     "llama3_8b_minutes": round((fixed + FULL_BLOCKS * per_block) / 60, 1),
                     "peak_anon_gib": max(one["peak_anon_gib"], two["peak_anon_gib"])})
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": "llama3-8b shape, random bf16 weights, HF layout", "rows": rows},
                                   indent=1))
    print("| algorithm | 1 block | 2 blocks | per block | Llama 3 8B (32 blocks), extrapolated | peak anonymous |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['algorithm']} | {r['one_block']['seconds']:.0f} s | {r['two_blocks']['seconds']:.0f} s "
              f"| {r['per_block_s']:.0f} s | {r['llama3_8b_minutes']:.0f} min | {r['peak_anon_gib']:.1f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
