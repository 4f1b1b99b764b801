"""Run fio on one or two files and read its JSON output."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .workloads import Workload


class FioError(RuntimeError):
    pass


@dataclass
class FioResult:
    iops: float
    bw_bytes: float
    lat_mean_ns: float
    ios: int
    runtime_ms: int

    def value(self, metric: str) -> float:
        return self.bw_bytes / 2**20 if metric == "bw" else self.iops

    def as_dict(self) -> dict:
        return asdict(self)


def fio_version() -> str:
    try:
        return subprocess.run(["fio", "--version"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _runtime_arg(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def fio_command(workload: Workload, paths: list[Path], runtime_s: float, output: Path) -> list[str]:
    cmd = [
        "fio", "--output-format=json", f"--output={output}",
        # global options first: they apply to every job that follows
        f"--rw={workload.rw}", f"--bs={workload.block_size}",
        f"--ioengine={workload.ioengine}", f"--iodepth={workload.iodepth}",
        "--direct=1", "--time_based", f"--runtime={_runtime_arg(runtime_s)}",
        "--norandommap", "--randrepeat=0", "--invalidate=0",
    ]
    for i, path in enumerate(paths):
        cmd += [f"--name=job{i}", f"--filename={path}"]
    return cmd


def parse_fio_json(text: str, direction: str) -> FioResult:
    """Sum the jobs' figures for one direction; any job error is an error."""
    # fio can print warnings before the JSON document even with --output.
    start = text.find("{")
    if start < 0:
        raise FioError("fio wrote no JSON")
    doc = json.loads(text[start:])
    jobs = doc.get("jobs") or []
    if not jobs:
        raise FioError("fio reported no jobs")
    iops = bw = 0.0
    ios = 0
    lat_means = []
    runtime_ms = 0
    for job in jobs:
        if job.get("error"):
            raise FioError(f"fio job {job.get('jobname')} failed: error {job['error']}")
        figures = job[direction]
        iops += figures["iops"]
        bw += figures["bw_bytes"]
        ios += figures["total_ios"]
        lat_means.append(figures["lat_ns"]["mean"])
        runtime_ms = max(runtime_ms, figures["runtime"])
    if ios == 0:
        raise FioError("fio completed no I/O")
    return FioResult(iops=iops, bw_bytes=bw, lat_mean_ns=sum(lat_means) / len(lat_means),
                     ios=ios, runtime_ms=runtime_ms)


def run_fio(workload: Workload, paths: list[Path], runtime_s: float, output: Path,
            on_hang: Callable[[], None] | None = None) -> FioResult:
    """Run one fio measurement. on_hang is called if fio overstays its runtime
    (a stuck FUSE server): it should kill the server so that fio's I/O fails."""
    cmd = fio_command(workload, paths, runtime_s, output)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=runtime_s + 60)
    except subprocess.TimeoutExpired:
        if on_hang is not None:
            on_hang()
        proc.kill()
        proc.communicate(timeout=30)
        raise FioError(f"fio hung for more than {runtime_s + 60:.0f} s") from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    text = output.read_text() if output.exists() else ""
    if proc.returncode != 0 and not text.strip():
        lines = (stderr or stdout).strip().splitlines()
        raise FioError(lines[-1] if lines else f"fio exited with status {proc.returncode}")
    try:
        return parse_fio_json(text, workload.direction)
    except (ValueError, KeyError) as exc:
        raise FioError(f"cannot parse fio output: {exc}") from exc
    except FioError as exc:
        detail = (stderr or "").strip().splitlines()
        raise FioError(f"{exc}{': ' + detail[-1] if detail else ''}") from None
