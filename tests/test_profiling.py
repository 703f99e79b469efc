"""On-device profiling: parsing, command construction and report writing, with runner output
recorded from a real run of ExecuTorch's C++ LLM runner (tests/data/runner_output: the
TextLLMRunner that llama_main wraps, on this x86_64 host, SmolLM2 8da4w g32 bundle).

The adb calls need a phone, which this machine does not have: the end-to-end test replaces the adb
process at that boundary with a recorder that answers in adb's formats, and checks every command
llamaship would send."""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from llamaship.errors import RuntimeFailure
from llamaship.profiling.adb import Adb
from llamaship.profiling.device import parse_cpufreqs, parse_getprop, parse_meminfo_kb, parse_thermal_status
from llamaship.profiling.observer import parse_stats, peak_rss_mib
from llamaship.profiling.run import REMOTE_DIR, profile_bundle, runner_command
from llamaship.targets.report import write_report
from llamaship.targets.speed import runner_rates

RECORDED = Path(__file__).parent / "data" / "runner_output" / "host_x86_64_smollm2_8da4w.txt"


def test_parse_recorded_runner_output():
    text = RECORDED.read_text()
    (stat,) = parse_stats(text)
    assert stat["prompt_tokens"] == 5 and stat["generated_tokens"] == 15
    rates = runner_rates(stat)
    # our rates reproduce the runner's own (it prints them beside the timestamps)
    assert rates["prefill_tok_s"] == pytest.approx(stat["prefill_token_per_sec"], rel=1e-3)
    assert rates["decode_tok_s"] == pytest.approx(stat["decode_token_per_sec"], rel=1e-3)
    assert rates["ttft_ms"] == stat["first_token_ms"] - stat["inference_start_ms"]
    assert peak_rss_mib(text) == pytest.approx(592.871094)


@pytest.mark.parametrize("damage", ["truncated", "missing-field"])
def test_damaged_stats_line_is_an_error(damage):
    line = next(ln for ln in RECORDED.read_text().splitlines() if "PyTorchObserver" in ln)
    if damage == "truncated":
        line = line[: len(line) // 2]
    else:
        stat = json.loads(line.split("PyTorchObserver ", 1)[1])
        del stat["inference_end_ms"]
        line = "PyTorchObserver " + json.dumps(stat)
    with pytest.raises(RuntimeFailure, match="malformed|lacks"):
        parse_stats(line)


def test_runner_command_quotes_the_prompt():
    prompt = "It's a \"test\"; rm -rf / $(reboot)"
    cmd = runner_command("llama_main", "model.pte", "tokenizer.json", prompt, 300, 4)
    assert cmd.startswith(f"cd {REMOTE_DIR} && ./llama_main ")
    argv = shlex.split(cmd.split(" && ", 1)[1])
    assert argv[argv.index("--prompt") + 1] == prompt  # the device shell sees one literal argument
    assert argv[argv.index("--cpu_threads") + 1] == "4" and argv[argv.index("--temperature") + 1] == "0"
    assert argv[argv.index("--seq_len") + 1] == "300"


def test_device_fact_parsers():
    props = parse_getprop("[ro.product.model]: [Pixel 8 Pro]\n[ro.soc.model]: [Tensor G3]\n[empty]: []\n")
    assert props == {"ro.product.model": "Pixel 8 Pro", "ro.soc.model": "Tensor G3", "empty": ""}
    assert parse_meminfo_kb("MemTotal:       11718236 kB\nMemFree:  1 kB\n") == 11718236
    assert parse_thermal_status("IsStatusOverride: false\nThermal Status: 2\n") == 2
    assert parse_thermal_status("no such service") is None
    assert parse_cpufreqs("cpu0 1704000\ncpu7 3014400\ncpufreq junk\n") == {"cpu0": 1704000, "cpu7": 3014400}


class FakeAdb:
    """Stands in for the adb process (no phone here): records each command and answers in adb's
    output formats; llama_main runs answer with the recorded real runner output."""

    def __init__(self, thermal: tuple[int, int] = (0, 1)) -> None:
        self.calls: list[list[str]] = []
        self.thermal = list(thermal)

    def __call__(self, cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(cmd))
        args = list(cmd)[3:]
        out = ""
        if args == ["get-state"]:
            out = "device\n"
        elif args[:1] == ["shell"]:
            sh = args[1]
            if sh == "getprop":
                out = "[ro.product.model]: [SM-S928B]\n[ro.soc.model]: [SM8650]\n[ro.build.version.release]: [14]\n"
            elif sh == "cat /proc/meminfo":
                out = "MemTotal:       11718236 kB\n"
            elif sh.startswith("dumpsys thermalservice"):
                out = f"Thermal Status: {self.thermal.pop(0)}\n"
            elif sh.startswith("for c in"):
                out = "cpu0 2265600\ncpu7 3302400\n"
            elif "llama_main" in sh and "chmod" not in sh:
                out = RECORDED.read_text()
        return subprocess.CompletedProcess(cmd, 0, out, "")


def test_profile_bundle_end_to_end_at_the_adb_boundary(tiny_bundle, tmp_path):
    runner = tmp_path / "llama_main"
    runner.write_bytes(b"\x7fELF")
    fake = FakeAdb()
    report = profile_bundle(tiny_bundle, Adb("R5CX", run=fake), runner, runs=3, warmup=1, threads=4,
                            progress=lambda s: None)
    assert all(c[:3] == ["adb", "-s", "R5CX"] for c in fake.calls)
    pushed = [c[5] for c in fake.calls if c[3] == "push"]
    assert pushed == [f"{REMOTE_DIR}/model.pte", f"{REMOTE_DIR}/tokenizer.json", f"{REMOTE_DIR}/llama_main"]
    runs = [c for c in fake.calls if c[3] == "shell" and "./llama_main" in c[4]]
    assert len(runs) == 4 and all("--cpu_threads 4" in c[4] for c in runs)
    speed = report["artifacts"][0]["speed"]
    assert speed["runs"] == 3 and speed["warmup_runs"] == 1
    assert speed["decode_tok_s"]["median"] == pytest.approx(148.5, rel=1e-2)
    assert speed["peak_rss_mb"] == pytest.approx(592.87, rel=1e-3)
    dev = report["device"]
    assert dev["model"] == "SM-S928B" and dev["soc_model"] == "SM8650" and dev["ram_gb"] == pytest.approx(11.18)
    assert dev["thermal_before"]["thermal_status"] == 0 and dev["throttled"]
    out = tmp_path / "report"
    out.mkdir()
    write_report(report, out)
    md = (out / "report.md").read_text()
    assert "On-device report" in md and "SM-S928B" in md and "148.5" in md
    assert json.loads((out / "report.json").read_text())["artifacts"][0]["speed"]["runs"] == 3


def test_runner_without_stats_is_an_error(tiny_bundle, tmp_path):
    runner = tmp_path / "llama_main"
    runner.write_bytes(b"\x7fELF")

    class Broken(FakeAdb):
        def __call__(self, cmd):  # type: ignore[no-untyped-def]
            res = super().__call__(cmd)
            if "./llama_main" in " ".join(cmd):
                return subprocess.CompletedProcess(cmd, 0, "E 00:00:00 Failed to load model\n", "")
            return res

    with pytest.raises(RuntimeFailure, match="no PyTorchObserver stats: E 00:00:00 Failed to load model"):
        profile_bundle(tiny_bundle, Adb("X", run=Broken()), runner, progress=lambda s: None)


def test_adb_failure_and_missing_runner_messages(tmp_path, tiny_bundle, capsys):
    def offline(cmd):  # type: ignore[no-untyped-def]
        return subprocess.CompletedProcess(cmd, 1, "", "error: device 'X' not found")

    with pytest.raises(RuntimeFailure, match="adb -s X get-state` failed .*device 'X' not found"):
        Adb("X", run=offline).check_device()
    from llamaship.cli import main

    assert main(["profile", str(tiny_bundle), "--device", "X", "--runner", str(tmp_path / "none")]) == 3
    assert "llama_main not found" in capsys.readouterr().err
