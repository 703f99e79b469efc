"""`.pte` for ExecuTorch's XNNPACK backend: the CPU artifact every profile ships."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llamaship.backends.base import Backend, Exported, ExportJob, Generated, Module, Request
from llamaship.errors import UnsupportedError
from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.storage import XNNPACK

PTE = "model.pte"


class ExecuTorch(Backend):
    name = "executorch"
    help = ".pte for ExecuTorch's XNNPACK backend, run here by ExecuTorch's C++ LLM runner"
    packages = ("executorch",)
    weights = ("the quantize stage's codes exactly (XNNPACK int4 blocks, the lm_head int8 per channel); "
               "block scales rounded to bf16 by XNNPACK; symmetric schemes only")
    storage = XNNPACK
    runtime = "ExecuTorch's runtime"
    eval_s_per_token_8b = 0.16  # the .pte token by token, measured 0.156
    cpu_reference = True
    can_export_in_background = True

    def check(self, scheme: QuantScheme | None, options: Mapping[str, Any]) -> None:
        if scheme is not None and not scheme.symmetric:
            raise UnsupportedError(
                "asymmetric 4-bit weights are not supported for ExecuTorch/XNNPACK (the lowered program "
                "computed wrong logits on a test model); use symmetric groups, or --format onnx alone"
            )

    def _entry(self, job: ExportJob, max_seq_len: int) -> dict[str, Any]:
        return {
            "format": self.name, "path": PTE, "backend": "xnnpack",
            "scheme": job.scheme.name if job.scheme else "fp32",
            "max_context": job.max_context, "max_seq_len": max_seq_len, "full_logits": False,
            "inputs": {"tokens": "int64 [1, T]", "input_pos": "int64 [1]"},
            "outputs": {"logits": "float32 [1, vocab] (last position)"},
        }

    def export(self, job: ExportJob) -> Exported:
        from llamaship.export.executorch import export_pte

        seq = min(job.max_seq_len, job.max_context)
        t = export_pte(job.ckpt.spec, job.ckpt.state, job.scheme, job.folder / PTE, max_context=job.max_context,
                       max_seq_len=seq, progress=job.progress, quantized=job.quantized)
        return Exported(self._entry(job, seq), t)

    def export_in_background(self, job: ExportJob, stack: Any) -> Exported:
        """Single-threaded lowering in a child: the other formats (and their accuracy) use the other core."""
        from llamaship.export.executorch_background import BackgroundPteExport

        seq = min(job.max_seq_len, job.max_context)
        child = stack.enter_context(BackgroundPteExport(job.ckpt.source, job.scheme, job.folder / PTE,
                                                        max_context=job.max_context, max_seq_len=seq,
                                                        progress=job.progress,
                                                        quantized=job.quantized and job.quantized.folder))
        return Exported(self._entry(job, seq), wait=child.wait)

    def load_module(self, folder: Path, art: Mapping[str, Any]) -> Module:
        from llamaship.targets.executorch_runtime import PteModule

        return PteModule(folder / art["path"])

    def generate(self, req: Request) -> Generated:
        from llamaship.bundle import bundle_path
        from llamaship.targets.executorch_runtime import generate

        gen = generate(req.folder / req.art["path"], bundle_path(req.folder, req.tokenizer.get("path")), req.prompt,
                       max_new_tokens=req.max_new_tokens, temperature=req.temperature, num_bos=req.num_bos,
                       on_text=req.on_text)
        rates = {"ttft_ms": gen.ttft_ms, "prefill_token_per_sec": gen.prefill_tok_s,
                 "decode_token_per_sec": gen.decode_tok_s}
        stats = gen.stats if req.smoke else gen.stats | rates
        where = "executorch TextLLMRunner (x86_64 host)" if req.smoke else "ExecuTorch runner on this host"
        return Generated(gen.text, stats, where)

    def speed(self, folder: Path, art: Mapping[str, Any], manifest: Mapping[str, Any], ckpt: Any,
              prompt_ids: list[int], n_gen: int) -> dict[str, Any]:
        from llamaship.targets.speed import benchmark

        spec = ckpt.spec
        return benchmark(folder / art["path"], folder / manifest["tokenizer"]["path"],
                         ckpt.tokenizer.decode(prompt_ids), gen_tokens=n_gen,
                         num_bos=1 if spec.add_bos and spec.bos_id is not None else 0)
