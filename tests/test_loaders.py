"""Every loader gives the logits transformers' LlamaForCausalLM gives for the same weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llamaship.errors import CheckpointError, UnsupportedError
from llamaship.export.llama.load import load_checkpoint
from llamaship.export.llama.model import build_model

TOL = 1e-4


def our_logits(ckpt, ids: list[int]) -> torch.Tensor:
    model = build_model(ckpt.spec, ckpt.state, max_context=64, full_logits=True)
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.tensor([0]))[0]


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0]


def assert_parity(ckpt, hf_model, ids: list[int]) -> None:
    diff = (our_logits(ckpt, ids) - hf_logits(hf_model, ids)).abs().max().item()
    assert diff <= TOL, f"max abs logit diff {diff:.2e} > {TOL}"


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_llama2_parity(layout, llama2_hf_dir, llama2_meta_dir, llama2_hf_model):
    ckpt = load_checkpoint(llama2_hf_dir if layout == "hf" else llama2_meta_dir)
    assert ckpt.layout == layout
    assert ckpt.spec.vocab_size == 32000 and ckpt.tokenizer.kind == "sentencepiece"
    assert (ckpt.spec.bos_id, ckpt.spec.eos_id) == (1, 2)
    ids = ckpt.tokenizer.encode("The capital of France is Paris, and Berlin is")
    assert ids[0] == 1  # Llama 2 prepends BOS
    assert_parity(ckpt, llama2_hf_model, ids)


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_llama3_gqa_rope_scaling_parity(layout, llama3_hf_dir, llama3_meta_dir, llama3_hf_model):
    ckpt = load_checkpoint(llama3_hf_dir if layout == "hf" else llama3_meta_dir)
    spec = ckpt.spec
    assert spec.vocab_size == 128256 and ckpt.tokenizer.kind == "tiktoken"
    assert spec.rope_scaling is not None and spec.rope_scaling.factor == 8.0
    assert (spec.n_heads, spec.n_kv_heads, spec.rope_theta) == (4, 2, 500000.0)
    assert spec.bos_id == 128000 and 128009 in spec.stop_ids and 128001 in spec.stop_ids
    ids = ckpt.tokenizer.encode("The capital of France is Paris, and Berlin is")
    assert ids[0] == 128000
    # long enough that scaled low frequencies matter: positions up to 60
    ids = (ids * 6)[:60]
    assert_parity(ckpt, llama3_hf_model, ids)


def test_hf_sharded_index_is_used(llama2_hf_dir):
    assert (llama2_hf_dir / "model.safetensors.index.json").exists()
    assert len(list(llama2_hf_dir.glob("*.safetensors"))) > 1


def test_gguf_parity(gguf_path, gguf_model):
    ckpt = load_checkpoint(gguf_path)
    assert ckpt.layout == "gguf" and ckpt.spec.tied_embeddings
    ids = ckpt.tokenizer.encode("The tower is 324 metres tall .")
    assert_parity(ckpt, gguf_model, ids)


def test_gguf_loader_matches_transformers_gguf_reader(gguf_path):
    """transformers reads the same GGUF independently (its own dequant and q/k un-permute)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    ckpt = load_checkpoint(gguf_path)
    assert_parity(ckpt, ref, list(range(5, 40)))


def test_smollm2_real_model_parity_and_answer(smollm2_gguf):
    """The embedded default: our GGUF loader vs transformers' GGUF loader, and the fp32 module's
    greedy answer to the fidelity prompt."""
    from transformers import AutoModelForCausalLM

    ckpt = load_checkpoint(smollm2_gguf)
    spec = ckpt.spec
    assert (spec.n_layers, spec.dim, spec.n_heads, spec.n_kv_heads, spec.vocab_size) == (
        30, 576, 9, 3, 49152
    )
    assert spec.eos_id == 2 and set(spec.stop_ids) >= {2} and not spec.add_bos
    ref = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    ids = ckpt.tokenizer.encode("The capital of France is")
    assert_parity(ckpt, ref, ids)
    model = build_model(spec, ckpt.state, max_context=64)
    out: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.tensor([0]))
        for i in range(3):
            out.append(int(logits.argmax()))
            logits = model(torch.tensor([[out[-1]]]), torch.tensor([len(ids) + i]))
    assert ckpt.tokenizer.decode(out).startswith(" Paris")


# --- bad input: clear errors naming the file -------------------------------------------------


def test_truncated_safetensors(tmp_path, llama2_hf_dir):
    bad = tmp_path / "ckpt"
    shutil.copytree(llama2_hf_dir, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=shard.name) as err:
        load_checkpoint(bad)
    assert "truncated or corrupt" in str(err.value)


def test_params_json_wrong_shapes(tmp_path, llama2_meta_dir):
    bad = tmp_path / "ckpt"
    shutil.copytree(llama2_meta_dir, bad)
    params = json.loads((bad / "params.json").read_text())
    params["dim"] = 128
    (bad / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="consolidated.00.pth.*shape"):
        load_checkpoint(bad)


def test_unknown_architecture(tmp_path, llama2_hf_dir):
    bad = tmp_path / "ckpt"
    shutil.copytree(llama2_hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mixtral", ["MixtralForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="mixtral.*not supported"):
        load_checkpoint(bad)


def test_missing_tokenizer(tmp_path, llama2_meta_dir):
    bad = tmp_path / "ckpt"
    shutil.copytree(llama2_meta_dir, bad)
    (bad / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.model is missing"):
        load_checkpoint(bad)


def test_pickle_with_code_is_refused(tmp_path, llama2_meta_dir):
    bad = tmp_path / "ckpt"
    shutil.copytree(llama2_meta_dir, bad)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"tok_embeddings.weight": Exploit()}, bad / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_hub_id_without_network_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not fetch 'meta-llama/Meta-Llama-3-8B'"):
        load_checkpoint("meta-llama/Meta-Llama-3-8B")
