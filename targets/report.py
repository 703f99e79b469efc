"""report.json / report.md / report.png from a validation report dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _predicted(a: dict[str, Any]) -> str:
    p = a.get("predicted_size_bytes")
    return f" ({p / 1e6:.1f})" if p else ""


def _fmt(v: Any, digits: int = 3) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _full_slice_notes(report: dict[str, Any]) -> list[str]:
    """For a slice cut short (a 7B/8B model's default), how long the profile's full one would take."""
    lines = []
    for a in report["artifacts"]:
        acc = a.get("accuracy") or {}
        if acc.get("full_slice"):
            lines += ["", f"Accuracy of {a['path']} took {acc['eval_seconds'] / 60:.1f} min here on this slice; the "
                      f"profile's full {acc['full_slice']['tokens']}-token slice would take about "
                      f"{acc['full_slice']['estimated_seconds'] / 60:.0f} min (`llamaship validate --eval-tokens "
                      f"{acc['full_slice']['tokens']}`)."]
    return lines


def _hub_jobs(report: dict[str, Any]) -> list[str]:
    """Each AI Hub job's outcome (`profile --hub` reports): a failed device says why."""
    lines = []
    for a in report["artifacts"]:
        for j in a.get("hub_jobs", []):
            job = f" (job {j['job_id']})" if j.get("job_id") else ""
            lines.append(f"AI Hub {j['kind']} job for {a['path']}: {j['status']}{job}"
                         + (f": {j['message']}" if j.get("message") else "") + ".")
    return lines


def _npu_part_notes(report: dict[str, Any]) -> list[str]:
    """What an app developer must know of an NPU artifact: its parts, graphs and QNN version."""
    lines: list[str] = []
    for a in report["artifacts"]:
        dec = (a.get("accuracy") or {}).get("decode_graph")
        if dec:
            lines += ["", f"{a['path']}'s decode graph (1 token per call), positions {dec['positions']}: KLD "
                      f"{dec['mean_kld']:.4f} against fp32 (its prefill graph there: "
                      f"{dec['prefill_graph_mean_kld']:.4f}), KLD {dec['kld_vs_prefill_graph']:.4f} from the "
                      f"prefill graph's rows, same argmax at {dec['argmax_agreement_vs_prefill_graph']:.0%} of them."]
        if a.get("parts"):
            parts, graphs = a["parts"], a["parts"].get("graphs", {})
            calls = " and ".join(f"a {g} graph ({v['tokens_per_call']} token{'s' if v['tokens_per_call'] > 1 else ''} "
                                 "per call)" for g, v in graphs.items())
            lines += ["", f"{a['path']}: {len(parts['part_bytes'])} part(s) of "
                      f"{', '.join(f'{b / 1e6:.1f}' for b in parts['part_bytes'])} MB, each {calls} in one "
                      f"weight-sharing QNN context binary, built with QNN SDK {parts.get('qnn_sdk_version')} (an app "
                      "must load it with that QNN version)."]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    device = report.get("device")
    title = f"On-device report: {report['model']} on {device.get('model')}" if device else \
        f"Validation report: {report['model']}"
    lines = [f"# {title}", "",
             f"Evaluation slice: {report['slice'] or 'none (speed only)'}.", "",
             "## Accuracy (on each artifact's own runtime) and speed", "",
             "| artifact | scheme | size MB (`fit` predicted) | PPL | PPL ratio | mean KLD | top-1 | RMS Δp | "
             "prefill tok/s | decode tok/s | TTFT ms | load ms | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             ]
    if report.get("reference"):
        lines.append(f"| fp32 reference (PyTorch) | fp32 | - | {_fmt(report['reference']['ppl'])} | 1.000 | 0 | "
                     "1.000 | 0 | - | - | - | - | - |")
    for a in report["artifacts"]:
        acc, sp = a.get("accuracy") or {}, a.get("speed") or {}

        def med(k: str, sp: dict[str, Any] = sp) -> str:
            return _fmt(sp[k]["median"], 1) if k in sp else "-"

        lines.append(
            f"| {a['path']} ({a['format']}) | {a['scheme']} | {a['size_bytes'] / 1e6:.1f}{_predicted(a)} | "
            f"{_fmt(acc.get('ppl'))} | {_fmt(acc.get('ppl_ratio'))} | {_fmt(acc.get('mean_kld'), 4)} | "
            f"{_fmt(acc.get('top1_agreement'))} | {_fmt(acc.get('rms_dp'), 4)} | {med('prefill_tok_s')} | "
            f"{med('decode_tok_s')} | {med('ttft_ms')} | {med('load_ms')} | "
            f"{_fmt(sp.get('peak_rss_mb'), 0)} |")
    for a in report["artifacts"]:
        acc = a.get("accuracy") or {}
        if acc.get("slice") and acc["slice"] != report.get("slice"):
            cpu = acc.get("cpu_artifact")
            lines += ["", f"Accuracy of {a['path']} is on a slice of its own ({acc['slice']}): it runs on a "
                      "simulator." + (f" On that slice {cpu['path']} measures KLD {cpu['mean_kld']:.4f}, top-1 "
                                      f"{cpu['top1_agreement']:.3f}, PPL {cpu['ppl']:.3f}: ratio of KLDs "
                                      f"{acc['kld_ratio_vs_cpu']:.2f}." if cpu else "")]
    lines += _npu_part_notes(report)
    lines += _full_slice_notes(report)
    speeds = [(a["path"], a["speed"]) for a in report["artifacts"] if a.get("speed")]
    if speeds:
        lines.append("")
    for path, sp in speeds:
        lines.append(f"Speed of {path}: {sp['runtime']}; {sp['prompt_tokens']}-token prompt, "
                     f"{sp['generated_tokens']} generated tokens, {sp['warmup_runs']} warm-up + "
                     f"{sp['runs']} runs, median (min-max in report.json).")
    lines += _hub_jobs(report)
    if device:
        lines += ["", "## Device", ""] + [f"- {k}: {v}" for k, v in device.items()]
    prediction = report.get("prediction")
    if prediction:
        lines += ["", f"Predicted for the {prediction['profile']} profile (`llamaship fit`, a roofline, not a "
                  f"measurement): decode ceiling {prediction['decode_ceiling_tok_s']:.1f} tok/s, weights "
                  f"{prediction['weight_bytes'] / 1e9:.2f} GB + KV cache {prediction['kv_cache_bytes'] / 1e9:.2f} GB."]
    lines += ["", "## Targets", ""]
    for t in report["targets"]:
        fit = t["fit"]
        verdict = "PASS" if t["passed"] else "FAIL"
        ships = t.get("ships")
        lines += [f"### {t['profile']}: {t['device']}, {t['artifact']} - {verdict}", "",
                  *([f"- ships: {ships}"] if ships else []),
                  f"- speed: {t['speed_source']}",
                  f"- fit: weights {fit['weight_bytes'] / 1e9:.3f} GB + KV {fit['kv_cache_bytes'] / 1e9:.3f} GB "
                  f"at {fit['context']} tokens = {fit['total_bytes'] / 1e9:.3f} GB (budget "
                  f"{fit['ram_budget_bytes'] / 1e9:.1f} GB); decode ceiling "
                  f"{fit['decode_ceiling_tok_s']:.1f} tok/s at {fit['bandwidth_gbs']:g} GB/s", "",
                  "| gate | limit | value | result |", "|---|---|---|---|"]
        for g in t["gates"]:
            by = f" (by {g['by']:+})" if g["by"] is not None else ""
            lines.append(f"| {g['gate']} | {g['limit']} | {_fmt(g['value'], 4)} | "
                         f"{'pass' if g['passed'] else 'FAIL' + by} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def render_png(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for a in report["artifacts"]:
        if not a.get("accuracy"):
            continue
        ax1.scatter(a["size_bytes"] / 1e6, a["accuracy"]["mean_kld"], s=60)
        ax1.annotate(f"{a['path']}\n{a['scheme']}", (a["size_bytes"] / 1e6, a["accuracy"]["mean_kld"]),
                     fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax1.set_xlabel("artifact size (MB)")
    ax1.set_ylabel("mean KLD vs fp32 (nats/token)")
    ax1.set_title("accuracy vs size")
    labels, values, colors = [], [], []
    device = report.get("device") or {}
    for a in report["artifacts"] if device else []:
        if not a.get("speed"):
            continue  # a run that failed: its status is in report.json
        labels.append(f"{a['path']}\n{device.get('model')}\n(measured)")
        values.append(a["speed"]["decode_tok_s"]["median"])
        colors.append("tab:green")
    for t in report["targets"]:
        art = next(a for a in report["artifacts"] if a["path"] == t["artifact"])
        if art.get("speed") and t["speed_source"].startswith("measured"):
            labels.append(f"{art['path']}\n{t['profile']}\n(measured)")
            values.append(art["speed"]["decode_tok_s"]["median"])
            colors.append("tab:blue")
        labels.append(f"{art['path']}\n{t['profile']}\n(ceiling)")
        values.append(t["fit"]["decode_ceiling_tok_s"])
        colors.append("tab:gray")
    ax2.bar(range(len(values)), values, color=colors)
    ax2.set_xticks(range(len(values)), labels, fontsize=6)
    ax2.set_ylabel("decode tok/s")
    ax2.set_title("decode speed per target")
    fig.suptitle(f"{report['model']} - {report['slice']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict[str, Any], folder: Path) -> list[str]:
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(render_markdown(report))
    render_png(report, folder / "report.png")
    return ["report.json", "report.md", "report.png"]
