"""Is the machine quiet enough for the figures to mean something?

On this shared 2-CPU machine 4 KiB QD1 figures swing up to 4x with other
people's work. A results table is written only when the 1-minute load average
before the run was at most LOAD_LIMIT; above it the harness refuses, unless
told to go on (--allow-load), and then the table says so at its top.

"Before the run" is before the harness starts anything: during the run, its
own fio and daemons keep the load average near 2, so the figures recorded
before and after each fio run (in latest.json) describe the run, not others.
"""

from __future__ import annotations

LOAD_LIMIT = 0.5


def load_check(load_1min_before: float, allowed: bool, limit: float = LOAD_LIMIT) -> dict:
    """What the record keeps about the load: the figure, the limit, the verdict."""
    return {"loadavg_1min_before": round(load_1min_before, 2), "limit": limit,
            "over_limit": load_1min_before > limit, "allowed": allowed}


def refusal(check: dict | None) -> str | None:
    """Why no table may be written for this record, or None when it may."""
    if not check or not check["over_limit"] or check["allowed"]:
        return None
    return (f"the 1-minute load average before the run was {check['loadavg_1min_before']:.2f}, "
            f"above {check['limit']:g}: other work on this machine would skew the figures. "
            "Run again on a quiet machine, or pass --allow-load to measure anyway "
            "(the table is then marked)")


def banner(check: dict | None) -> str | None:
    """The warning at the top of a table measured on a loaded machine."""
    if not check or not check["over_limit"]:
        return None
    return (f"**Measured on a loaded machine** (1-minute load average "
            f"{check['loadavg_1min_before']:.2f} before the run, above {check['limit']:g}; "
            "written with --allow-load): other work shared the 2 CPUs, so these figures, "
            "the 4 KiB QD1 ones most, are not comparable with a quiet run.")
