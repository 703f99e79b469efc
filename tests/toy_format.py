"""A toy format, to show (and test) that adding a format is one module plus one `register()` line:
the fp32 weights as safetensors, run by the eager PyTorch Llama module. Not shipped; tests only."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llamaship.backends import Backend, Exported, ExportJob, Generated, Module, Request
from llamaship.backends.base import greedy

FOLDER = "toy"


class EagerModule:
    def __init__(self, weights: Path, spec: Any, max_context: int) -> None:
        from safetensors.torch import load_file

        from llamaship.export.llama.model import build_model

        self.model = build_model(spec, load_file(str(weights)), max_context=max_context, impl="torch")

    def reset(self) -> None:
        self.model.reset_cache()

    def forward(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([tokens]), torch.tensor([start_pos]))


class Toy(Backend):
    name = "toy"
    help = "fp32 safetensors run by eager PyTorch (a test format)"
    runtime = "eager PyTorch"
    speed_elsewhere = "not measured (eager PyTorch is no device's runtime)"

    def export(self, job: ExportJob) -> Exported:
        from safetensors.torch import save_file

        (job.folder / FOLDER).mkdir()
        state = {k: job.ckpt.state[k].float().contiguous() for k in job.ckpt.spec.expected_shapes()}
        save_file(state, str(job.folder / FOLDER / "model.safetensors"))
        entry = {"format": self.name, "path": f"{FOLDER}/model.safetensors", "scheme": "fp32",
                 "max_context": job.max_context, "max_seq_len": job.max_context, "spec": job.ckpt.spec.to_json()}
        return Exported(entry, {"write_s": 0.0})

    def load_module(self, folder: Path, art: Mapping[str, Any]) -> Module:
        from llamaship.export.llama.spec import ModelSpec

        return EagerModule(folder / art["path"], ModelSpec.from_json(art["spec"]), art["max_context"])

    def generate(self, req: Request) -> Generated:
        return greedy(self.load_module(req.folder, req.art), req, self.runtime)
