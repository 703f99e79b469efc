"""w4a16 for one float graph (a unit of the NPU graph, or the whole graph in bench/qnn_layer_error.py):
onnxruntime's QNN QDQ quantizer calibrates 16-bit activations, then every block linear's weight is
swapped for 4-bit LPBQ derived from the quantize stage's codes (qnn_lpbq.py).

`fixed` pins the encodings of a graph's inputs to the ones the unit before it wrote on its outputs
(`output_encodings`), so that a tensor crossing from one unit to the next is quantized once, on one
grid, and the joined graph (qnn_merge.py) needs no requantization between them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llamaship.errors import ExportError
from llamaship.quantize.checkpoint import QuantizedCheckpoint
from llamaship.quantize.scheme import QuantScheme
from llamaship.quiet import quiet_root_logger

Encoding = tuple[np.ndarray, np.ndarray]  # (scale float32 scalar, zero point uint16 scalar)
LINEAR = re.compile(r"/(w[qkvo123])/MatMul$")


def state_name(node_name: str | None, layer: int | None = None) -> str:
    """The checkpoint name of a block linear from its graph node ("/blocks.3/wq/MatMul" in the whole
    graph, "/block/layer/attention/wq/MatMul" in block unit `layer`), or the lm_head's
    ("output.weight") for None."""
    if node_name is None:
        return "output.weight"
    m = re.match(r"/blocks\.(\d+)/(?:.*/)?(w[qkvo123])/MatMul", node_name)
    if m is not None:
        layer, proj = int(m[1]), m[2]
    elif layer is not None and (m2 := LINEAR.search(node_name)) is not None:
        proj = m2[1]
    else:
        raise ExportError(f"cannot tell which checkpoint weight the graph node {node_name} multiplies by")
    return f"layers.{layer}.{'attention' if proj in ('wq', 'wk', 'wv', 'wo') else 'feed_forward'}.{proj}.weight"


def output_encodings(qdq_model: Path, names: list[str]) -> dict[str, Encoding]:
    """The 16-bit encoding of each named graph output: the QuantizeLinear that feeds its
    DequantizeLinear."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(qdq_model), load_external_data=False).graph
    consts = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    found: dict[str, Encoding] = {}
    for name in names:
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            raise ExportError(f"{qdq_model}: output {name} is not dequantized (found {dq and dq.op_type})")
        found[name] = (numpy_helper.to_array(consts[dq.input[1]]), numpy_helper.to_array(consts[dq.input[2]]))
    return found


def _find_weights(graph: Any, layer: int | None) -> tuple[dict[str, str], list[str], list[str], list[str]]:
    """(block linear weight -> its checkpoint name, lm_head weights, embedding tables, other Gather tables)."""
    inits = {i.name for i in graph.initializer}
    linears: dict[str, str] = {}
    head: list[str] = []
    embedding: list[str] = []
    tables: list[str] = []
    for n in graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            if n.name.startswith("/blocks.") or (layer is not None and LINEAR.search(n.name)):
                linears[n.input[1]] = state_name(n.name, layer)
            else:
                head.append(n.input[1])
        elif n.op_type == "Gather" and n.input[0] in inits:
            (embedding if n.input[0].endswith("tok_embeddings.weight") else tables).append(n.input[0])
    return linears, head, embedding, tables


def quantize_w4a16(float_model: Path, qdq_model: Path, feeds: Iterator[dict[str, np.ndarray]],
                   scheme: QuantScheme, linears: str = "lpbq", quantized: QuantizedCheckpoint | None = None,
                   layer: int | None = None, fixed: dict[str, Encoding] | None = None,
                   whole: bool = True) -> dict[str, Any]:
    """uint16 activations from calibration; linear weights int8 per channel first (onnxruntime's
    QNN quantizer), then the block linears' weights swapped for 4-bit LPBQ, derived from the
    quantize stage's codes when `quantized` is given (else from the float weights). `linears`
    "int8" or "int4_channel" stop short of that (the error table's ablations). `layer` names the
    block of a block unit; `whole` requires one lm_head and one embedding (a whole-model graph)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.count = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(feeds, None)
            self.count += feed is not None
            return feed

    graph = onnx.load(str(float_model), load_external_data=False).graph
    block_linears, head, embedding, tables = _find_weights(graph, layer)
    if whole and (len(head) != 1 or len(embedding) != 1):
        raise ExportError(f"{float_model}: expected one lm_head MatMul and one embedding Gather, found "
                          f"{len(head)} and {len(embedding)}")
    linear_type = QuantType.QInt4 if linears == "int4_channel" else QuantType.QInt8
    overrides: dict[str, list[dict[str, Any]]] = {
        w: [{"quant_type": linear_type, "axis": 1, "symmetric": True}] for w in block_linears}
    overrides |= {w: [{"quant_type": QuantType.QInt8, "axis": 1, "symmetric": True}] for w in head}
    overrides |= {w: [{"quant_type": QuantType.QUInt16}] for w in embedding + tables}
    overrides |= {name: [{"quant_type": QuantType.QUInt16, "scale": s, "zero_point": z}]
                  for name, (s, z) in (fixed or {}).items()}
    reader = Reader()
    config = get_qnn_qdq_config(str(float_model), reader, activation_type=QuantType.QUInt16,
                                weight_type=QuantType.QUInt8, init_overrides=overrides)
    config.use_external_data_format = True
    with quiet_root_logger():
        quantize(str(float_model), str(qdq_model), config)

    described = {"activations": "uint16 per tensor (calibrated min/max)",
                 "linears": f"int4 LPBQ, block {scheme.group_size} (4-bit block scales x fp32 channel scale)",
                 "lm_head": "int8 per channel" if scheme.lm_head_bits == 8 else f"int4 LPBQ, block {scheme.group_size}",
                 "embedding": "uint16 per tensor", "n_block_linears": len(block_linears),
                 "calibration_chunks": reader.count}
    if linears != "lpbq":
        return described | {"linears": f"{linears} per channel", "lm_head": "int8 per channel"}
    swap = dict(block_linears) | ({} if scheme.lm_head_bits == 8 else {w: "output.weight" for w in head})
    distance = _swap_in_lpbq(qdq_model, float_model, swap, scheme.group_size, quantized)
    if distance:
        described["lpbq_distances"] = distance  # per matrix: summarize_distances() over every unit
    return described


def summarize_distances(distances: list[dict[str, list[float]]]) -> dict[str, float]:
    """How far LPBQ is from the stage's codes, over every swapped matrix of every unit."""
    kept = [v for d in distances for v in d.get("codes_kept", [])]
    err = [v for d in distances for v in d.get("relative_error", [])]
    if not kept:
        return {}
    return {"codes_kept": round(float(np.mean(kept)), 4), "relative_error_mean": round(float(np.mean(err)), 5),
            "relative_error_max": round(float(np.max(err)), 5)}


def _swap_in_lpbq(qdq_model: Path, float_model: Path, swap: dict[str, str], group: int,
                  quantized: QuantizedCheckpoint | None) -> dict[str, list[float]]:
    """Replace each swapped weight's int8 Q/DQ with LPBQ nodes; returns the codes' distances
    (kept share, relative error) per matrix when derived from the stage's codes."""
    import onnx
    from onnx import numpy_helper

    from llamaship.export.qnn_lpbq import lpbq_distance, lpbq_from_codes, lpbq_nodes

    if not swap:
        return {}
    float_weights = {i.name: i for i in onnx.load(str(float_model)).graph.initializer if i.name in swap}
    model = onnx.load(str(qdq_model))
    nodes, dropped = [], set()
    distance: dict[str, list[float]] = {}
    for node in model.graph.node:
        w = node.input[0].removesuffix("_quantized") if node.op_type == "DequantizeLinear" else ""
        if w in swap:
            source: Any = numpy_helper.to_array(float_weights[w])
            if quantized is not None:
                qt = quantized.get(swap[w])
                codes, scales = qt.codes.numpy(), qt.scales.numpy()
                source = lpbq_from_codes(codes, scales, group)
                for key, v in lpbq_distance(codes, scales, group, source).items():
                    distance.setdefault(key, []).append(v)
            prefix = swap[w].removesuffix(".weight").replace(".", "_")
            new_nodes, new_inits = lpbq_nodes(prefix, source, group, node.output[0])
            nodes += new_nodes
            model.graph.initializer.extend(new_inits)
            dropped |= set(node.input)
        else:
            nodes.append(node)
    if len(dropped) != 3 * len(swap):
        raise ExportError(f"{qdq_model}: found {len(dropped) // 3} of {len(swap)} linear weights to make 4-bit")
    keep = [i for i in model.graph.initializer if i.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for stale in qdq_model.parent.glob(qdq_model.name + "*"):
        stale.unlink()
    onnx.save(model, str(qdq_model), save_as_external_data=True, all_tensors_to_one_file=True,
              location=qdq_model.name + ".data", size_threshold=1024)
    return distance
