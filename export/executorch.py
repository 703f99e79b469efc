"""Llama module -> quantized, XNNPACK-lowered ExecuTorch program (.pte).

The graph uses ExecuTorch's `llama::update_cache` / `llama::custom_sdpa` kernels for the KV cache
and attention, torchao's 8da4w group quantization for every linear (XNNPACK qd8 GEMMs), and a
quantized embedding. The .pte carries the metadata methods ExecuTorch's LLM runner reads
(`get_bos_id`, `get_eos_ids`, `get_max_seq_len`, ...), so the same C++ runner the Android app
links generates from it with no extra configuration.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from llamaship.bundle import work_dir
from llamaship.errors import ExportError, UnsupportedError
from llamaship.export.llama.model import Llama, build_model
from llamaship.export.llama.spec import ModelSpec
from llamaship.quantize.checkpoint import QuantizedCheckpoint
from llamaship.quantize.scheme import QuantScheme

OFFLOAD_PARAMS = 1_000_000_000
SPILL_MIN_BYTES = 1 << 20  # XNNPACK blobs from this size on go to files during an offloaded export


def load_custom_ops() -> None:
    """Registers llama::custom_sdpa / update_cache (eager kernels + the runtime's op table)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def runner_metadata(spec: ModelSpec, max_context: int, max_seq_len: int) -> dict[str, Any]:
    return {
        "get_bos_id": spec.bos_id if spec.bos_id is not None else -1,
        "get_eos_ids": list(spec.stop_ids) or ([spec.eos_id] if spec.eos_id is not None else []),
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_context,
        "get_n_layers": spec.n_layers,
        "get_vocab_size": spec.vocab_size,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
    }


def export_pte(
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    scheme: QuantScheme | None,
    out_path: Path,
    max_context: int = 2048,
    max_seq_len: int | None = None,
    full_logits: bool = False,
    progress: Callable[[str], None] = print,
    offload: bool | None = None,
    quantized: QuantizedCheckpoint | None = None,
) -> dict[str, float]:
    """Write the .pte to `out_path`; returns timings per stage (seconds).

    `max_seq_len` bounds the tokens of one forward call (the prefill chunk the runner feeds);
    `max_context` sizes the KV cache. `scheme=None` exports fp32 (the fidelity baseline).
    `offload` (default: for models of 1B parameters or more) keeps the quantized values in
    memory-mapped files beside `out_path` until the program is written (see
    `quantize.torchao_pack.offload_qdata`); they are deleted afterwards. `quantized` is the
    quantize stage's output; without it the stage runs here (uncalibrated algorithms only)."""
    if scheme is not None and not scheme.symmetric:
        raise UnsupportedError(
            "asymmetric 4-bit weights are not supported for ExecuTorch/XNNPACK: the lowered program "
            "computed wrong logits (87% of the logit range off on a test model); use symmetric groups, "
            "or export --format onnx alone (MatMulNBits handles zero points)"
        )
    load_custom_ops()
    max_seq_len = min(max_seq_len or max_context, max_context)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    on_loaded = None
    if offload is None:
        offload = spec.param_count() >= OFFLOAD_PARAMS
    offload_dir = work_dir(out_path.parent, "llamaship-weights") if offload else None
    try:
        with contextlib.ExitStack() as stack:
            if scheme is not None:
                from llamaship.quantize.stage import stage_output
                from llamaship.quantize.torchao_pack import PackingState, codes_packer

                scheme.check_fits(spec)
                quantized = stack.enter_context(stage_output(spec, state, scheme, quantized, out_path.parent, progress))
                progress(f"packing {scheme.name} ({scheme.algorithm} codes) as torchao tensors, block by block"
                         + (f" (values memory-mapped from {offload_dir})" if offload_dir else ""))
                on_loaded = codes_packer(quantized, scheme.activations, offload_dir=offload_dir)
                state = PackingState(quantized, state)
            model: Llama = build_model(spec, state, max_context=max_context, impl="executorch",
                                       full_logits=full_logits, on_loaded=on_loaded)
        timings["quantize_s"] = time.perf_counter() - t0
        with memory_bounded_lowering(offload_dir):
            return _lower(model, spec, out_path, max_context, max_seq_len, timings, progress)
    finally:
        if offload_dir is not None:
            shutil.rmtree(offload_dir, ignore_errors=True)


@contextmanager
def memory_bounded_lowering(folder: Path | None) -> Iterator[None]:
    """For an offloaded export (`folder` holds the memory-mapped values): lowering neither copies
    those values nor keeps XNNPACK's packed blobs in memory. Llama 3 8B's anonymous peak went from
    15.2 to 10.6 GiB; the program is byte-identical (tested)."""
    if folder is None:
        yield
        return
    with xnnpack_blobs_on_disk(folder), file_backed_constants_shared_in_deepcopy():
        yield


@contextmanager
def xnnpack_blobs_on_disk(folder: Path) -> Iterator[None]:
    """XNNPACK's preprocess copies each packed weight into a `bytes` blob and its NamedDataStore
    keeps every blob until the program is written (2.4 GiB for Llama 3 8B). ExecuTorch 1.5's
    serializer also takes `FileBackedData` blobs and streams them into the .pte in `write_to_file`,
    so each large blob goes to a file in `folder` as soon as it is made. ExecuTorch has no option
    for this, hence the subclass swapped into the XNNPACK backend for the duration of the export."""
    import executorch.backends.xnnpack.xnnpack_preprocess as xnnpack_preprocess
    from executorch.exir._serialize._cord import FileBackedData

    base = xnnpack_preprocess.NamedDataStore
    min_bytes, numbers = SPILL_MIN_BYTES, itertools.count()

    class SpillingNamedDataStore(base):  # type: ignore[misc, valid-type]
        def add_named_data(self, key: str, data: Any, alignment: int | None = 1,
                           external_tag: str | None = None, tensor_layout: Any = None) -> None:
            if isinstance(data, bytes) and len(data) >= min_bytes:
                path = folder / f"xnnpack-{next(numbers)}.bin"
                path.write_bytes(data)
                data = FileBackedData(str(path))
            super().add_named_data(key, data, alignment, external_tag, tensor_layout)

    xnnpack_preprocess.NamedDataStore = SpillingNamedDataStore
    try:
        yield
    finally:
        xnnpack_preprocess.NamedDataStore = base


SHARED_IN_DEEPCOPY: list[int] = []  # bytes each lowering shared instead of copying (tests read it)


@contextmanager
def file_backed_constants_shared_in_deepcopy() -> Iterator[None]:
    """Before XNNPACK's preprocess, ExecuTorch deep-copies every partition's ExportedProgram at once
    (`BackendDetails.copy_exported_program_for_preprocess`), which copies every constant into
    anonymous memory: one byte per parameter again for our memory-mapped 4-bit values (8 GB for
    8B). Preprocess only reads them, so during an offloaded export the copy shares file-backed
    tensors; the rest of the program is still copied. The hook is ExecuTorch's own, meant for
    backends to override."""
    import copy

    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from torch.export import ExportedProgram

    def sharing_copy(cls: Any, program: ExportedProgram, compile_specs: Any) -> ExportedProgram:
        memo: dict[int, Any] = {}
        shared = 0
        for t in [*program.state_dict.values(), *program.constants.values()]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().filename is not None:
                memo[id(t)] = t
                shared += t.untyped_storage().nbytes()
        SHARED_IN_DEEPCOPY.append(shared)
        return copy.deepcopy(program, memo)

    had_own = "copy_exported_program_for_preprocess" in XnnpackBackend.__dict__
    real = XnnpackBackend.__dict__.get("copy_exported_program_for_preprocess")
    XnnpackBackend.copy_exported_program_for_preprocess = classmethod(sharing_copy)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        if had_own:
            XnnpackBackend.copy_exported_program_for_preprocess = real  # type: ignore[method-assign]
        else:
            del XnnpackBackend.copy_exported_program_for_preprocess


# XNNPACK's preprocess runs 17 passes over every partition, each re-tracing it under fake tensors,
# whatever the graph holds. These rewrite only the named aten ops; when a partition holds none of
# them the pass cannot change it, so it is skipped. The program is byte-identical (tested).
PASSES_BY_OPS: dict[str, frozenset[str]] = {
    "ConvertToUpsampleBilinear2d": frozenset({"upsample_bilinear2d", "_unsafe_index", "index"}),
    "ConvertToSDPAPass": frozenset({"scaled_dot_product_attention", "_softmax", "bmm"}),
    "FuseBatchNormPass": frozenset({"native_batch_norm", "_native_batch_norm_legit_no_training"}),
    "DecomposeBatchNorm": frozenset({"native_batch_norm", "_native_batch_norm_legit_no_training"}),
    "FuseActivationPass": frozenset({"relu", "hardtanh"}),
    "DecomposeConcatenate": frozenset({"cat"}),
    "InsertPadQDQPass": frozenset({"constant_pad_nd"}),
    "Conv1dUnsqueezePass": frozenset({"convolution"}),
    "PReLUReshapePass": frozenset({"_prelu_kernel", "prelu"}),
    "RemoveRedundantCopyPass": frozenset({"_to_copy"}),
}


def aten_ops(graph: torch.fx.Graph) -> set[str]:
    """Base names of the aten ops in `graph` ("linear", "cat", ...)."""
    names = set()
    for node in graph.nodes:
        name = getattr(node.target, "name", None) if node.op == "call_function" else None
        qualified = name() if callable(name) else ""  # "aten::linear" (ATen and edge overloads alike)
        if isinstance(qualified, str) and qualified.startswith("aten::"):
            names.add(qualified.removeprefix("aten::"))
    return names


@contextmanager
def xnnpack_passes_that_apply() -> Iterator[None]:
    """XNNPACK's pass manager with the passes in `PASSES_BY_OPS` dropped for a partition holding
    none of their ops (`SKIPPED_PASSES` counts them). ExecuTorch builds the manager inside
    `XnnpackBackend.preprocess` with no way to pass a list, hence the subclass swapped in for the
    duration of the lowering."""
    import executorch.backends.xnnpack.xnnpack_preprocess as xnnpack_preprocess

    base = xnnpack_preprocess.XNNPACKPassManager

    class ApplicablePassManager(base):  # type: ignore[misc, valid-type]
        def __init__(self, exported_program: Any, passes: Any = None) -> None:
            super().__init__(exported_program, passes)
            present = aten_ops(exported_program.graph)
            kept = [p for p in self.passes if p.__name__ not in PASSES_BY_OPS or PASSES_BY_OPS[p.__name__] & present]
            SKIPPED_PASSES.append(len(self.passes) - len(kept))
            self.passes = kept

    xnnpack_preprocess.XNNPACKPassManager = ApplicablePassManager
    try:
        yield
    finally:
        xnnpack_preprocess.XNNPACKPassManager = base


SKIPPED_PASSES: list[int] = []  # per partition, how many passes could not apply (tests read it)


def one_decomposition_partitioner() -> Any:
    """XnnpackPartitioner whose ops to keep whole come without a per-node check. With the check,
    `to_edge_transform_and_lower` re-traces the whole program through two decompositions (its
    EDGE_DO_NOT_DECOMP path); without it, through one. Every op XNNPACK keeps whole here (linear)
    is delegated in our graphs, so the check had nothing to refuse: the program is byte-identical
    (tested) and the lowering of SmolLM2 re-traces the program once less."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class OneDecompositionXnnpackPartitioner(XnnpackPartitioner):  # type: ignore[misc]
        kept_whole: set[str] = set()  # base names of the ops kept whole ("linear")

        def ops_to_not_decompose(self, ep: Any) -> tuple[list[Any], None]:
            ops, _ = super().ops_to_not_decompose(ep)
            self.kept_whole = {op._opname for op in ops}
            return ops, None

    return OneDecompositionXnnpackPartitioner()


def _trace(model: Llama, spec: ModelSpec, max_seq_len: int) -> Any:
    from torch.export import Dim

    example = (torch.tensor([[1, 2]], dtype=torch.long), torch.tensor([0], dtype=torch.long))
    seq = Dim("seq_len", min=1, max=max_seq_len)
    try:
        with torch.no_grad():
            return torch.export.export(model, example, dynamic_shapes=({1: seq}, None), strict=False)
    except Exception as exc:
        raise ExportError(f"torch.export failed for {spec.name}: {exc}") from exc


def _lower(model: Llama, spec: ModelSpec, out_path: Path, max_context: int, max_seq_len: int,
           timings: dict[str, float], progress: Callable[[str], None]) -> dict[str, float]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import (
        EdgeCompileConfig,
        ExecutorchBackendConfig,
        to_edge_transform_and_lower,
    )
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    config = EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True)

    t0 = time.perf_counter()
    progress("tracing with torch.export")
    ep = _trace(model, spec, max_seq_len)
    timings["torch_export_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    progress("lowering to XNNPACK (to_edge_transform_and_lower)")
    metadata = runner_metadata(spec, max_context, max_seq_len)
    partitioner = one_decomposition_partitioner()
    with xnnpack_passes_that_apply():
        edge = to_edge_transform_and_lower(ep, partitioner=[partitioner], compile_config=config,
                                           constant_methods=metadata)
    left = aten_ops(edge.exported_program().graph) & partitioner.kept_whole
    if left:  # never seen: XNNPACK refused an op kept whole, which the per-node check would have decomposed
        progress(f"{sorted(left)} left outside XNNPACK; lowering again with the per-node check")
        edge = to_edge_transform_and_lower(_trace(model, spec, max_seq_len), partitioner=[XnnpackPartitioner()],
                                           compile_config=config, constant_methods=metadata)
    timings["lower_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    progress("serializing the ExecuTorch program")
    program = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )
    )
    with open(out_path, "wb") as f:
        program.write_to_file(f)
    timings["serialize_s"] = time.perf_counter() - t0
    return timings
