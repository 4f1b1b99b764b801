"""Facts about the machine and the tools, recorded with every result."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def _first_line(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=15, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"
    text = (out.stdout or out.stderr).strip()
    if out.returncode != 0:
        last = text.splitlines()[-1] if text else f"exit status {out.returncode}"
        return f"unavailable: {last}"
    return text.splitlines()[0] if text else ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total_kib() -> int | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return None


def os_name() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.system()


def load_average() -> list[float]:
    return list(os.getloadavg())


def machine_info(repo: Path, exportd_cmd: list[str] | None, pyfuse3_python: str) -> dict:
    git_status = _first_line(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "mem_total_kib": mem_total_kib(),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "os": os_name(),
        "python": platform.python_version(),
        "fio": _first_line(["fio", "--version"]),
        "qemu_storage_daemon": _first_line(["qemu-storage-daemon", "--version"]),
        "qemu_img": _first_line(["qemu-img", "--version"]),
        "pyfuse3": _first_line([pyfuse3_python, "-c", "import pyfuse3; print(pyfuse3.__version__)"]),
        "exportd": (_first_line(exportd_cmd + ["--version"]) if exportd_cmd
                    else "unavailable: no executable"),
        "git_commit": _first_line(["git", "rev-parse", "HEAD"], cwd=repo),
        "git_dirty": bool(git_status) and not git_status.startswith("unavailable"),
        "shmem_thp": _read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        "loadavg_start": load_average(),
    }
