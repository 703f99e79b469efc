"""`model_coreml.pte`: the ExecuTorch Core ML delegate, one Core ML program with the KV cache as
state, driven like the XNNPACK .pte. Validated here through its extracted program."""

from __future__ import annotations

import dataclasses

from llamaship.backends.base import Exported, ExportJob
from llamaship.backends.coreml import CoreMLBase, state_entry
from llamaship.quantize.storage import COREML

PTE = "model_coreml.pte"


class ExecuTorchCoreML(CoreMLBase):
    name = "executorch_coreml"
    help = ("model_coreml.pte: the ExecuTorch Core ML delegate, one Core ML program with the KV cache as "
            "state, driven like the XNNPACK .pte; int4 weight-only groups, fp16; needs an ExecuTorch build "
            "with Core ML state support; validated through its extracted program")
    weights = ("the quantize stage's codes exactly (torchao int4 groups carried into constexpr_blockwise_shift_scale); "
               "scales rounded to fp16")
    storage = dataclasses.replace(COREML, measured=False)  # torchao's int4 groups, as the .mlpackage stores them
    runtime = ("its Core ML program (extracted from the .pte) on Core ML on macOS, else the MIL reference "
               "evaluator (NumPy)")

    def export(self, job: ExportJob) -> Exported:
        from llamaship.export.coreml_common import MIN_TARGET
        from llamaship.export.executorch_coreml import export_pte_coreml, scheme_name

        spec = job.ckpt.spec
        seq = min(job.max_seq_len, job.max_context - 1)
        res = export_pte_coreml(spec, job.ckpt.state, job.scheme, job.folder / PTE, max_context=job.max_context,
                                max_seq_len=seq, progress=job.progress, quantized=job.quantized)
        entry = {
            "format": self.name, "path": PTE, "scheme": scheme_name(job.scheme),
            "backend": f"ExecuTorch Core ML delegate (one Core ML program, {MIN_TARGET}+ / macOS 15+, "
                       "fp16 compute)",
            "max_context": job.max_context, "max_seq_len": seq, "full_logits": False,
            "inputs": {"tokens": f"int64 [1, T], 1 <= T <= {seq}",
                       "input_pos": "int64 [T] (start, start + 1, ...)"},
            "states": state_entry(spec, job.max_context),
            "outputs": {"logits": "float16 [1, vocab] (last position)"},
            "usage": "ExecuTorch Module / LLM runner with the Core ML backend linked; the KV cache lives in "
                     "the delegate as Core ML state, so the runtime must be built with Core ML state "
                     "support (pytorch/executorch issue 21855: the pip macOS pybind runtime is not)",
            "quantization": res["quantization"],
        }
        return Exported(entry, res["timings"])
