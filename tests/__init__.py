"""llamaship's tests, an importable package (tests.checkpoints, tests.steps, tests.toy_format)."""
