"""Medians and spreads, ratios, the better of two configurations of a peer,
and the targets of issues 7 and 17.

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


def spread(values: list[float]) -> dict | None:
    """min / median / max / n of repeated measurements (None: no measurement)."""
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "n": len(values)}


# A peer that has two configurations a user would choose between is compared
# through the better of the two, per figure: name -> (label, members).
BEST_OF = {
    "qsd-raw-best": ("qemu-storage-daemon, raw, best of plain, iothread and aio=io_uring",
                     ("qsd-raw", "qsd-raw-iothread", "qsd-raw-aio-uring")),
    "qsd-qcow2-best": ("qemu-storage-daemon, qcow2, best of plain, iothread and aio=io_uring",
                       ("qsd-qcow2", "qsd-qcow2-iothread", "qsd-qcow2-aio-uring")),
    "exportd-raw-best": ("exportd, raw, best of /dev/fuse and its two io_uring designs",
                         ("exportd-raw", "exportd-raw-uring", "exportd-raw-uring-threads")),
    "exportd-raw-ring-best": ("exportd, raw, io_uring, better of the loop-driven ring and ring threads",
                              ("exportd-raw-uring", "exportd-raw-uring-threads")),
    "exportd-qcow2-best": ("exportd, qcow2, better of /dev/fuse and io_uring",
                           ("exportd-qcow2", "exportd-qcow2-uring")),
}


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

    def add_best_of(self, groups: dict[str, tuple[str, tuple[str, ...]]] = BEST_OF) -> dict:
        """Set each group's figure to its best member's; returns
        {group: {metric: member}} (which configuration won)."""
        chosen: dict[str, dict[str, str]] = {}
        metrics = {key for (_, key) in self.values}
        for group, (_, members) in groups.items():
            for key in metrics:
                present = [(self.values[(m, key)], m) for m in members if (m, key) in self.values]
                if not present:
                    continue
                pick = max if HIGHER_IS_BETTER[key] else min
                value, member = pick(present)
                self.values[(group, key)] = value
                chosen.setdefault(group, {})[key] = member
        return chosen

    def reference_peer(self, peer: str, key: str, kind: str) -> str | None:
        """The peer a ratio 'vs <kind>' compares against, for this metric:
        for 'qsd', the best of its configurations that ran (add_best_of),
        else the plain one."""
        if kind == "qsd":
            if key in CONTROL_METRICS:
                return "qsd"
            family = self.families.get(peer)
            if not family:
                return None
            best = f"qsd-{family}-best"
            return best if (best, key) in self.values else f"qsd-{family}"
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
    reference_label: str = ""  # how the reference reads in the report (default: its name)

    def describe(self) -> str:
        if self.reference is None:
            unit = CONTROL_METRICS[self.key][1] if self.key in CONTROL_METRICS else ""
            return f"< {self.bound:g} {unit}".strip()
        op = ">" if self.strict else "≥"
        return f"{op} {self.bound:g}x {self.reference_label or self.reference}"

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


SMALL_KEYS = tuple(w.key for w in WORKLOADS if w.block_size == "4k")
QD1_SMALL_KEYS = tuple(w.key for w in WORKLOADS if w.block_size == "4k" and w.iodepth == 1)


def issue17_targets() -> list[Target]:
    """Issue 17 (medians of one run on an idle machine). exportd is taken as the
    better of its /dev/fuse and io_uring configurations against the peers, as
    qemu-storage-daemon is the best of plain, iothread and aio=io_uring;
    io_uring's own gain is exportd-*-uring against exportd-* on /dev/fuse."""
    qsd_raw, qsd_qcow2 = "qsd-raw-best", "qsd-qcow2-best"
    targets = [
        Target("exportd-raw-ring-best", "rand-read", "exportd-raw", 1.4, reference_label="exportd /dev/fuse"),
        Target("exportd-raw-ring-best", "rand-write", "exportd-raw", 1.4, reference_label="exportd /dev/fuse"),
        Target("exportd-raw-ring-best", "rand-read-qd16", "exportd-raw", 1.5,
               reference_label="exportd /dev/fuse"),
    ]
    for key in FIO_KEYS:
        bound = 2.0 if key == "rand-write" else 1.0
        targets.append(Target("exportd-raw-best", key, qsd_raw, bound, strict=bound == 1.0,
                              reference_label="qsd best"))
    for key in FIO_KEYS:
        bound = {"rand-read": 3.0, "rand-write": 2.0}.get(key, 1.0)
        targets.append(Target("exportd-qcow2-best", key, qsd_qcow2, bound, strict=bound == 1.0,
                              reference_label="qsd best"))
    targets += [Target("exportd-raw-best", key, "passthrough-hp", 1.0, strict=True,
                       reference_label="passthrough_hp /dev/fuse") for key in SMALL_KEYS]
    targets += [Target("exportd-raw-best", key, "passthrough-hp-uring", 0.8,
                       reference_label="passthrough_hp io_uring") for key in SMALL_KEYS]
    return targets
