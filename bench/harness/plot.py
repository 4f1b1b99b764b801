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


def _panel(ax, record: dict, kind: str, categories: list[tuple[str, str]]) -> None:
    figures = figures_from_record(record)
    reference_names = {"qsd": ("qsd", "qsd-raw", "qsd-qcow2", "qsd-null-co"), "direct": ("direct",)}
    peers = [(n, p["label"]) for n, p in record["peers"].items() if n not in reference_names[kind]]
    series = []
    for name, label in peers:
        ratios = [figures.ratio(name, key, kind) for key, _ in categories]
        if any(r is not None for r in ratios):
            series.append((label, ratios))
    if not series:
        ax.text(0.5, 0.5, f"no ratios vs {kind} (reference or peers did not run)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    width = 0.8 / len(series)
    for i, (label, ratios) in enumerate(series):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        heights = [r if r is not None else 0 for r in ratios]
        ax.bar(xs, heights, width=width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels([title for _, title in categories], rotation=20, ha="right", fontsize=8)
    reference = "qemu-storage-daemon (same node kind)" if kind == "qsd" else "direct access"
    ax.set_ylabel(f"ratio vs {reference}\n(> 1 is better, log scale)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)


def plot_ratios(record: dict, path: Path) -> bool:
    """Write the chart; False when matplotlib is not installed."""
    if not matplotlib_available():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fio = [(w["key"], w["title"]) for w in record["workloads"]]
    control = [(k, title) for k, (title, _) in CONTROL_METRICS.items()]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 9))
    _panel(top, record, "qsd", fio + control)
    _panel(bottom, record, "direct", fio)
    fig.suptitle(f"exportd benchmark ({record['mode']}, {record['started']}): "
                 "ratios of medians", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
