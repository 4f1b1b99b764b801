"""Medians, ratios and the targets of issue 7.

Every ratio is oriented so that > 1 means "better than the reference":
peer/reference for throughput and IOPS, reference/peer for time and memory.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .workloads import WORKLOADS

CONTROL_METRICS = {
    "cycle": ("export add+del cycle", "ms"),
    "memory": ("memory per extra export", "KiB"),
    "memory-io": ("memory per extra export, after 1 MiB of I/O on each", "KiB"),
}
HIGHER_IS_BETTER = {w.key: True for w in WORKLOADS} | {k: False for k in CONTROL_METRICS}
FIO_KEYS = tuple(w.key for w in WORKLOADS)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class Figures:
    """One number per (peer, metric), with the peer families for reference lookup."""

    def __init__(self, families: dict[str, str]) -> None:
        self.families = families
        self.values: dict[tuple[str, str], float] = {}

    def set(self, peer: str, key: str, value: float | None) -> None:
        if value is not None:
            self.values[(peer, key)] = value

    def get(self, peer: str, key: str) -> float | None:
        return self.values.get((peer, key))

    def reference_peer(self, peer: str, key: str, kind: str) -> str | None:
        """The peer a ratio 'vs <kind>' compares against, for this metric."""
        if kind == "qsd":
            if key in CONTROL_METRICS:
                return "qsd"
            family = self.families.get(peer)
            return f"qsd-{family}" if family else None
        if kind == "direct":
            return "direct" if key in FIO_KEYS else None
        return kind  # a peer name, e.g. pyfuse3

    def ratio(self, peer: str, key: str, kind: str) -> float | None:
        ref = self.reference_peer(peer, key, kind)
        if ref is None:
            return None
        mine, theirs = self.get(peer, key), self.get(ref, key)
        if mine is None or theirs is None or mine <= 0 or theirs <= 0:
            return None
        return mine / theirs if HIGHER_IS_BETTER[key] else theirs / mine


@dataclass(frozen=True)
class Target:
    peer: str
    key: str
    reference: str | None      # "direct", "qsd", a peer name; None: bound on the figure itself
    bound: float
    strict: bool = False       # "ahead of" (>) instead of "at least" (>=)

    def describe(self) -> str:
        if self.reference is None:
            unit = CONTROL_METRICS[self.key][1] if self.key in CONTROL_METRICS else ""
            return f"< {self.bound:g} {unit}".strip()
        op = ">" if self.strict else "≥"
        return f"{op} {self.bound:g}x {self.reference}"

    def evaluate(self, figures: Figures) -> tuple[str, float | None]:
        """('met' | 'missed' | 'n/a', the ratio or figure compared)."""
        if self.reference is None:
            value = figures.get(self.peer, self.key)
            if value is None:
                return "n/a", None
            return ("met" if value < self.bound else "missed"), value
        ratio = figures.ratio(self.peer, self.key, self.reference)
        if ratio is None:
            return "n/a", None
        ok = ratio > self.bound if self.strict else ratio >= self.bound
        return ("met" if ok else "missed"), ratio


def issue7_targets() -> list[Target]:
    targets = []
    for key in ("seq-read", "seq-write", "rand-read", "rand-write"):
        targets.append(Target("exportd-raw-pt", key, "direct", 0.9))
    targets += [
        Target("exportd-raw", "seq-read", "qsd", 2.5),
        Target("exportd-raw", "rand-read", "qsd", 2.0),
        Target("exportd-raw", "rand-write", "qsd", 2.0),
    ]
    targets += [Target("exportd-raw", key, "pyfuse3", 1.0, strict=True) for key in FIO_KEYS]
    targets += [
        Target("exportd-qcow2", "seq-read", "qsd", 3.0),
        Target("exportd-qcow2", "rand-read", "qsd", 3.0),
        Target("exportd-qcow2", "seq-write", "qsd", 2.0),
        Target("exportd-qcow2", "rand-write", "qsd", 2.0),
    ]
    targets += [Target("exportd-null-co", key, "qsd", 1.0, strict=True) for key in FIO_KEYS]
    targets += [
        Target("exportd", "cycle", "qsd", 1.0),
        Target("exportd", "memory", None, 128.0),
        Target("exportd", "memory-io", None, 128.0),
    ]
    return targets
