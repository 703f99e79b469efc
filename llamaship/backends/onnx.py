"""An onnxruntime-genai model folder: model.onnx (MatMulNBits int4 + GroupQueryAttention) with its
weights as external data, genai_config.json and the tokenizer files."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llamaship.backends.base import Backend, Exported, ExportJob, Generated, Module, Request
from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.storage import MATMULNBITS

FOLDER = "onnx"
ACCURACY_LEVEL_HELP = {4: "int8 (default, fastest on CPU)", 3: "bf16", 2: "fp16",
                       1: "fp32 (measured 16x slower decode on x86 for KLD 0.138 vs 0.140 on SmolLM2)"}


class Onnx(Backend):
    name = "onnx"
    help = ("onnxruntime-genai folder: model.onnx + external data + genai_config.json, run here by "
            "onnxruntime and onnxruntime-genai")
    packages = ("onnx", "onnxruntime", "onnxruntime-genai")
    weights = ("the quantize stage's codes exactly, as unsigned nibbles q + 8 with fp32 scales, zero points stored "
               "for asymmetric blocks only (a symmetric block's 8 is MatMulNBits' default); an int8 per-channel "
               "lm_head is stored per block, its scale repeated")
    storage = MATMULNBITS
    runtime = "onnxruntime (CPU EP)"
    eval_s_per_token_8b = 0.27  # measured 0.27 beside another job
    disk_factor = 1.4  # fp32 scales (and zero points when asymmetric)

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        from llamaship.export.onnx import ACCURACY_LEVELS, DEFAULT_ACCURACY_LEVEL

        levels = ", ".join(f"{k} = {ACCURACY_LEVEL_HELP.get(k, v)}" for k, v in sorted(ACCURACY_LEVELS.items(),
                                                                                        reverse=True))
        parser.add_argument("--onnx-accuracy-level", type=int, default=DEFAULT_ACCURACY_LEVEL,
                            choices=sorted(ACCURACY_LEVELS),
                            help=f"onnx: compute type of MatMulNBits activations: {levels}")

    @staticmethod
    def _level(options: Mapping[str, Any]) -> int:
        from llamaship.export.onnx import DEFAULT_ACCURACY_LEVEL

        return int(options.get("onnx_accuracy_level", DEFAULT_ACCURACY_LEVEL))

    def check(self, scheme: QuantScheme | None, options: Mapping[str, Any]) -> None:
        from llamaship.export.onnx import builder_options

        builder_options(scheme, self._level(options))

    def export(self, job: ExportJob) -> Exported:
        from llamaship.export.onnx import export_onnx, scheme_name

        level = self._level(job.options)
        spec = job.ckpt.spec
        res = export_onnx(spec, job.ckpt.state, job.ckpt.tokenizer, job.scheme, job.folder / FOLDER,
                          max_context=job.max_context, accuracy_level=level, progress=job.progress,
                          quantized=job.quantized)
        entry = {
            "format": self.name, "path": f"{FOLDER}/model.onnx", "folder": FOLDER,
            "scheme": scheme_name(job.scheme, level),
            "backend": "onnxruntime CPU (onnxruntime-genai config)", "max_context": job.max_context,
            "max_seq_len": job.max_context,  # prefill takes the whole prompt in one call
            "external_data": f"{FOLDER}/model.onnx.data", "genai_config": f"{FOLDER}/genai_config.json",
            "accuracy_level": level if job.scheme else None,
            "inputs": {"input_ids": "int64 [1, T]", "attention_mask": "int64 [1, past + T] (all ones)",
                       "past_key_values.{i}.key/value": f"float32 [1, {spec.n_kv_heads}, past, {spec.head_dim}]"},
            "outputs": {"logits": "float32 [1, 1, vocab] (last position)",
                        "present.{i}.key/value": f"float32 [1, {spec.n_kv_heads}, past + T, {spec.head_dim}]"},
            "quantization": res["quantization"],
        }
        return Exported(entry, res["timings"])

    def load_module(self, folder: Path, art: Mapping[str, Any]) -> Module:
        from llamaship.targets.onnx_runtime import OnnxModule

        return OnnxModule(folder / art["folder"])

    def generate(self, req: Request) -> Generated:
        from llamaship.errors import UnsupportedError
        from llamaship.targets.onnx_runtime import generate_text

        if req.temperature != 0.0:
            raise UnsupportedError(f"--temperature is not supported for {self.name} yet (greedy only)")
        bos = req.tokenizer.get("bos_id") if req.num_bos else None
        text, stats = generate_text(req.folder / req.art["folder"], req.prompt, req.max_new_tokens,
                                    on_text=req.on_text, bos_id=bos)
        where = "onnxruntime-genai Generator (x86_64 host)" if req.smoke else "onnxruntime-genai on this host"
        return Generated(text, stats, where)

    def speed(self, folder: Path, art: Mapping[str, Any], manifest: Mapping[str, Any], ckpt: Any,
              prompt_ids: list[int], n_gen: int) -> dict[str, Any]:
        from llamaship.targets.speed import benchmark_onnx

        spec = ckpt.spec
        bos = [spec.bos_id] if spec.add_bos and spec.bos_id is not None else []
        return benchmark_onnx(folder / art["folder"], bos + prompt_ids, gen_tokens=n_gen)
