"""The parts of `bench/peers.py` that run in a child process: llama.cpp through llama-cpp-python
(which may live in another Python, `--llama-cpp-python`, and must not share this process's
threads), and PyTorch eager (one thread, so that it does not fight the runtimes being timed).
Each prints one JSON line on stdout.

    python bench/peer_children.py llama_cpp_quantize SRC DST FTYPE
    python bench/peer_children.py llama_cpp_speed GGUF PROMPT GEN WARMUP RUNS
    python bench/peer_children.py llama_cpp_logits GGUF WINDOWS_JSON FIRST_SCORED OUT_DIR
    python bench/peer_children.py eager_speed PROMPT_IDS_JSON GEN WARMUP RUNS
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def llama_cpp_quantize(src: str, dst: str, ftype: str) -> None:
    """llama.cpp's own quantizer; from an already-quantized GGUF it needs allow_requantize."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    print(json.dumps({"ok": True}))


def llama_cpp_speed(gguf: str, prompt: str, gen: int, warmup: int, runs: int) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, n_threads=2, n_threads_batch=2, n_ctx=512, verbose=False)
    out = []
    for i in range(warmup + runs):
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        llm.create_completion(prompt, max_tokens=gen, temperature=0.0)
        perf = llama_cpp.llama_perf_context(llm.ctx)
        if i >= warmup:
            out.append({"prefill_tok_s": perf.n_p_eval * 1000 / max(perf.t_p_eval_ms, 1e-9),
                        "decode_tok_s": perf.n_eval * 1000 / max(perf.t_eval_ms, 1e-9)})
    print(json.dumps(out))


def llama_cpp_logits(gguf: str, windows_json: str, first_scored: int, out_dir: str) -> None:
    """Each window's logits from `first_scored` on, one batch per window with logits for every
    position (logits_all), saved as float32 .npy files for the parent to score: llama.cpp's own
    kernels and its own KV cache, the same tokens as every other row."""
    import llama_cpp
    import numpy as np

    windows = json.loads(Path(windows_json).read_text())
    n = len(windows[0]) - 1
    llm = llama_cpp.Llama(model_path=gguf, n_threads=2, n_threads_batch=2, n_ctx=n + 1, n_batch=n + 1,
                          n_ubatch=n + 1, logits_all=True, verbose=False)
    for w, window in enumerate(windows):
        llm.reset()
        llm.eval(window[:-1])
        np.save(Path(out_dir) / f"{w}.npy", np.asarray(llm.scores[first_scored:n], dtype=np.float32))
    print(json.dumps({"windows": len(windows)}))


def eager_speed(prompt_ids: list[int], gen: int, warmup: int, runs: int) -> None:
    import torch

    from llamaship.export.llama.load import load_checkpoint
    from llamaship.export.llama.model import build_model
    from llamaship.pipeline import default_model

    torch.set_num_threads(1)
    ckpt = load_checkpoint(default_model(), progress=lambda s: None)
    model = build_model(ckpt.spec, ckpt.state, max_context=512)
    out = []
    with torch.no_grad():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            logits = model(torch.tensor([prompt_ids]), torch.tensor([0]))
            t1 = time.perf_counter()
            for j in range(gen):
                logits = model(logits.argmax(-1).view(1, 1), torch.tensor([len(prompt_ids) + j]))
            t2 = time.perf_counter()
            if i >= warmup:
                out.append({"prefill_tok_s": len(prompt_ids) / (t1 - t0), "decode_tok_s": gen / (t2 - t1)})
    print(json.dumps(out))


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "llama_cpp_quantize":
        llama_cpp_quantize(*rest)
    elif cmd == "llama_cpp_speed":
        llama_cpp_speed(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]))
    elif cmd == "llama_cpp_logits":
        llama_cpp_logits(rest[0], rest[1], int(rest[2]), rest[3])
    elif cmd == "eager_speed":
        eager_speed(json.loads(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
    else:
        raise SystemExit(f"unknown child {cmd}")
