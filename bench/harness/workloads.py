"""The fio workloads of issue 7, all O_DIRECT and time-based."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    rw: str              # fio rw=
    block_size: str      # fio bs=
    ioengine: str
    iodepth: int
    metric: str          # "bw" (reported in MiB/s) or "iops"
    two_exports: bool = False  # one fio job on each of two exports, at once

    @property
    def unit(self) -> str:
        return "MiB/s" if self.metric == "bw" else "IOPS"

    @property
    def small_qd1(self) -> bool:
        """4 KiB at queue depth 1: the figures that swing most on this machine
        (up to 4x between back-to-back runs), so they get more repetitions."""
        return self.block_size == "4k" and self.iodepth == 1

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"


WORKLOADS: tuple[Workload, ...] = (
    Workload("seq-read", "1 MiB sequential read", "read", "1M", "psync", 1, "bw"),
    Workload("seq-write", "1 MiB sequential write", "write", "1M", "psync", 1, "bw"),
    Workload("rand-read", "4 KiB random read, QD1", "randread", "4k", "psync", 1, "iops"),
    Workload("rand-write", "4 KiB random write, QD1", "randwrite", "4k", "psync", 1, "iops"),
    Workload("rand-read-qd16", "4 KiB random read, QD16 (libaio)", "randread", "4k", "libaio", 16, "iops"),
    Workload("two-exports", "4 KiB random read, QD1, two exports at once", "randread", "4k", "psync", 1,
             "iops", two_exports=True),
)

BY_KEY = {w.key: w for w in WORKLOADS}

# Run once per peer before measuring, unrecorded: first-touch costs (page
# faults, buffer pools, lazily built state) should not land in one workload.
WARMUP = Workload("warmup", "warm-up", "randrw", "64k", "psync", 1, "iops")
