"""Runtimes that execute artifacts on this host, and (later) per-target validation."""
