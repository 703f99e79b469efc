"""llamaship: Llama checkpoints to validated on-device bundles (ExecuTorch, ONNX, Core ML)."""

__version__ = "0.1.0"
