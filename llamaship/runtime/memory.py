"""This host's memory figures, for the exporter (its own peak), the Core ML evaluator (what is
free) and the profiler (a phone's /proc/meminfo, same format)."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's own high-water RSS. Not getrusage's ru_maxrss: Linux carries the parent's
    high-water mark across fork+exec into it (a child of a 2.3 GB exporter reported 2.6 GB while
    its own peak was 0.6 GB); /proc/self/status VmHWM belongs to the exec'd image alone."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_meminfo_kb(text: str, field: str = "MemTotal") -> int | None:
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def available_memory() -> int | None:
    """Bytes of MemAvailable on this host, or None where /proc/meminfo is missing."""
    try:
        kb = parse_meminfo_kb(Path("/proc/meminfo").read_text(), "MemAvailable")
    except OSError:
        return None
    return None if kb is None else kb * 1024
