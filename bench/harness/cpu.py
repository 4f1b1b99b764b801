"""How much CPU other work took while one fio run measured a peer.

The load average cannot tell: during a run the harness's own fio and server
keep it near 2. This counts instead the machine's busy CPU time
(/proc/stat) over the run, minus what fio (the harness's reaped children),
the peer's server (/proc/PID/stat, all its threads) and the harness itself
used: the rest is other people's work, in CPUs (1.0 = one CPU busy all the
time). The hypervisor's steal time is kept apart.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_and_steal() -> tuple[float, float]:
    """CPU seconds spent busy (user, nice, system, irq, softirq) and stolen, all CPUs."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq) / TICKS, steal / TICKS


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system, every thread) of a process; 0 when gone or None."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


def _own_cpu() -> float:
    """The harness and every child it has reaped (fio, with its job processes)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class CpuWindow:
    """Open before a fio run, close after it (once fio has been reaped)."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.wall = time.monotonic()
        self.busy, self.steal = machine_busy_and_steal()
        self.ours = _own_cpu() + process_cpu(server_pid)

    def close(self) -> dict:
        wall = time.monotonic() - self.wall
        busy, steal = machine_busy_and_steal()
        ours = _own_cpu() + process_cpu(self.server_pid) - self.ours
        others = max(0.0, busy - self.busy - ours)
        return {"others_cpus": round(others / wall, 3) if wall > 0 else 0.0,
                "steal_cpus": round((steal - self.steal) / wall, 3) if wall > 0 else 0.0,
                "ours_cpus": round(ours / wall, 3) if wall > 0 else 0.0}
