"""latest.png: bar charts of the ratios (vs qemu-storage-daemon, vs direct access).

matplotlib is a bench-only dependency: without it the chart is skipped.
"""

from __future__ import annotations

from pathlib import Path

from .figures import CONTROL_METRICS
from .report import figures_from_record


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _formatters():
    from matplotlib.ticker import FuncFormatter, NullFormatter
    return FuncFormatter, NullFormatter


def _label(name: str, peer: dict) -> str:
    return peer["label"] + (" (control plane)" if peer["role"] == "control" else "")


def _panel(ax, record: dict, kind: str, categories: list[tuple[str, str]],
           colors: dict[str, object], annotate: bool = False) -> None:
    FuncFormatter, NullFormatter = _formatters()
    figures = figures_from_record(record)
    series = []
    for name, peer in record["peers"].items():
        # The references themselves (every qsd configuration, or direct) are the 1x line.
        if name.startswith("qsd") if kind == "qsd" else name == kind:
            continue
        ratios = [figures.ratio(name, key, kind) for key, _ in categories]
        if any(r is not None for r in ratios):
            series.append((name, _label(name, peer), ratios))
    if not series:
        ax.text(0.5, 0.5, f"no ratios vs {kind} (reference or peers did not run)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    width = 0.8 / len(series)
    for i, (name, label, ratios) in enumerate(series):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        # Bars grow from the 1x line, up when better, down when worse.
        heights = [r - 1.0 if r is not None else 0.0 for r in ratios]
        bars = ax.bar(xs, heights, bottom=1.0, width=width, label=label, color=colors[name])
        if annotate or len(series) <= 3:
            ax.bar_label(bars, labels=[f"{r:.2f}x" if r is not None else "" for r in ratios],
                         fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    present = [r for _, _, ratios in series for r in ratios if r is not None]
    low, high = min(present + [1.0]), max(present + [1.0])
    ax.set_ylim(low / 1.3, high * 1.3)
    ratio_format = FuncFormatter(lambda v, _: f"{v:g}x")
    ax.yaxis.set_major_formatter(ratio_format)
    ax.yaxis.set_minor_formatter(ratio_format if high / low < 20 else NullFormatter())
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels([title for _, title in categories], rotation=20, ha="right", fontsize=8)
    reference = "qemu-storage-daemon (same node kind)" if kind == "qsd" else "direct access"
    ax.set_ylabel(f"vs {reference}\n(> 1x is better, log scale)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", which="both", alpha=0.3)


def plot_ratios(record: dict, path: Path) -> bool:
    """Write the chart; False when matplotlib is not installed."""
    if not matplotlib_available() or not record["peers"]:
        return False  # nothing to chart (e.g. --only jobs: its figures are tables)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fio = [(w["key"], w["title"]) for w in record["workloads"]]
    control = [(k, title) for k, (title, _) in CONTROL_METRICS.items()]
    # One colour per peer in both panels (a control-plane daemon shares its kind's colour).
    names = [n for n, p in record["peers"].items() if p["role"] == "io"]
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    colors = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    colors["qsd"] = colors.get("qsd-null-co", palette[0])
    colors["exportd"] = colors.get("exportd-null-co", palette[1])
    panels = [("qsd", fio, 3)]
    if any(key.startswith("direct/") for key in record["figures"]):
        panels.append(("direct", fio, 3))
    if any(p["role"] == "control" for p in record["peers"].values()):
        panels.append(("qsd", control, 2))
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(15, 1.6 * sum(h for _, _, h in panels) + 1),
                             gridspec_kw={"height_ratios": [h for _, _, h in panels]})
    for ax, (kind, categories, _) in zip(axes[:, 0], panels, strict=True):
        _panel(ax, record, kind, categories, colors, annotate=categories is control)
    fig.suptitle(f"exportd benchmark ({record['mode']}, {record['started']}): "
                 "ratios of medians", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
