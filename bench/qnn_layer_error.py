"""Why the NPU graph is quantized the way it is: the per-layer error table behind export/qnn.py.

Part 1 (per tensor, per layer): every activation of the static SmolLM2 graph, quantized to 16 bits
with the range calibration gives it (min/max over WikiText-2 validation chunks, first tokens
included), on a later chunk of text: its signal-to-quantization-noise ratio. Run for the module's
plain RMSNorm and for the prescaled one the export uses. A tensor below ~30 dB loses information.

Part 2 (end to end, onnxruntime CPU EP running the QDQ graphs): KLD / top-1 / PPL against the fp32
module on a short WikiText-2 test slice, one change at a time: naive (plain norm, uint8 per-tensor
weights), the norm fix with int8 weights, int4 per-channel, int4 LPBQ (shipped), lm_head int4.
The CPU EP emulates the quantization (float maths between Q/DQ pairs); the shipped row is also run
on the QNN HTP simulator.

    python bench/qnn_layer_error.py [--context 512] [--htp]

Results: bench/results/qnn_layer_error.json, and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from llamaship.data import CALIB_FILE, data_file
from llamaship.export.llama.load import load_checkpoint
from llamaship.export.llama.model import build_model
from llamaship.export.qnn import AR, calibration_feeds
from llamaship.export.qnn_graph import StaticCacheRunner, StaticLlama, export_float_onnx
from llamaship.export.qnn_quant import quantize_w4a16
from llamaship.pipeline import default_model
from llamaship.quantize.scheme import QuantScheme
from llamaship.targets import accuracy

RESULTS = Path(__file__).parent / "results" / "qnn_layer_error.json"
CATEGORY = [  # node-name pattern -> what the tensor is
    (r"/Pow(_3)?$", "norm: x^2 (or (x/m)^2)"), (r"/ReduceMean(_1)?$", "norm: mean of squares"),
    (r"/Add_(4|6)$|^/blocks\.\d+/Add(_3)?$", "residual stream / norm input"),
    (r"feed_forward/Mul_1$", "FFN: silu(w1 x) * w3 x"), (r"feed_forward/w2/MatMul$", "FFN: w2 output"),
    (r"feed_forward/w[13]/MatMul$", "FFN: w1/w3 output"), (r"/Softmax$", "attention: softmax"),
    (r"/w[qkv]/MatMul$", "attention: q/k/v projection"), (r"/wo/MatMul$", "attention: output projection"),
]


def intermediate_outputs(model_path: Path, out_path: Path) -> None:
    """A copy of the float graph that outputs every float intermediate tensor."""
    model = onnx.load(str(model_path))
    model = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    for node in model.graph.node:
        for name in node.output:
            if name in floats and node.op_type not in ("Constant", "Shape"):
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(out_path), save_as_external_data=True, location=out_path.name + ".data")


def sqnr_table(float_model: Path, feeds: list[dict[str, np.ndarray]], probe: dict[str, np.ndarray],
               work: Path) -> dict[str, list[tuple[int, float, float, float]]]:
    """{category: [(layer, SQNR dB on `probe`, calibrated min, max)]} for 16-bit per-tensor ranges."""
    aug = work / "aug.onnx"
    intermediate_outputs(float_model, aug)
    sess = ort.InferenceSession(str(aug), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    lo = dict.fromkeys(names, 0.0)
    hi = dict.fromkeys(names, 0.0)
    for feed in feeds:
        for n, x in zip(names, sess.run(None, feed), strict=True):
            lo[n], hi[n] = min(lo[n], float(x.min())), max(hi[n], float(x.max()))
    table: dict[str, list[tuple[int, float, float, float]]] = defaultdict(list)
    for n, x in zip(names, sess.run(None, probe), strict=True):
        m = re.match(r"/blocks\.(\d+)(/.*)_output_0$", n)
        if not m:
            continue
        cat = next((c for pat, c in CATEGORY if re.search(pat, m.group(2))), None)
        if cat is None:
            continue
        lo_n, hi_n = min(lo[n], float(x.min())), max(hi[n], float(x.max()))
        step = (hi_n - lo_n) / 65535 or 1e-30
        q = np.round((x.astype(np.float64) - lo_n) / step) * step + lo_n
        noise = float(((x - q) ** 2).sum())
        table[cat].append((int(m.group(1)), 10 * np.log10(float((x.astype(np.float64) ** 2).sum()) / max(noise, 1e-30)),
                           lo_n, hi_n))
    return table


def print_tables(results: dict) -> None:
    """Markdown: worst 16-bit SQNR per layer (which tensor), plain vs prescaled norm; then the
    end-to-end rows."""
    plain, pre = results["sqnr"].get("plain", {}), results["sqnr"].get("prescaled", {})

    def worst(table: dict, layer: int) -> tuple[float, str]:
        return min(((r[1], cat) for cat, rows in table.items() for r in rows if r[0] == layer), default=(0, "-"))

    layers = sorted({r[0] for rows in plain.values() for r in rows})
    print("| layer | worst 16-bit SQNR, plain RMSNorm | worst, prescaled RMSNorm (shipped) |")
    print("| --- | --- | --- |")
    for layer in layers:
        (a, ca), (b, cb) = worst(plain, layer), worst(pre, layer)
        print(f"| {layer} | {a:.1f} dB ({ca}) | {b:.1f} dB ({cb}) |")
    print("\n| variant | runtime | KLD | top-1 | PPL (fp32 " + f"{results['rows'][0]['ref_ppl']:.2f}" + ") |")
    print("| --- | --- | --- | --- | --- |")
    for r in results["rows"]:
        print(f"| {r['variant']} | {r['runtime']} | {r['kld']:.4f} | {r['top1']:.3f} | {r['ppl']:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=512, help="graph context (default 512)")
    ap.add_argument("--eval-tokens", type=int, default=512, help="test-slice tokens, windows of 256 (default 512)")
    ap.add_argument("--htp", action="store_true", help="also compile the shipped row and run it on the HTP simulator")
    ap.add_argument("--table", action="store_true", help="only print the Markdown tables of the last results")
    args = ap.parse_args()
    if args.table:
        print_tables(json.loads(RESULTS.read_text()))
        return 0
    torch.set_num_threads(2)
    ckpt = load_checkpoint(default_model())
    spec, ctx = ckpt.spec, args.context
    scheme = QuantScheme()
    eval_slice = accuracy.make_slice(ckpt.tokenizer, args.eval_tokens, 2 * AR)
    ref_model = build_model(spec, ckpt.state, max_context=ctx, impl="torch", full_logits=True)
    reference = accuracy.reference_logprobs(ref_model, eval_slice, ckpt.sha256(), print)
    results: dict = {"model": spec.name, "context": ctx, "slice": eval_slice.describe(), "sqnr": {}, "rows": []}

    def score(model_path: Path, name: str, providers: str = "cpu") -> dict:
        if providers == "htp":
            from llamaship.targets.qnn_runtime import htp_session

            sess = htp_session(model_path, "SM8650")
        else:
            sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        runner = StaticCacheRunner(lambda f: sess.run(None, f), AR, ctx, spec.n_layers, spec.n_kv_heads, spec.head_dim)
        t = time.perf_counter()
        acc = accuracy.evaluate_chunked(runner.forward, eval_slice, reference, lambda s: None)
        row = {"variant": name, "runtime": providers, "kld": acc.mean_kld, "top1": acc.top1_agreement,
               "ppl": acc.ppl, "ref_ppl": acc.ref_ppl, "seconds": round(time.perf_counter() - t, 1)}
        print(f"{name:60s} [{providers}] KLD {acc.mean_kld:8.4f} top-1 {acc.top1_agreement:.3f} PPL {acc.ppl:10.3f}",
              flush=True)
        results["rows"].append(row)
        return row

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        work = Path(tmp)
        for plain in (True, False):
            tag = "plain" if plain else "prescaled"
            graph = work / tag / "float.onnx"
            export_float_onnx(StaticLlama(ref_model, AR, ctx, plain_norm=plain).eval(), graph)
            fsess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
            run = lambda f, s=fsess: s.run(None, f)  # noqa: E731
            feeds = list(calibration_feeds(run, ckpt.tokenizer, spec, ctx, 2))
            valid = data_file(CALIB_FILE).read_text()
            probe_ids = ckpt.tokenizer.encode(valid[200000:220000], bos=False)  # past the calibration text
            runner = StaticCacheRunner(run, AR, ctx, spec.n_layers, spec.n_kv_heads, spec.head_dim)
            runner.forward(probe_ids[:AR], 0)
            probe = runner.feeds(probe_ids[AR : 2 * AR])
            table = sqnr_table(graph, feeds, probe, work / tag)
            results["sqnr"][tag] = {c: [list(r) for r in rows] for c, rows in table.items()}
            print(f"\n16-bit SQNR per tensor, {tag} RMSNorm (worst layer; median over layers):")
            for cat, rows in sorted(table.items(), key=lambda kv: min(r[1] for r in kv[1])):
                worst = min(rows, key=lambda r: r[1])
                print(f"  {cat:32s} worst {worst[1]:6.1f} dB at layer {worst[0]:2d} (range [{worst[2]:.3g}, "
                      f"{worst[3]:.3g}]), median {np.median([r[1] for r in rows]):.1f} dB")
            variants = [("naive: plain norm, u16 activations, u8 per-tensor weights", "naive")] if plain else [
                ("prescaled norm, u16 activations, int8 per-channel weights", "int8"),
                ("prescaled norm, u16 activations, int4 per-channel weights", "int4_channel"),
                (f"prescaled norm, u16 act., int4 LPBQ g{scheme.group_size}, head int8 (shipped)", "lpbq"),
                (f"prescaled norm, u16 act., int4 LPBQ g{scheme.group_size}, head int4 LPBQ", "lpbq_head4"),
            ]
            for name, mode in variants:
                qdq = work / tag / f"{mode}.onnx"
                feeds_it = iter(feeds)
                if mode == "naive":
                    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
                    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

                    class Reader(CalibrationDataReader):
                        def get_next(self, it=feeds_it):  # type: ignore[no-untyped-def]
                            return next(it, None)

                    cfg = get_qnn_qdq_config(str(graph), Reader(), activation_type=QuantType.QUInt16,
                                             weight_type=QuantType.QUInt8)
                    cfg.use_external_data_format = True
                    quantize(str(graph), str(qdq), cfg)
                else:
                    sch = QuantScheme(lm_head_bits=4) if mode == "lpbq_head4" else scheme
                    quantize_w4a16(graph, qdq, feeds_it, sch, linears="lpbq" if mode.startswith("lpbq") else mode)
                score(qdq, name)
                if mode == "lpbq" and args.htp:
                    from llamaship.targets.qnn_runtime import compile_context

                    compile_context(qdq, work / "ctx" / "model_ctx.onnx", "SM8650")
                    score(work / "ctx" / "model_ctx.onnx", name, providers="htp")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwritten {RESULTS}")
    print_tables(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
