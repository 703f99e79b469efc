"""ONNX export through onnxruntime-genai's model builder, fed by our own loaders.

Why the builder and not torch.onnx on our module: the builder emits the fused operators that
onnxruntime's CPU and mobile kernels are written for (GroupQueryAttention with the KV cache,
rotary embedding inside it, SkipSimplifiedLayerNormalization, MatMulNBits, GatherBlockQuantized)
plus the genai_config.json that onnxruntime-genai apps load, and its fp32 graph matches our module
to 6e-5 in logits. A torch.onnx graph of the same module would be a chain of small unfused ops that
onnxruntime runs slower and onnxruntime-genai cannot drive without a hand-written config.

Every source (HF folder, Meta consolidated.pth, GGUF) goes through our loaders and is written back
as a plain HF folder for the builder, so the checks, the q/k layout and the tokenizer fixes are the
same as for the .pte. The builder runs in a child process: it holds the model in memory while it
writes, and its console output goes to a log that we quote when it fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from llamaship.errors import ExportError, UnsupportedError
from llamaship.export import onnx_prequant as prequant
from llamaship.export.hf_folder import write_hf_folder
from llamaship.export.llama.spec import ModelSpec
from llamaship.export.llama.tokenizer import Tokenizer
from llamaship.quantize.checkpoint import QuantizedCheckpoint
from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.stage import stage_output

ACCURACY_LEVELS = {1: "fp32", 2: "fp16", 3: "bf16", 4: "int8"}
DEFAULT_ACCURACY_LEVEL = 4  # what the builder picks for CPU: int8 activations in MatMulNBits


def builder_options(scheme: QuantScheme | None, accuracy_level: int) -> tuple[str, dict[str, str]]:
    """The builder's precision and --extra_options for a QuantScheme (its weights arrive as an
    olive checkpoint of the quantize stage's codes: the builder only repacks them)."""
    if scheme is None:
        return "fp32", {}
    if scheme.bits != 4:
        raise UnsupportedError(
            f"ONNX export supports 4-bit weights (MatMulNBits); scheme {scheme.name} is not available for onnx"
        )
    if accuracy_level not in ACCURACY_LEVELS:
        raise UnsupportedError(f"accuracy level {accuracy_level} is not one of {sorted(ACCURACY_LEVELS)}")
    if scheme.embedding_bits == 8:
        raise UnsupportedError("onnxruntime's GatherBlockQuantized takes 4-bit embeddings only: "
                               "use --embedding-bits 4 or 0 for onnx")
    if scheme.lm_head_bits == 0:
        raise UnsupportedError("the ONNX route packs the quantize stage's codes for every linear, lm_head included: "
                               "use --lm-head-bits 8 or 4 for onnx")
    return "int4", {
        "block_size": str(scheme.group_size),
        "accuracy_level": str(accuracy_level),
        # builder 0.18 shares the embedding with lm_head by default for tied models, but then names
        # the int8 lm_head weight differently from what the Gather reads (an invalid graph): give
        # the embedding its own copy instead.
        "shared_embeddings": "false",
        "prune_lm_head": "true",  # prefill computes the last position's logits only, as the .pte does
    }


def scheme_name(scheme: QuantScheme | None, accuracy_level: int) -> str:
    """What the ONNX graph holds, named like QuantScheme.name: e.g. w4-g32-gptq-emb4-head8-a8
    (a8: int8 activations inside MatMulNBits, accuracy level 4)."""
    if scheme is None:
        return "fp32"
    emb = f"-emb{scheme.embedding_bits}" if scheme.embedding_bits else ""
    head = f"-head{scheme.lm_head_bits}" if scheme.lm_head_bits else "-headfp32"
    act = {4: "a8", 3: "abf16", 2: "a16", 1: "a32"}[accuracy_level]
    asym = "" if scheme.symmetric else "-asym"
    return f"w{scheme.bits}-g{scheme.group_size}-{scheme.algorithm}{asym}{emb}{head}-{act}"


def run_builder(hf_dir: Path, out: Path, precision: str, options: dict[str, str], log: Path,
                cache: Path) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache), "--extra_options", "hf_token=false",
           *(f"{k}={v}" for k, v in options.items())]
    # GIT_DIR: the builder stamps producer_version with `git rev-parse HEAD` run five folders above
    # its own file, which for a venv inside a git checkout is that checkout's commit (ours, not
    # onnxruntime-genai's): the same model then hashed differently at every commit. Without git it
    # falls back to the wheel's own commit, so the bytes depend on the inputs alone.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", GIT_DIR=os.devnull)
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0 or not (out / "model.onnx").exists():
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-4:]
        raise ExportError(f"onnxruntime-genai model builder failed (exit {res.returncode}): {' | '.join(tail)}")


def describe_quantization(model_path: Path) -> dict[str, Any]:
    """What the graph actually stores, read back from it: every MatMulNBits / GatherBlockQuantized
    with its bits and block size, and the float weights left over. The manifest reports this, not
    what was asked for."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    ops: dict[str, dict[str, Any]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        key = f"{node.op_type} int{attrs.get('bits', 4)} block {attrs.get('block_size')}"
        if node.op_type == "MatMulNBits":
            key += f" accuracy_level {attrs.get('accuracy_level', 0)}"
        asym = len(node.input) > 3 and bool(node.input[3])
        key += " asymmetric" if asym else " symmetric"
        entry = ops.setdefault(key, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < 2 or "lm_head" in node.name or "embed" in node.name:
            entry["examples"].append(node.name)
    float_params = sum(  # float tensors that are not quantization scales: norms, rotary caches, ...
        int(torch.Size(t.dims).numel()) for t in model.graph.initializer
        if t.data_type in (1, 10, 16) and "scale" not in t.name
    )
    return {"opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "quantized_ops": ops, "float_parameters": float_params,
            "op_types": sorted({n.op_type for n in model.graph.node})}


def export_onnx(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], tokenizer: Tokenizer, scheme: QuantScheme | None,
    out: Path, max_context: int, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    progress: Callable[[str], None] = print, quantized: QuantizedCheckpoint | None = None,
    builder_extra: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write model.onnx + model.onnx.data + genai_config.json + tokenizer files into `out`.
    `builder_extra`: more `--extra_options` for the model builder (bench/levers.py's KV-cache
    quantization), on top of the ones the scheme sets.
    Returns timings and the quantization read back from the graph. `quantized` is the quantize
    stage's output; without it the stage runs here."""
    precision, options = builder_options(scheme, accuracy_level)
    options |= dict(builder_extra or {})
    timings: dict[str, float] = {}
    changed: dict[str, int] = {}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".onnx-build-", dir=out.parent) as work, contextlib.ExitStack() as stack:
        t = time.perf_counter()
        folder_spec = spec.replace(max_context=max_context)
        if scheme is not None:
            scheme.check_fits(spec)
            quantized = stack.enter_context(stage_output(spec, state, scheme, quantized, out.parent, progress,
                                                         tokenizer))
            progress(f"onnx: the {scheme.algorithm} codes as an olive checkpoint for the model builder")
            hf_dir = prequant.write_olive_folder(folder_spec, quantized.state(state), quantized, tokenizer, scheme,
                                                 Path(work) / "hf", progress)
        else:
            progress("onnx: writing the checkpoint as a Hugging Face folder for the model builder")
            hf_dir = write_hf_folder(folder_spec, state, tokenizer, Path(work) / "hf")
        timings["write_hf_s"] = time.perf_counter() - t
        t = time.perf_counter()
        progress(f"onnx: onnxruntime-genai model builder, precision {precision} "
                 + " ".join(f"{k}={v}" for k, v in options.items()))
        run_builder(hf_dir, out, precision, options, Path(work) / "builder.log", Path(work) / "cache")
        timings["builder_s"] = time.perf_counter() - t
        if scheme is not None and quantized is not None:
            t = time.perf_counter()
            emb = scheme.embedding_bits == 4
            progress("onnx: " + (f"embedding codes as GatherBlockQuantized int4, block {scheme.group_size}; "
                                 if emb else "") + "dropping default zero points")
            changed = prequant.finish_graph(out / "model.onnx", quantized.get("tok_embeddings.weight") if emb else None)
            timings["finish_graph_s"] = time.perf_counter() - t
    quant = describe_quantization(out / "model.onnx")
    quant["algorithm"] = scheme.algorithm if scheme is not None else None
    quant |= changed
    if scheme is not None:
        blocks = {k for k in quant["quantized_ops"] if f"block {scheme.group_size} " not in k}
        if blocks or not quant["quantized_ops"]:
            raise ExportError(f"the ONNX graph's quantized ops do not use block {scheme.group_size}: {sorted(blocks)}")
    return {"timings": timings, "quantization": quant}
