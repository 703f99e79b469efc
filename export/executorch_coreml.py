"""ExecuTorch with the Core ML delegate: a .pte whose whole forward is one Core ML program (iOS 18 /
macOS 15, fp16 compute, KV cache held as Core ML state inside the delegate), driven through
ExecuTorch's LLM-runner interface (`tokens` [1, T], `input_pos` [T]) like the XNNPACK .pte.

Why a third Core ML-shaped forward: the .mlpackage (export/coreml.py) takes positions from a mask
width because a jit-traced Core ML program cannot index with a value read from a tensor; through
torch.export the start position is an unbacked SymInt (`input_pos[0].item()`), which coremltools
lowers to a runtime `slice_update` begin, so the cache write needs no mask trick and the program
keeps the runner's inputs. Cache writes by `index_put` with a T-long index do not convert
(coremltools' whole-slice path squeezes the index to a scalar).

The weights are the quantize stage's codes as torchao tensors (int4 weight-only per group;
embedding and lm_head per the scheme), and coremltools turns torchao's `dequantize_affine` into
`constexpr_blockwise_shift_scale`, the same storage the .mlpackage uses; done this way rather than
with the delegate's `op_linear_quantizer_config` because that applies one config to every linear
(it would put the lm_head at 4 bits) and leaves an untied embedding in fp16.

Runs on: an ExecuTorch runtime built with the Core ML backend *and* Core ML state support (iOS 18+,
macOS 15+). Not every build has that: pytorch/executorch issue 21855 reports the pip macOS pybind
runtime declining state inputs ("must be an MLState"). No Apple runtime exists here, so the program
is validated by extracting it from the .pte and running it through the MIL reference evaluator.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from llamaship.errors import ExportError
from llamaship.export.coreml_common import MASK_MIN, MIN_TARGET, StatefulLlama
from llamaship.export.llama.model import Llama, build_model
from llamaship.export.llama.spec import ModelSpec
from llamaship.quantize.checkpoint import QuantizedCheckpoint
from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.stage import stage_output


class CoreMLRunnerLlama(StatefulLlama):
    """Positions from `input_pos`, as ExecuTorch's runner feeds them; the mask rows come from a buffer."""

    def __init__(self, model: Llama) -> None:
        super().__init__(model)
        i = torch.arange(model.max_context)
        # row p: what the query at absolute position p may see of the whole cache
        self.register_buffer("mask_rows", torch.where(i[None, :] <= i[:, None], 0.0, MASK_MIN),
                             persistent=False)
        for layer in model.layers:  # the wrapped module's own caches are not used by this forward
            for name in ("k_cache", "v_cache"):
                layer.attention._buffers.pop(name, None)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        m = self.model
        seqlen = tokens.shape[1]
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + seqlen <= m.max_context)
        cos, sin = m.rope_cos[input_pos], m.rope_sin[input_pos]
        mask = self.mask_rows[input_pos][None, None]
        return self.layers_forward(tokens, seqlen, cos, sin, mask, start, None)


def scheme_name(scheme: QuantScheme | None) -> str:
    if scheme is None:
        return "fp16"
    emb = f"-emb{scheme.embedding_bits}" if scheme.embedding_bits else "-embfp16"
    head = f"-head{scheme.lm_head_bits}" if scheme.lm_head_bits else "-headfp16"
    asym = "" if scheme.symmetric else "-asym"
    return f"w{scheme.bits}-g{scheme.group_size}-{scheme.algorithm}{asym}{emb}{head}-fp16"


def build_runner_module(spec: ModelSpec, state: Mapping[str, torch.Tensor], quantized: QuantizedCheckpoint | None,
                        max_context: int) -> CoreMLRunnerLlama:
    """The module that is exported, with the quantize stage's codes as weight-only torchao
    tensors (also the tests' reference)."""
    if quantized is None:
        return CoreMLRunnerLlama(build_model(spec, state, max_context=max_context, impl="torch").eval()).eval()
    from llamaship.quantize.torchao_pack import PackingState, codes_packer

    model = build_model(spec, PackingState(quantized, state), max_context=max_context, impl="torch",
                        on_loaded=codes_packer(quantized, "none"))
    return CoreMLRunnerLlama(model.eval()).eval()


def export_pte_coreml(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], scheme: QuantScheme | None, out: Path,
    max_context: int, max_seq_len: int, progress: Callable[[str], None] = print,
    quantized: QuantizedCheckpoint | None = None,
) -> dict[str, Any]:
    """Write `out` (.pte, one Core ML delegate). Returns timings and the quantization read back
    from the delegate's program. `quantized` is the quantize stage's output; without it the
    stage runs here."""
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from torch.export import Dim

    if not 1 <= max_seq_len < max_context:
        # torch.export specializes a prompt that fills the whole cache (T == max_context); such a
        # prompt leaves no room to generate anyway
        raise ExportError(f"max_seq_len {max_seq_len} must be below the context {max_context} for this format")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if scheme is not None:
            quantized = stack.enter_context(stage_output(spec, state, scheme, quantized, out.parent, progress))
        module = build_runner_module(spec, state, quantized if scheme is not None else None, max_context)
    if scheme is not None:
        timings["quantize_s"] = time.perf_counter() - t
        progress(f"packed the {scheme.algorithm} codes as torchao tensors: {scheme_name(scheme)}")
    t = time.perf_counter()
    progress("torch.export of the Core ML forward (dynamic prompt length)")
    seq = Dim("T", min=1, max=max_seq_len)
    example = (torch.zeros((1, 2), dtype=torch.long), torch.arange(2))
    try:
        with torch.no_grad():
            ep = torch.export.export(module, example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)
    except Exception as exc:
        raise ExportError(f"torch.export of the Core ML forward failed for {spec.name}: {exc}") from exc
    timings["export_s"] = time.perf_counter() - t
    t = time.perf_counter()
    progress("lowering to the ExecuTorch Core ML delegate (coremltools conversion, fp16, iOS 18)")
    specs = CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=getattr(ct.target, MIN_TARGET), compute_precision=ct.precision.FLOAT16)
    try:
        edge = to_edge_transform_and_lower(
            ep, partitioner=[CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=True)],
            compile_config=EdgeCompileConfig(_check_ir_validity=False))
        outside = [str(n.target) for n in edge.exported_program().graph.nodes
                   if n.op == "call_function" and "executorch_call_delegate" not in str(n.target)
                   and "getitem" not in str(n.target)]
        if outside:  # a partial delegation would run the rest on portable CPU kernels, slowly
            raise ExportError(f"{len(outside)} ops were not delegated to Core ML: {sorted(set(outside))[:5]}")
        program = edge.to_executorch()
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"lowering {spec.name} to the Core ML delegate failed: {exc}") from exc
    timings["lower_s"] = time.perf_counter() - t
    out.write_bytes(program.buffer)
    with tempfile.TemporaryDirectory(prefix="llamaship-cm-") as tmp:
        from llamaship.export.coreml import describe_quantization

        quant = describe_quantization(extract_program(out, Path(tmp)))
    if scheme is not None:
        linear = [w for w in quant["weights"] if w["feeds"] == ["linear"]]
        body = [w for w in linear if w["dtype"] == f"int{scheme.bits}" and w["block"] == scheme.group_size]
        if len(body) < 7 * spec.n_layers:
            raise ExportError(f"{out}: {len(body)} linear weights are int{scheme.bits} block "
                              f"{scheme.group_size}, expected {7 * spec.n_layers}")
    return {"timings": timings, "quantization": quant}


def extract_program(pte: Path, dest: Path) -> Path:
    """The Core ML program inside the .pte's delegate, as an .mlpackage under `dest`."""
    from executorch.examples.apple.coreml.scripts.extract_coreml_models import extract_coreml_models

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints where it wrote
            paths = extract_coreml_models(Path(pte).read_bytes(), dest)
    except Exception as exc:
        raise ExportError(f"{pte}: cannot read its Core ML delegate ({exc})") from exc
    if len(paths) != 1:
        raise ExportError(f"{pte}: expected one Core ML delegate, found {len(paths)}")
    package = paths[0] / "lowered_module" / "model.mlpackage"
    if not package.is_dir():
        raise ExportError(f"{pte}: its Core ML delegate holds no model.mlpackage")
    return package
