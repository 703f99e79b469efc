"""Golden files the Android app's Kotlin core is tested against (android_demo/core/src/test/
resources/golden): a real bundle manifest written by the CLI, and chat prompts rendered from the
real templates. This test fails when the Python side changes what it writes; regenerate with
LLAMASHIP_UPDATE_GOLDEN=1 and the JVM tests then check the Kotlin side against the new files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llamaship.export.llama.tokenizer import LLAMA2_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE, render_chat
from tests.checkpoints import CHATML_TEMPLATE

GOLDEN = Path(__file__).resolve().parents[1] / "android_demo" / "core" / "src" / "test" / "resources" / "golden"
UPDATE = os.environ.get("LLAMASHIP_UPDATE_GOLDEN") == "1"

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": " And 3+3? "}],
]
FAMILIES = {
    "LLAMA2": (LLAMA2_CHAT_TEMPLATE, "<s>", "</s>"),
    "LLAMA3": (LLAMA3_CHAT_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>"),
    "CHATML": (CHATML_TEMPLATE, "<|im_start|>", "<|im_end|>"),
}


def shape(value: Any) -> Any:
    """Keys and types, not values: timings, hashes and paths change from run to run."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items() if k not in ("files", "stats", "stages_s", "tools")}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def check_or_update(name: str, fresh: Any, compare) -> None:  # type: ignore[no-untyped-def]
    path = GOLDEN / name
    if UPDATE or not path.exists():
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fresh, indent=2, ensure_ascii=False) + "\n")
    golden = json.loads(path.read_text())
    assert compare(golden) == compare(fresh), (
        f"{path} is out of date with what llamaship writes; run LLAMASHIP_UPDATE_GOLDEN=1 pytest "
        "tests/test_android_golden.py and android_demo/run_jvm_tests.sh")


def test_golden_manifest(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["model"]["source"] = "tiny.gguf"  # not a path of this machine
    check_or_update("manifest.json", manifest, shape)


def test_golden_chat_prompts():
    cases = []
    for family, (template, bos, eos) in FAMILIES.items():
        for messages in CONVERSATIONS:
            cases.append({"family": family, "template": template, "bos_token": bos, "eos_token": eos,
                          "messages": messages, "rendered": render_chat(template, messages, bos, eos)})
    check_or_update("chat.json", cases, lambda c: c)
