"""Quantize the linear weights ourselves, one tensor at a time, and hand the model builder an
already-quantized checkpoint ("olive" format) instead of a float one.

Why: onnxruntime-genai 0.18's builder, given a float checkpoint, builds every weight as an fp32
ONNX initializer before it quantizes (about 6 bytes per parameter at its peak: some 45 GiB for
Llama 3 8B, far over a 24 GB machine). Given a quantized checkpoint it only repacks. We run the
same quantizer the builder would (onnxruntime's k-quant port, `quant_tensor_k_quant_cpu`) on each
weight as it streams out of the memory-mapped checkpoint, so the MatMulNBits weights are
byte-identical to the builder's own (tested), but the peak is one weight matrix, not the model.

A second reason: onnxruntime's packing of 4-bit zero points runs across rows, which breaks when a
row has an odd number of blocks (e.g. K=576 with block 64); the olive format packs per row, as
MatMulNBits defines it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaship.export.hf_folder import hf_config, write_tokenizer_files
from llamaship.export.llama.load_hf import hf_name
from llamaship.export.llama.spec import ModelSpec
from llamaship.export.llama.tokenizer import Tokenizer
from llamaship.progress import advance, natural_key
from llamaship.quantize.scheme import QuantScheme

ROWS_PER_CHUNK = 1024  # k-quant works per block: row chunks bound its temporaries (~40 MB at K=4096)


def k_quant(weight: torch.Tensor, bits: int, group_size: int) -> dict[str, np.ndarray]:
    """One (out, in) weight in olive layout: qweight uint8 (out, in*bits/8), the low nibble the
    even column; scales fp32 (out, in/group); qzeros uint8 (out, ceil(groups*bits/8))."""
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    out_f, in_f = weight.shape
    groups = in_f // group_size
    q = np.empty((out_f, in_f), np.uint8)
    scales = np.empty((out_f, groups), np.float32)
    zeros = np.empty((out_f, groups), np.uint8)

    def chunk(r: int) -> None:
        rows = weight[r:r + ROWS_PER_CHUNK].float().numpy()
        qc, sc, zc = quant_tensor_k_quant_cpu(rows, bits, group_size)
        n = rows.shape[0]
        q[r:r + n] = qc.reshape(n, in_f).astype(np.uint8)
        scales[r:r + n] = sc.reshape(n, groups).astype(np.float32)  # the builder casts to fp32 too
        zeros[r:r + n] = zc.reshape(n, groups)

    # numpy releases the GIL inside its array ops: row chunks on threads use every core
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(chunk, range(0, out_f, ROWS_PER_CHUNK)))
    if bits == 8:
        return {"qweight": q, "scales": scales, "qzeros": zeros}
    if groups % 2:  # a row's last byte holds one zero point and the default 8 in its high nibble
        zeros = np.concatenate([zeros, np.full((out_f, 1), 8, np.uint8)], axis=1)
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": scales,
            "qzeros": zeros[:, 0::2] | (zeros[:, 1::2] << 4)}


def supports(scheme: QuantScheme | None, algorithm: str) -> bool:
    """The schemes this route writes: k-quant, 4-bit linears, lm_head 4- or 8-bit."""
    return (scheme is not None and algorithm == "k_quant" and scheme.bits == 4
            and scheme.lm_head_bits in (4, 8))


def olive_tensors(spec: ModelSpec, state: Mapping[str, torch.Tensor], scheme: QuantScheme,
                  progress: Callable[[str], None]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs: linears quantized, embedding and norms as stored."""
    names = sorted(state, key=natural_key)  # layer 2 before layer 10
    linears = [n for n in names if n.endswith(".weight") and n.startswith("layers.")
               and len(_shape(state, n)) == 2]
    started: set[str] = set()
    for name in names:
        if name == "output.weight" or name not in linears:
            if name != "output.weight":
                yield hf_name(name), state[name].contiguous()
            continue
        layer = name.split(".")[1]
        if layer not in started:
            started.add(layer)
            advance(progress, "onnx: k-quant layers", len(started) - 1, spec.n_layers)
        prefix = hf_name(name).removesuffix(".weight")
        for part, arr in k_quant(state[name], scheme.bits, scheme.group_size).items():
            yield f"{prefix}.{part}", torch.from_numpy(arr)
    advance(progress, "onnx: k-quant layers", spec.n_layers, spec.n_layers)
    head = state["output.weight"] if "output.weight" in state else state["tok_embeddings.weight"]
    progress(f"onnx: k-quant lm_head, {scheme.lm_head_bits}-bit")
    for part, arr in k_quant(head, scheme.lm_head_bits, scheme.group_size).items():
        yield f"lm_head.{part}", torch.from_numpy(arr)


def _shape(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    shape_of = getattr(state, "shape", None)  # LazyState knows shapes without reading the tensor
    return tuple(shape_of(name)) if callable(shape_of) else tuple(state[name].shape)


def write_olive_folder(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], tokenizer: Tokenizer, scheme: QuantScheme,
    folder: Path, progress: Callable[[str], None] = print, shard_bytes: int = 1 << 30,
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

    for name, tensor in olive_tensors(spec, state, scheme, progress):
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
