"""ExecuTorch Core ML delegate (.pte): the whole forward lowered into one Core ML program with the KV
cache as Core ML state, driven with the LLM runner's inputs. No Apple runtime runs here, so the
program is extracted from the .pte and executed by the MIL reference evaluator, against PyTorch:
fp16 against the fp32 module, int4 against the same torchao-quantized module in eager mode."""

from __future__ import annotations

import json

import pytest
import torch.nn.functional as F

from llamaship.export.coreml import describe_quantization
from llamaship.export.executorch_coreml import export_pte_coreml, extract_program
from llamaship.export.llama.model import build_model
from llamaship.targets.coreml_runtime import CoreMLPteModule
from tests.quant import TINY_SCHEME, packed_model
from tests.steps import DECODE, PROMPT, eager_steps, run_steps

CTX = 64


@pytest.fixture(scope="module")
def fp16_pte(tmp_path_factory, tiny_ckpt):
    out = tmp_path_factory.mktemp("etcm") / "fp16.pte"
    export_pte_coreml(tiny_ckpt.spec, tiny_ckpt.state, None, out, max_context=CTX, max_seq_len=16,
                      progress=lambda s: None)
    return out


@pytest.fixture(scope="module")
def int4_pte(tmp_path_factory, tiny_ckpt, tiny_codes):
    out = tmp_path_factory.mktemp("etcm") / "int4.pte"
    res = export_pte_coreml(tiny_ckpt.spec, tiny_ckpt.state, TINY_SCHEME, out, max_context=CTX,
                            max_seq_len=16, progress=lambda s: None, quantized=tiny_codes)
    return out, res


def test_whole_forward_is_one_core_ml_delegate(fp16_pte):
    from executorch.exir._serialize._program import deserialize_pte_binary

    plan = deserialize_pte_binary(fp16_pte.read_bytes()).program.execution_plan[0]
    assert [d.id for d in plan.delegates] == ["CoreMLBackend"]
    assert len(plan.chains[0].instructions) == 1  # the delegate call and nothing around it


def test_fp16_program_matches_module_through_state(tiny_ckpt, fp16_pte):
    ref = eager_steps(build_model(tiny_ckpt.spec, tiny_ckpt.state, max_context=CTX))
    module = CoreMLPteModule(fp16_pte)
    got = run_steps(module.forward)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        assert (g - r).abs().max().item() <= 0.02 * r.abs().max().item()  # fp16 throughout
        assert F.cosine_similarity(g, r).item() > 0.9999
    module.reset()  # the state carries the context: without it the decode logits differ
    assert (module.forward([DECODE[0]], len(PROMPT)) - got[1]).abs().max().item() > 1e-3


def test_int4_program_is_the_torchao_quantized_module(tiny_ckpt, int4_pte, tiny_codes):
    """coremltools must carry torchao's int4 groups over unchanged: the program agrees with the
    quantized module (eager, fp32) to fp16 tolerance, and is far from the float module."""
    pte, res = int4_pte
    quantized = packed_model(tiny_ckpt.spec, tiny_ckpt.state, tiny_codes, CTX, "none").eval()
    want = eager_steps(quantized)
    fp32 = eager_steps(build_model(tiny_ckpt.spec, tiny_ckpt.state, max_context=CTX))
    got = run_steps(CoreMLPteModule(pte).forward)
    for g, w, f in zip(got, want, fp32, strict=True):
        assert F.cosine_similarity(g, w).item() > 0.9999
        assert (g - w).abs().max().item() <= 0.02 * w.abs().max().item()
        assert (g - f).abs().max().item() > 10 * (g - w).abs().max().item()


def test_int4_program_stores_requested_blocks(tiny_ckpt, int4_pte, tmp_path):
    pte, res = int4_pte
    quant = describe_quantization(extract_program(pte, tmp_path))
    assert quant == res["quantization"]
    linear = [w for w in quant["weights"] if w["feeds"] == ["linear"]]
    body = [w for w in linear if w["dtype"] == "int4"]
    assert len(body) == 7 * tiny_ckpt.spec.n_layers
    assert all(w["block"] == 32 and w["symmetric"] for w in body)  # the stage's symmetric codes
    head = [w for w in linear if w["dtype"] == "int8"]  # lm_head at 8 bits per row, as the scheme says
    assert len(head) == 1 and head[0]["shape"][0] == tiny_ckpt.spec.vocab_size
    emb = [w for w in quant["weights"] if w["feeds"] == ["gather"]]
    assert len(emb) == 1 and emb[0]["dtype"] == "int4" and emb[0]["block"] == 32
    assert quant["float_params"] < 10_000


def test_cli_bundle_gated_by_apple_profile(tmp_path, gguf_path):
    from llamaship.cli import main

    out = tmp_path / "b"
    assert main(["export", "--model", str(gguf_path), "--out", str(out), "--format", "executorch_coreml",
                 "--target", "apple", "--eval-tokens", "256", "--max-context", "128"]) in (0, 7)
    manifest = json.loads((out / "manifest.json").read_text())
    (art,) = manifest["artifacts"]
    assert art["format"] == "executorch_coreml" and art["path"] == "model_coreml.pte"
    assert set(art["inputs"]) == {"tokens", "input_pos"} and set(art["states"]) == {"k_cache", "v_cache"}
    assert art["smoke_test"]["runtime"].startswith("MIL reference evaluator")
    report = json.loads((out / "report.json").read_text())
    assert report["artifacts"][0]["accuracy"]["scored_tokens"] > 0
    (target,) = report["targets"]
    assert target["profile"] == "apple" and target["artifact"] == "model_coreml.pte"
    assert target["ships"].startswith("opt-in") and "- ships: opt-in" in (out / "report.md").read_text()
    assert main(["verify", str(out)]) == 0
    assert main(["generate", str(out), "--format", "executorch_coreml", "--prompt", "The tower",
                 "--max-new-tokens", "3", "--json"]) == 0
    bad = tmp_path / "bad"
    assert main(["export", "--model", str(gguf_path), "--out", str(bad), "--format", "executorch_coreml",
                 "--quant", "8da8w"]) == 3
    assert not bad.exists()
