"""What export and validation share about running things on this host, below both: the MIL program
reader/evaluator (the Core ML exporter reads its own program back with it; validation runs it), the
QNN HTP sessions (the NPU exporter compiles and re-checks its context with them; validation scores
with them), and this host's memory figures. `llamaship.export` must not import
`llamaship.targets`, so these live here."""
