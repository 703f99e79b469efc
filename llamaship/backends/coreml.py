"""A stateful Core ML `.mlpackage` (iOS 18 / macOS 15): int4 per-block weights with a zero point,
fp16 compute, the KV cache as Core ML state. Without a Mac it runs on the MIL reference evaluator."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llamaship.backends.base import Backend, Exported, ExportJob, Generated, Module, NotRunnableHere, Request, greedy
from llamaship.errors import RuntimeFailure, UnsupportedError
from llamaship.quantize.scheme import QuantScheme
from llamaship.quantize.storage import COREML

PACKAGE = "model.mlpackage"
NO_APPLE_HARDWARE = "not measured (no Apple hardware here); the Apple profile reports the bandwidth roofline"


def check_4bit(name: str, scheme: QuantScheme | None) -> None:
    if scheme is not None and scheme.bits != 4:
        raise UnsupportedError(f"--format {name} stores 4-bit per-block weights; {scheme.name} is not "
                               "supported (use --quant 8da4w or fp32)")


def state_entry(spec: Any, max_context: int) -> dict[str, str]:
    cache = f"float16 [{spec.n_layers}, {spec.n_kv_heads}, {max_context}, {spec.head_dim}]"
    return {"k_cache": cache, "v_cache": cache}


class CoreMLBase(Backend):
    """What both Core ML routes share: 4-bit or fp16, run by Core ML on a Mac or the evaluator here."""

    speed_elsewhere = NO_APPLE_HARDWARE
    eval_s_per_token_8b = 0.9  # the evaluator, its linears through MatMulNBits: 0.86 measured over a 512 window

    def check(self, scheme: QuantScheme | None, options: Mapping[str, Any]) -> None:
        check_4bit(self.name, scheme)

    def load_module(self, folder: Path, art: Mapping[str, Any]) -> Module:
        from llamaship.targets.coreml_runtime import load_module

        return load_module(folder / art["path"], self.name)

    def generate(self, req: Request) -> Generated:
        from llamaship.targets.coreml_runtime import runtime_name

        try:
            module = self.load_module(req.folder, req.art)
        except RuntimeFailure as exc:  # too large for the evaluator here: the artifact is still good
            raise NotRunnableHere(str(exc)) from exc
        return greedy(module, req, runtime_name())


class CoreML(CoreMLBase):
    name = "coreml"
    help = ("stateful .mlpackage, iOS 18 / macOS 15, int4 per-block weights (the quantize stage's codes), fp16 "
            "compute; validated on Linux by the MIL reference evaluator")
    weights = ("the quantize stage's codes exactly (constexpr_blockwise_shift_scale int4/int8 data, an offset "
               "only when asymmetric); scales rounded to fp16")
    storage = COREML
    runtime = "Core ML on macOS, else the MIL reference evaluator (torch CPU)"

    def export(self, job: ExportJob) -> Exported:
        from llamaship.export.coreml import export_coreml
        from llamaship.export.coreml_common import MIN_TARGET

        spec, scheme = job.ckpt.spec, job.scheme
        seq = min(job.max_seq_len, job.max_context)
        res = export_coreml(spec, job.ckpt.state, scheme, job.folder / PACKAGE, max_context=job.max_context,
                            max_seq_len=seq, progress=job.progress, quantized=job.quantized)
        entry = {
            "format": self.name, "path": PACKAGE,
            "scheme": (f"w4-g{scheme.group_size}-{scheme.algorithm}{'' if scheme.symmetric else '-asym'}"
                       f"-emb{scheme.embedding_bits}-head{scheme.lm_head_bits}-fp16" if scheme else "fp16"),
            "backend": f"Core ML ML program ({MIN_TARGET}+ / macOS 15+, fp16 compute)",
            "max_context": job.max_context, "max_seq_len": seq,
            "inputs": {"input_ids": f"int32 [1, T], 1 <= T <= {seq}",
                       "causal_mask": "float16 [1, 1, T, past + T]: 0 where query i may attend key j "
                                      "(j <= past + i), -1e4 elsewhere; past = tokens already in the cache"},
            "states": state_entry(spec, job.max_context),
            "outputs": {"logits": "float16 [1, vocab] (last position)"},
            "usage": "MLModel.make_state() once per conversation; predict(inputs, state=...) for the "
                     "prompt (T tokens, past 0), then one token at a time (T = 1, past grows by T)",
            "quantization": res["quantization"],
        }
        return Exported(entry, res["timings"])
