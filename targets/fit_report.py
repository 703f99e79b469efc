"""The model x device x scheme matrix `llamaship fit` prints, writes as JSON and draws: a table a
person reads at a glance, built only from `predict_fit` (the same numbers export checks against)."""

from __future__ import annotations

from pathlib import Path

from llamaship.targets.fit import GB, Fit

SIZE_COLUMNS = {"executorch": ".pte", "onnx": "onnx", "coreml": "coreml", "qnn": "qnn*"}


def matrix_table(fits: list[Fit]) -> str:
    head = ["model", "profile", "scheme", "weights GB", "KV GB (ctx)", "total/budget GB", "fits",
            "ceiling tok/s", *(f"{c} GB" for c in SIZE_COLUMNS.values())]
    rows = [head]
    for f in fits:
        rows.append([
            f.model, f.profile, f.scheme, f"{f.weight_bytes / GB:.2f}",
            f"{f.kv_cache_bytes / GB:.2f} ({f.context})", f"{f.total_bytes / GB:.2f}/{f.ram_budget_bytes / GB:.1f}",
            "yes" if f.fits else "NO", f"{f.decode_ceiling_tok_s:.1f}",
            *(f"{f.sizes_bytes[k] / GB:.2f}" if k in f.sizes_bytes else "-" for k in SIZE_COLUMNS),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("ceiling: memory-bandwidth roofline of decode (bytes read per token / the profile's bandwidth), "
                 "a prediction, not a measurement; sizes: each format's storage model (ONNX keeps fp32 scales, "
                 "and 4-bit zero points for asymmetric schemes only), checked against measured 7B/8B artifacts "
                 "within 3%; * qnn: counts a 4-bit embedding; the measured Llama 3 8B NPU binaries are 5.34 GB "
                 "(16-bit embedding)")
    return "\n".join(lines)


def plot_matrix(fits: list[Fit], path: Path) -> None:
    """Decode ceiling per model and profile (first scheme of each), green where it fits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen: dict[tuple[str, str], Fit] = {}
    for f in fits:
        seen.setdefault((f.model, f.profile), f)
    models = list(dict.fromkeys(m for m, _ in seen))
    profiles = list(dict.fromkeys(p for _, p in seen))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(models) * max(1, len(profiles)) / 2), 4.5))
    width = 0.8 / max(1, len(profiles))
    for j, prof in enumerate(profiles):
        for i, model in enumerate(models):
            fit = seen.get((model, prof))
            if fit is None:
                continue
            ax.bar(i + j * width, fit.decode_ceiling_tok_s, width, color="tab:green" if fit.fits else "tab:red",
                   edgecolor="black", hatch=["", "//", ".."][j % 3], label=prof if i == 0 else None)
    ax.set_xticks([i + width * (len(profiles) - 1) / 2 for i in range(len(models))], models, rotation=20)
    ax.set_ylabel("decode ceiling, tok/s (roofline)")
    scheme = next(iter(seen.values())).scheme
    ax.set_title(f"llamaship fit: green fits the profile's RAM budget, red does not ({scheme})")
    ax.legend(title="profile (hatch)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
