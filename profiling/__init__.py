"""On-device profiling over adb: push a bundle and ExecuTorch's llama_main, run it, and write the
same report format as host validation."""
