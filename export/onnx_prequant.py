"""Hand onnxruntime-genai's model builder an already-quantized checkpoint ("olive" format) made
from the quantize stage's codes, and write the embedding's GatherBlockQuantized from them too.

Why: the ONNX artifact must carry the same codes as every other format (llamaship.quantize), and
the builder, given a float checkpoint, would round again its own way. It also keeps memory flat:
given a float checkpoint the builder builds every weight as an fp32 ONNX initializer before it
quantizes (about 6 bytes per parameter at its peak: some 45 GiB for Llama 3 8B), while a quantized
checkpoint it only repacks, one tensor at a time.

MatMulNBits stores unsigned nibbles with a zero point per block: w = (u - z_u) * s. Our signed
codes q (and zero points z) map exactly: u = q + 2^(bits-1), z_u = z + 2^(bits-1), so a symmetric
scheme's blocks carry the explicit zero point 8. An 8-bit lm_head quantized per output channel is
stored per block with that channel's scale repeated, exactly. The olive format packs zero points
per row, as MatMulNBits defines it (onnxruntime's own packing runs across rows and breaks when a
row has an odd number of blocks, e.g. K=576 with block 64).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaship.export.hf_folder import hf_config, write_tokenizer_files
from llamaship.export.llama.load_hf import hf_name
from llamaship.export.llama.spec import ModelSpec
from llamaship.export.llama.tokenizer import Tokenizer
from llamaship.progress import advance, natural_key
from llamaship.quantize.checkpoint import QuantizedCheckpoint
from llamaship.quantize.codes import QTensor
from llamaship.quantize.scheme import QuantScheme


def unsigned(qt: QTensor, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes u [out, in], scales fp32 [out, in/block], zero points u [out, in/block]) with
    u = q + 2^(bits-1); per-channel params repeated across the blocks of their row."""
    offset = 1 << (qt.bits - 1)
    reps = qt.group_size // block
    scales = qt.scales.float().repeat_interleave(reps, dim=1)
    zeros = qt.zero_points().to(torch.int16).repeat_interleave(reps, dim=1) + offset
    return ((qt.codes.to(torch.int16) + offset).to(torch.uint8).numpy(), scales.numpy(),
            zeros.to(torch.uint8).numpy())


def olive_parts(qt: QTensor, block: int) -> dict[str, np.ndarray]:
    """One matrix in olive layout: qweight uint8 (out, in*bits/8), the low nibble the even
    column; scales fp32 (out, in/block); qzeros uint8 (out, ceil(blocks*bits/8))."""
    q, scales, zeros = unsigned(qt, block)
    if qt.bits == 8:
        return {"qweight": q, "scales": scales, "qzeros": zeros}
    if zeros.shape[1] % 2:  # a row's last byte holds one zero point and the default 8 in its high nibble
        zeros = np.concatenate([zeros, np.full((zeros.shape[0], 1), 8, np.uint8)], axis=1)
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": scales,
            "qzeros": zeros[:, 0::2] | (zeros[:, 1::2] << 4)}


def supports(scheme: QuantScheme | None) -> bool:
    """The schemes this route writes: 4-bit linears, lm_head 4- or 8-bit."""
    return scheme is not None and scheme.bits == 4 and scheme.lm_head_bits in (4, 8)


def olive_tensors(spec: ModelSpec, state: Mapping[str, torch.Tensor], quantized: QuantizedCheckpoint,
                  scheme: QuantScheme, progress: Callable[[str], None]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs: linears as the stage's codes, embedding and norms as float (the
    norms as the stage left them)."""
    names = sorted(state, key=natural_key)  # layer 2 before layer 10
    done: set[str] = set()
    for name in names:
        if name == "output.weight":
            continue
        if name not in quantized or name == "tok_embeddings.weight":
            yield hf_name(name), state[name].contiguous()
            continue
        layer = name.split(".")[1]
        if layer not in done:
            done.add(layer)
            advance(progress, "onnx: packing the codes as MatMulNBits", len(done) - 1, spec.n_layers)
        prefix = hf_name(name).removesuffix(".weight")
        for part, arr in olive_parts(quantized.get(name), scheme.group_size).items():
            yield f"{prefix}.{part}", torch.from_numpy(arr)
    advance(progress, "onnx: packing the codes as MatMulNBits", spec.n_layers, spec.n_layers)
    for part, arr in olive_parts(quantized.get("output.weight"), scheme.group_size).items():
        yield f"lm_head.{part}", torch.from_numpy(arr)


def finish_graph(model_path: Path, embedding: QTensor | None) -> dict[str, int]:
    """Rewrite the builder's graph in place: the embedding's codes as GatherBlockQuantized (when
    `embedding` is given), and no zero-point input where every block's zero point is the default.
    Returns what changed: {"zero_points_dropped": nodes, "bytes_saved": bytes}."""
    import onnx

    model = onnx.load(str(model_path))  # external data into memory: the file is rewritten below
    if embedding is not None:
        quantized_embedding(model, embedding)
    dropped, saved = drop_default_zero_points(model.graph)
    ext = model_path.with_name(model_path.name + ".data")
    ext.unlink(missing_ok=True)  # onnx appends to an existing external data file
    onnx.save_model(model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ext.name, size_threshold=1024)
    return {"zero_points_dropped": dropped, "bytes_saved": saved}


def drop_default_zero_points(graph: Any) -> tuple[int, int]:
    """MatMulNBits without a zero-point input uses 2^(bits-1), the value the olive layout gives a
    symmetric scheme's blocks (u = q + 8). The builder stores them anyway: one nibble per block
    that the kernel reads for nothing (1.7 MB for SmolLM2, 0.9 MB more for an 8-bit lm_head) and
    a slower kernel path. Only nodes whose every stored zero point is that default lose theirs,
    so an asymmetric scheme's graph is untouched and the computed values are identical."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    dropped = saved = 0
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or node.input[3] not in inits:
            continue
        bits = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "bits"), 4)
        zp = numpy_helper.to_array(inits[node.input[3]])
        default = 0x88 if bits == 4 else 1 << (bits - 1)
        if zp.dtype != np.uint8 or not (zp == default).all() or uses[node.input[3]] != 1:
            continue
        saved += zp.nbytes
        graph.initializer.remove(inits.pop(node.input[3]))
        extra = list(node.input[4:])  # g_idx / bias after the zero points keep their slots, empty
        del node.input[3:]
        if any(extra):
            node.input.extend(["", *extra])
        dropped += 1
    return dropped, saved


def quantized_embedding(model: Any, qt: QTensor) -> None:
    """Replace the graph's float embedding Gather with GatherBlockQuantized holding the stage's
    codes: INT4 data for a symmetric scheme, UINT4 data and zero points (q + 8) otherwise; the
    node and attributes as onnxruntime's own `MatMulNBitsQuantizer` writes them for a Gather."""
    from onnx import TensorProto, helper, numpy_helper

    from llamaship.export.qnn_lpbq import int4_tensor

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    node = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                and len(inits[n.input[0]].dims) == 2)
    table = inits[node.input[0]]
    if tuple(table.dims) != qt.shape:
        raise ValueError(f"embedding {table.name} is {list(table.dims)}, the codes are {list(qt.shape)}")
    if qt.symmetric:
        data = int4_tensor(table.name + "_Q4", qt.codes.numpy())
        extra: list[TensorProto] = []
    else:
        u, _, z = unsigned(qt, qt.group_size)
        data = int4_tensor(table.name + "_Q4", u, TensorProto.UINT4)
        extra = [int4_tensor(table.name + "_zero_points", z, TensorProto.UINT4)]
    scales = numpy_helper.from_array(qt.scales.float().numpy(), table.name + "_scales")
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    new = helper.make_node("GatherBlockQuantized", [data.name, node.input[1], scales.name, *(e.name for e in extra)],
                           [node.output[0]], name=(node.name or "embed") + "_Q4", domain="com.microsoft",
                           gather_axis=axis, quantize_axis=1, block_size=qt.group_size)
    idx = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(idx, new)
    graph.initializer.remove(table)
    graph.initializer.extend([data, scales, *extra])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _shape(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    shape_of = getattr(state, "shape", None)  # LazyState knows shapes without reading the tensor
    return tuple(shape_of(name)) if callable(shape_of) else tuple(state[name].shape)


def write_olive_folder(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], quantized: QuantizedCheckpoint, tokenizer: Tokenizer,
    scheme: QuantScheme, folder: Path, progress: Callable[[str], None] = print, shard_bytes: int = 1 << 30,
) -> Path:
    """An HF folder the builder reads as an olive-quantized model: config.json with its
    quantization_config, sharded safetensors, tokenizer files."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size, files, weight_map = 0, [], {}  # type: tuple[int, list[str], dict[str, str]]
    float_dtype = torch.float32

    def flush() -> None:
        nonlocal shard, size
        fname = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
        shard, size = {}, 0

    for name, tensor in olive_tensors(spec, state, quantized, scheme, progress):
        if tensor.is_floating_point() and not name.endswith(".scales"):
            float_dtype = tensor.dtype
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg: dict[str, Any] = hf_config(spec, float_dtype)
    cfg["tie_word_embeddings"] = False  # lm_head has its own quantized copy
    cfg["quantization_config"] = {
        "quant_method": "olive", "bits": scheme.bits, "group_size": scheme.group_size,
        "overrides": {"lm_head": {"bits": scheme.lm_head_bits}} if scheme.lm_head_bits != scheme.bits else {},
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    write_tokenizer_files(tokenizer, spec, folder)
    return folder
