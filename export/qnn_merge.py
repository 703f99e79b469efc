"""Joins the quantized units of a part into the part's graph, and fixes its shapes into the prefill
(T = 128) and decode (T = 1) instances, which share one weights file.

Written by hand: onnx.compose.merge_models joins two graphs by wiring outputs to inputs, but a
tensor crossing units is quantized on both sides (the producer's QuantizeLinear -> DequantizeLinear
on its output, the consumer's on its input). The units are calibrated so the two encodings are the
same (qnn_quant.quantize_w4a16's `fixed`); here the consumer's pair is dropped and its readers take
the producer's dequantized tensor, so the HTP quantizes each tensor once. A graph input read by
several units keeps its first unit's pair, when the encodings agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from llamaship.errors import ExportError


def _prefix_unit(model: onnx.ModelProto, tag: str) -> set[str]:
    """Renames every tensor and node of the unit except its graph inputs and outputs (the names
    units share) to `tag/...`; returns the kept names."""
    g = model.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    ren = lambda n: n if (not n or n in keep) else f"{tag}/{n}"  # noqa: E731
    for node in g.node:
        node.name = f"{tag}/{node.name}"
        node.input[:] = [ren(n) for n in node.input]
        node.output[:] = [ren(n) for n in node.output]
    for init in g.initializer:
        init.name = ren(init.name)
    del g.value_info[:]
    return keep


def _encoding(consts: dict[str, onnx.TensorProto], node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
    return numpy_helper.to_array(consts[node.input[1]]), numpy_helper.to_array(consts[node.input[2]])


def _dedupe_inputs(g: onnx.GraphProto, consts: dict[str, onnx.TensorProto],
                   dequantized: dict[str, tuple[str, tuple[np.ndarray, np.ndarray]]], alias: dict[str, str],
                   tag: str) -> set[str]:
    """Records the unit's dequantized outputs in `dequantized`; each input QuantizeLinear ->
    DequantizeLinear pair of a tensor already dequantized there goes into `alias` (its readers
    take the known float form) and its nodes' first outputs are returned, to be dropped."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for n in node.input:
            readers.setdefault(n, []).append(node)
    graph_inputs, graph_outputs = {i.name for i in g.input}, {o.name for o in g.output}
    drop: set[str] = set()
    for node in g.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in graph_outputs:
            dequantized[node.output[0]] = (node.output[0], _encoding(consts, node))
        if node.op_type != "QuantizeLinear" or node.input[0] not in graph_inputs:
            continue
        dqs = [r for r in readers.get(node.output[0], []) if r.op_type == "DequantizeLinear"]
        if len(dqs) != 1 or len(readers[node.output[0]]) != 1:
            continue
        x, enc = node.input[0], _encoding(consts, node)
        if x not in dequantized:
            dequantized[x] = (dqs[0].output[0], enc)
            continue
        canonical, known = dequantized[x]
        if not all(np.array_equal(a, b) for a, b in zip(enc, known, strict=True)):
            raise ExportError(f"unit {tag}: input {x} is quantized with scale {enc[0]} / zero point {enc[1]}, "
                              f"but where it comes from with {known[0]} / {known[1]}")
        alias[dqs[0].output[0]] = canonical
        drop |= {node.output[0], dqs[0].output[0]}
    return drop


def join_units(units: list[tuple[str, onnx.ModelProto]], inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """One graph from the units (in dataflow order) with the given graph inputs and outputs."""
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, onnx.TensorProto] = {}
    value_infos: dict[str, onnx.ValueInfoProto] = {}
    dequantized: dict[str, tuple[str, tuple[np.ndarray, np.ndarray]]] = {}  # tensor -> (its float form, encoding)
    alias: dict[str, str] = {}
    opset = max(o.version for _, m in units for o in m.opset_import if o.domain in ("", "ai.onnx"))
    for tag, model in units:
        _prefix_unit(model, tag)
        g = model.graph
        for vi in [*g.input, *g.output]:
            value_infos.setdefault(vi.name, vi)
        consts = {i.name: i for i in g.initializer}
        drop = _dedupe_inputs(g, consts, dequantized, alias, tag)
        nodes += [n for n in g.node if n.output[0] not in drop]
        inits.update(consts)
    for node in nodes:
        node.input[:] = [alias.get(n, n) for n in node.input]
    missing = [n for n in [*inputs, *outputs] if n not in value_infos]
    if missing:
        raise ExportError(f"the part's units do not provide {missing}")
    used = {n for node in nodes for n in node.input}
    graph = onnx.helper.make_graph(nodes, "llamaship_npu_part", [value_infos[n] for n in inputs],
                                   [value_infos[n] for n in outputs], [t for n, t in inits.items() if n in used])
    ms = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                producer_name="llamaship")
    ms.ir_version = units[0][1].ir_version
    return ms


def fix_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """Every graph input and output gets its static shape (the HTP compiles fixed shapes)."""
    for vi in [*model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        want = shapes[vi.name]
        if len(dims) != len(want):
            raise ExportError(f"{vi.name}: rank {len(dims)} in the graph, {len(want)} expected")
        for d, v in zip(dims, want, strict=True):
            d.Clear()
            d.dim_value = v
    del model.graph.value_info[:]
    return model


def save_instances(model: onnx.ModelProto, folder: Path, stem: str,
                   shapes: dict[str, dict[str, list[int]]]) -> dict[str, str]:
    """Writes `stem`.data once and one graph per instance (`stem`_<name>.onnx) reading it; returns
    {instance name: graph file name}. The instances differ in their I/O shapes only."""
    folder.mkdir(parents=True, exist_ok=True)
    data = f"{stem}.data"
    names = list(shapes)
    first = folder / f"{stem}_{names[0]}.onnx"
    onnx.save(fix_shapes(model, shapes[names[0]]), str(first), save_as_external_data=True,
              all_tensors_to_one_file=True, location=data, size_threshold=1024)
    files = {names[0]: first.name}
    for name in names[1:]:
        other = onnx.load(str(first), load_external_data=False)  # initializers stay references into `data`
        onnx.save(fix_shapes(other, shapes[name]), str(folder / f"{stem}_{name}.onnx"))
        files[name] = f"{stem}_{name}.onnx"
    return files
