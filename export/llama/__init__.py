"""The model layer every format builds on: a checkpoint in any layout (Hugging Face, Meta, GGUF)
loaded into one ModelSpec + state dict + tokenizer, and the Llama module itself.

Below the formats (`llamaship.export.*`), the quantizers (`llamaship.quantize`) and validation
(`llamaship.targets`); it imports none of them. `load.py` dispatches over the loaders, which
share the `Checkpoint` type and helpers in `checkpoint.py`.
"""
