"""The models llamaship exists for, by name: their published Hugging Face configs, carried with the
package so `llamaship fit --model llama3-8b` answers before a 16 GB download.

The configs are the `config.json` files Meta and Hugging Face publish (Llama 2 7B, Meta Llama 3 8B,
Llama 3.1 8B Instruct, Llama 3.2 1B / 3B, SmolLM2-135M); Hub ids of those repositories (base and
instruct) resolve to the same preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llamaship.errors import CheckpointError
from llamaship.export.llama.spec import ModelSpec

HERE = Path(__file__).resolve().parent / "presets"


@dataclass(frozen=True)
class Preset:
    key: str
    title: str
    hub_ids: tuple[str, ...]

    def spec(self) -> ModelSpec:
        from llamaship.export.llama.checkpoint import read_json
        from llamaship.export.llama.load_hf import spec_from_config

        path = HERE / f"{self.key}.json"
        return spec_from_config(read_json(path), path, name=self.key)


PRESETS: dict[str, Preset] = {p.key: p for p in (
    Preset("llama2-7b", "Llama 2 7B", ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf",
                                        "meta-llama/Llama-2-7b", "meta-llama/Llama-2-7b-chat")),
    Preset("llama3-8b", "Llama 3 8B", ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct")),
    Preset("llama3.1-8b", "Llama 3.1 8B", ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
                                            "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B-Instruct")),
    Preset("llama3.2-1b", "Llama 3.2 1B", ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct")),
    Preset("llama3.2-3b", "Llama 3.2 3B", ("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct")),
    Preset("smollm2-135m", "SmolLM2-135M", ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct")),
)}


def find_preset(name: str) -> Preset | None:
    """A preset by its key ("llama3-8b") or a Hub id of its repositories, case-insensitively."""
    wanted = name.strip().lower()
    for preset in PRESETS.values():
        if wanted == preset.key or wanted in (h.lower() for h in preset.hub_ids):
            return preset
    return None


def hub_config_spec(repo: str) -> ModelSpec:
    """An unknown Hub id: fetch its config.json alone (no weights), when the network allows."""
    import os
    import socket

    why = ""
    try:
        if not os.environ.get("HF_HUB_OFFLINE"):
            socket.getaddrinfo("huggingface.co", 443)  # fail in a second offline, not after 5 retries
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(repo, "config.json"))
    except OSError as exc:
        why = f"the network does not reach huggingface.co ({exc.strerror or type(exc).__name__})"
    except Exception as exc:  # offline mode, gated, unknown id
        why = type(exc).__name__
    if why:
        raise CheckpointError(
            f"{repo}: not a preset and its config.json could not be fetched from the Hugging Face Hub ({why}); "
            f"presets: {', '.join(PRESETS)} (`llamaship fit --list`), or pass a local config.json / params.json "
            "/ checkpoint folder")
    from llamaship.export.llama.checkpoint import read_json
    from llamaship.export.llama.load_hf import spec_from_config

    return spec_from_config(read_json(path), path, name=repo.split("/")[-1])
