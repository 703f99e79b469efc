"""The .pte, executed by ExecuTorch's runtime on this host, against the PyTorch module it came from.

Tolerances: fp32 .pte vs fp32 module max |Δlogit| <= 1e-4 (same math, different kernels);
8da4w .pte vs the torchao-quantized eager module <= 3% of the logit range and the same top-1 on
all but one step (XNNPACK's qd8 kernels round dynamic activations slightly differently from
torchao's reference; measured ~1.1%), and vs fp32 cosine >= 0.9 (4-bit error on a random tiny
model with flat logits; measured 0.92-0.95).
"""

from __future__ import annotations

import pytest
import torch

from llamaship.export.executorch import export_pte
from llamaship.export.llama.model import build_model
from llamaship.quantize.scheme import QuantScheme
from llamaship.targets.executorch_runtime import PteModule, generate
from tests.quant import TINY_SCHEME, packed_model
from tests.steps import eager_steps, run_steps


def test_fp32_pte_matches_module(tiny_ckpt, tiny_fp32_pte):
    pte = PteModule(tiny_fp32_pte)
    got = run_steps(pte.forward)
    ref = eager_steps(build_model(tiny_ckpt.spec, tiny_ckpt.state, max_context=128))
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape == (1, tiny_ckpt.spec.vocab_size)
        assert (g - r).abs().max().item() <= 1e-4


def test_quantized_pte_matches_quantized_module(tiny_ckpt, tiny_q_pte, tiny_codes):
    got = run_steps(PteModule(tiny_q_pte).forward)
    qmodel = packed_model(tiny_ckpt.spec, tiny_ckpt.state, tiny_codes, 128, "int8_dynamic")
    ref_q = eager_steps(qmodel)
    ref = eager_steps(build_model(tiny_ckpt.spec, tiny_ckpt.state, max_context=128))
    agree = 0
    for g, rq, r in zip(got, ref_q, ref, strict=True):
        span = (rq.max() - rq.min()).item()
        assert (g - rq).abs().max().item() <= 0.03 * span
        assert torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0) >= 0.9
        agree += int(g.argmax() == rq.argmax())
    assert agree >= len(got) - 1


def test_quantized_pte_is_smaller(tiny_fp32_pte, tiny_q_pte):
    assert tiny_q_pte.stat().st_size < 0.5 * tiny_fp32_pte.stat().st_size


def test_runner_metadata(tiny_ckpt, tiny_q_pte):
    pte = PteModule(tiny_q_pte)
    assert pte.metadata("get_bos_id") == tiny_ckpt.spec.bos_id
    assert pte.metadata("get_max_seq_len") == 128
    assert pte.metadata("get_vocab_size") == tiny_ckpt.spec.vocab_size


def test_runner_generates_with_stats(tiny_ckpt, tiny_q_pte, tiny_codes, tmp_path):
    tok = tiny_ckpt.tokenizer.write_runner_file(tmp_path)
    prompt = "The tower is tall"
    gen = generate(tiny_q_pte, tok, prompt, max_new_tokens=8)
    assert gen.stats["prompt_tokens"] == len(tiny_ckpt.tokenizer.encode(prompt))
    assert 1 <= gen.stats["generated_tokens"] <= 8
    # rates are there (a 2-layer toy runs below the runner's 1 ms clock, so they may read 0)
    assert {"inference_start_ms", "inference_end_ms", "model_load_end_ms"} <= gen.stats.keys()
    # greedy generation is what the quantized eager model predicts, token by token
    qmodel = packed_model(tiny_ckpt.spec, tiny_ckpt.state, tiny_codes, 128, "int8_dynamic")
    ids = tiny_ckpt.tokenizer.encode(prompt)
    with torch.no_grad():
        first = int(qmodel(torch.tensor([ids]), torch.tensor([0])).argmax())
    assert gen.text.startswith(tiny_ckpt.tokenizer.decode([first])) or first in tiny_ckpt.spec.stop_ids


def test_group_size_must_divide(tiny_ckpt, tmp_path):
    from llamaship.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="group size 128 does not divide.*use --group-size 32 or 64"):
        export_pte(tiny_ckpt.spec, tiny_ckpt.state, QuantScheme(group_size=128), tmp_path / "x.pte",
                   max_context=128, progress=lambda s: None)


def test_asymmetric_is_refused_for_xnnpack(tiny_ckpt, tmp_path):
    """XNNPACK computed wrong logits for asymmetric int4 groups (measured), so it is refused."""
    from llamaship.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="asymmetric"):
        export_pte(tiny_ckpt.spec, tiny_ckpt.state, QuantScheme(symmetric=False), tmp_path / "x.pte",
                   max_context=128, progress=lambda s: None)


def test_fast_lowering_writes_the_stock_program(tiny_ckpt, tiny_q_pte, tmp_path, monkeypatch, tiny_codes):
    """The lowering skips XNNPACK passes that cannot apply and one whole-program decomposition;
    the stock `XnnpackPartitioner` with every pass must write the very same bytes."""
    import contextlib

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    import llamaship.export.executorch as executorch_export

    assert sum(executorch_export.SKIPPED_PASSES) > 0  # the tiny_q_pte export did skip passes

    def stock() -> XnnpackPartitioner:
        part = XnnpackPartitioner()
        part.kept_whole = set()
        return part

    monkeypatch.setattr(executorch_export, "one_decomposition_partitioner", stock)
    monkeypatch.setattr(executorch_export, "xnnpack_passes_that_apply", contextlib.nullcontext)
    path = tmp_path / "stock.pte"
    export_pte(tiny_ckpt.spec, tiny_ckpt.state, TINY_SCHEME, path, max_context=128, progress=lambda s: None,
               quantized=tiny_codes)
    assert path.read_bytes() == tiny_q_pte.read_bytes()


def test_aten_ops_names_what_stays_outside_the_delegate():
    graph = torch.fx.symbolic_trace(torch.nn.Linear(4, 4)).graph
    traced = torch.export.export(torch.nn.Linear(4, 4), (torch.ones(1, 4),)).graph
    from llamaship.export.executorch import aten_ops

    assert aten_ops(graph) == set()  # call_module, not aten
    assert aten_ops(traced) == {"linear"}


def test_background_export_reports_the_childs_error_and_leaves_nothing(tmp_path):
    """The .pte export process fails (here: no checkpoint at its source): the parent gets the same
    error class with its message, and nothing is written."""
    from llamaship.errors import CheckpointError
    from llamaship.export.executorch_background import BackgroundPteExport

    lines: list[str] = []
    with BackgroundPteExport(tmp_path / "missing", QuantScheme(), tmp_path / "model.pte", max_context=128,
                             max_seq_len=32, progress=lines.append) as job:
        with pytest.raises(CheckpointError, match="missing"):
            job.wait()
    assert list(tmp_path.iterdir()) == []
