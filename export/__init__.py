"""Checkpoint loading, the Llama module, tokenizers and per-format exporters."""
