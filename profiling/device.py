"""Device facts recorded beside every on-device figure: model, SoC, Android version, RAM, and the
thermal state and CPU clocks before and after the runs (a throttled phone gives slow numbers that
must not be mistaken for the model's)."""

from __future__ import annotations

import re
from typing import Any

from llamaship.profiling.adb import Adb
from llamaship.runtime.memory import parse_meminfo_kb

PROPS = {
    "model": "ro.product.model",
    "manufacturer": "ro.product.manufacturer",
    "soc_manufacturer": "ro.soc.manufacturer",
    "soc_model": "ro.soc.model",
    "board": "ro.board.platform",
    "android": "ro.build.version.release",
    "sdk": "ro.build.version.sdk",
    "abi": "ro.product.cpu.abi",
}
GETPROP_LINE = re.compile(r"^\[([^\]]+)\]: \[(.*)\]$")


def parse_getprop(text: str) -> dict[str, str]:
    """`adb shell getprop` prints `[key]: [value]` per line."""
    props = {}
    for line in text.splitlines():
        m = GETPROP_LINE.match(line.strip())
        if m:
            props[m.group(1)] = m.group(2)
    return props


def parse_thermal_status(text: str) -> int | None:
    """`dumpsys thermalservice` prints `Thermal Status: N` (0 none ... 6 shutdown)."""
    m = re.search(r"Thermal Status: (\d+)", text)
    return int(m.group(1)) if m else None


def parse_cpufreqs(text: str) -> dict[str, int]:
    """Lines `cpuN KHZ` from the loop in CPUFREQ_CMD."""
    freqs = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith("cpu") and parts[1].isdigit():
            freqs[parts[0]] = int(parts[1])
    return freqs


CPUFREQ_CMD = ("for c in /sys/devices/system/cpu/cpu[0-9]*; do "
               "echo \"${c##*/} $(cat $c/cpufreq/scaling_cur_freq 2>/dev/null || echo 0)\"; done")


def thermal_snapshot(adb: Adb) -> dict[str, Any]:
    return {"thermal_status": parse_thermal_status(adb.shell("dumpsys thermalservice")),
            "cpufreq_khz": parse_cpufreqs(adb.shell(CPUFREQ_CMD))}


def device_facts(adb: Adb) -> dict[str, Any]:
    props = parse_getprop(adb.shell("getprop"))
    facts: dict[str, Any] = {name: props.get(key) for name, key in PROPS.items()}
    facts["serial"] = adb.serial
    mem = parse_meminfo_kb(adb.shell("cat /proc/meminfo"))
    facts["ram_gb"] = round(mem / 1024**2, 2) if mem else None
    return facts
