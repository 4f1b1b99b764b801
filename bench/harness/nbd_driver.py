"""The "nbd-driver" section (issue 13, Speed, driver side): a FUSE export of an
exportd nbd node against nbdfuse, both clients of the same NBD server, fio on
the mounted file.

Server: one nbdkit file plugin (default threads) on a tmpfs raw image over a
UNIX socket, as in the NBD section (bench/harness/nbd.py). Of nbdkit and
qemu-nbd (in that section's best configuration) it was the faster server under
fio's nbd engine here (probe in bench/README.md, "NBD driver"): 1.3-2x on
QD16 and 1 MiB, 0.8x on QD1 where it still serves 16k IOPS, well above
either client; so the clients are the bottleneck. It advertises multi-conn,
which nbdfuse uses.

Clients, one at a time against the idle server:
- exportd: `--blockdev driver=nbd,server.type=unix,...,export=disk` and a
  writable FUSE export of that node over a regular file;
- nbdfuse (libnbd-bin) mounted over a regular file with the NBD URI, in its
  default (best) configuration: multithreaded, multi-conn with 4 connections
  when the server advertises it.

fio on the mounted file, O_DIRECT: 4 KiB random read/write at QD1 (psync) and
QD16 (libaio), 1 MiB sequential read/write (psync). Repetitions interleave
the two clients; every run keeps the 1-minute load average at its end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from .fio import FioError, run_fio
from .images import Images
from .machine import load_average
from .nbd import EXPORT, Nbdkit, spread, uri
from .peers import PeerEnv, PeerUnavailable, ProcessPeer
from .report import _cell, _scratchless, _short, _spread_cell
from .scratch import Scratch
from .workloads import WARMUP, Workload

WORKLOADS: tuple[Workload, ...] = (
    Workload("rr1", "4 KiB random read, QD1", "randread", "4k", "psync", 1, "iops"),
    Workload("rw1", "4 KiB random write, QD1", "randwrite", "4k", "psync", 1, "iops"),
    Workload("rr16", "4 KiB random read, QD16 (libaio)", "randread", "4k", "libaio", 16, "iops"),
    Workload("rw16", "4 KiB random write, QD16 (libaio)", "randwrite", "4k", "libaio", 16, "iops"),
    Workload("sr", "1 MiB sequential read", "read", "1M", "psync", 1, "bw"),
    Workload("sw", "1 MiB sequential write", "write", "1M", "psync", 1, "bw"),
)
MINE = "exportd"
REFERENCE = "nbdfuse"


@dataclass(frozen=True)
class DriverSettings:
    mode: str
    image_size: int
    runtime_s: float   # per fio run
    reps: int


def driver_settings(mode: str, image_size: int, runtime_s: float, reps: int) -> DriverSettings:
    # Full mode: 3 s per run, at least 3 repetitions (2 clients x 6 figures x 3
    # stay near 2 minutes); QD1 swings with the machine's other load.
    if mode == "quick":
        return DriverSettings(mode, image_size, min(runtime_s, 1.0), reps)
    return DriverSettings(mode, image_size, min(runtime_s, 3.0), max(reps, 3))


def driver_available() -> str:
    for tool in ("fio", "nbdkit", "nbdfuse", "nbdinfo"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return ""


class NbdClientPeer(ProcessPeer):
    """A FUSE server that is an NBD client of `socket`, mounted over one file."""

    socket: Path

    def command(self, env: PeerEnv, mountpoint: Path, workdir: Path) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self, env: PeerEnv) -> None:
        workdir = env.scratch.dir(f"client-{self.name}")
        mountpoint = workdir / "disk.raw"
        mountpoint.touch()
        self.mountpoints = [mountpoint]
        cmd, environ = self.command(env, mountpoint, workdir)
        self._launch(env, cmd, workdir, environ)
        self._wait_ready()

    def fio_paths(self, two_exports: bool) -> list[Path]:
        return self.mountpoints[:1]


class ExportdClient(NbdClientPeer):
    def command(self, env, mountpoint, workdir):
        if env.exportd_cmd is None:
            raise PeerUnavailable(env.exportd_missing_reason)
        return [*env.exportd_cmd,
                "--blockdev", f"driver=nbd,node-name=nbd0,server.type=unix,"
                              f"server.path={self.socket},export={EXPORT}",
                "--export", f"type=fuse,id=e,node-name=nbd0,mountpoint={mountpoint},writable=on",
                # a monitor of its own: without one exportd claims the default socket
                "--chardev", f"socket,id=mon0,path={workdir / 'qmp.sock'},server=on,wait=off",
                "--monitor", "chardev=mon0"], dict(env.exportd_env)


class NbdfuseClient(NbdClientPeer):
    def command(self, env, mountpoint, workdir):
        program = shutil.which("nbdfuse")
        if program is None:
            raise PeerUnavailable("nbdfuse not installed (libnbd-bin)")
        # Defaults: multithreaded FUSE, multi-conn (4 connections) when the
        # server advertises it. It stays in the foreground: the harness owns the pid.
        return [program, str(mountpoint), uri(self.socket)], {}


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process, all its threads (0 when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nbdfuse_version() -> str:
    try:
        out = subprocess.run(["nbdfuse", "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """Per figure: each client's median [min-max], the load, and exportd /
    nbdfuse (ratio of the medians and the per-repetition ratios' range)."""
    out = {}
    for w in WORKLOADS:
        per = runs.get(w.key, {})
        entry = {"clients": {n: spread([r["value"] for r in rs]) for n, rs in per.items()},
                 "loadavg": spread([r["loadavg_1min"] for rs in per.values() for r in rs]),
                 "cpu_us_per_io": {n: spread([r["cpu_us_per_io"] for r in rs]) for n, rs in per.items()},
                 "ratio": None, "ratio_per_rep": None}
        a, b = entry["clients"].get(MINE), entry["clients"].get(REFERENCE)
        if a and b and b["median"] > 0:
            entry["ratio"] = a["median"] / b["median"]
            theirs = {r["rep"]: r["value"] for r in per.get(REFERENCE, [])}
            entry["ratio_per_rep"] = spread([r["value"] / theirs[r["rep"]] for r in per.get(MINE, [])
                                             if theirs.get(r["rep"], 0) > 0])
        out[w.key] = entry
    return out


class NbdDriverSection:
    def __init__(self, settings: DriverSettings, log) -> None:
        self.settings = settings
        self.log = log
        self.server = Nbdkit("nbdkit", "nbdkit file plugin (default threads)")
        self.clients: list[NbdClientPeer] = [
            ExportdClient(MINE, "exportd: nbd node, FUSE export", "raw"),
            NbdfuseClient(REFERENCE, "nbdfuse (default: multithreaded, multi-conn)", "raw"),
        ]
        self.runs: dict[str, dict[str, list[dict]]] = {}
        self.errors: dict[str, list[str]] = {}

    def run(self, env: PeerEnv, start_peer) -> dict:
        s = self.settings
        self.log(f"nbd-driver: image ({s.image_size // 2**20} MiB raw), nbdkit, clients")
        env.images.prepare({"raw"})
        try:
            start_peer(self.server, env)
            if self.server.status == "ok":
                for c in self.clients:
                    self.errors[c.name] = []
                    c.socket = self.server.socket
                    start_peer(c, env)
            ready = [c for c in self.clients if c.status == "ok"]
            for c in ready:  # warm-up, unrecorded
                try:
                    run_fio(WARMUP, c.fio_paths(False), min(0.5, s.runtime_s),
                            env.scratch.file(f"fio-drv-warmup-{c.name}.json"))
                except FioError as exc:
                    self.log(f"  nbd-driver: {c.name}: warm-up: {exc}")
            for w in WORKLOADS:
                self.runs[w.key] = {c.name: [] for c in ready}
                for rep in range(s.reps):
                    for c in ready:  # A B, A B: drift hits both clients alike
                        self._one(c, w, rep, env)
        finally:
            for c in self.clients:
                c.stop()
            self.server.stop()
        return {
            "settings": asdict(s) | {"export": EXPORT},
            "workloads": [asdict(w) | {"unit": w.unit} for w in WORKLOADS],
            "versions": {"nbdfuse": nbdfuse_version()},
            "server": {"label": self.server.label, "status": self.server.status,
                       "reason": self.server.reason, "command": self.server.info.get("command"),
                       "multi_conn": self.server.info.get("multi_conn")},
            "clients": {c.name: {"label": c.label, "status": c.status, "reason": c.reason,
                                 "command": c.info.get("command"),
                                 "exit_status": c.info.get("exit_status")} for c in self.clients},
            "runs": self.runs,
            "errors": self.errors,
            "summary": summarize(self.runs),
        }

    def _one(self, c: NbdClientPeer, w: Workload, rep: int, env: PeerEnv) -> None:
        if c.status != "ok":
            return
        if not c.alive():
            c.status = "failed"
            c.reason = "died during the run"
            self.log(f"  nbd-driver: {c.name}: {c.reason}")
            c.kill()
            return
        try:
            cpu0 = cpu_seconds(c.pid)
            result = run_fio(w, c.fio_paths(False), self.settings.runtime_s,
                             env.scratch.file(f"fio-drv-{w.key}-{c.name}-{rep}.json"),
                             on_hang=c.kill)
            cpu_us = (cpu_seconds(c.pid) - cpu0) * 1e6 / result.ios
        except FioError as exc:
            self.errors[c.name].append(f"{w.key} #{rep + 1}: {exc}")
            self.log(f"  nbd-driver: {w.key} #{rep + 1} {c.name}: {exc}")
            return
        load = round(load_average()[0], 2)
        value = result.value(w.metric)
        self.runs[w.key][c.name].append({"rep": rep, "value": value, "loadavg_1min": load,
                                         "cpu_us_per_io": round(cpu_us, 1)})
        self.log(f"  nbd-driver: {w.key} #{rep + 1} {c.name}: {value:,.0f} {w.unit}, "
                 f"{cpu_us:.1f} us CPU per I/O (load {load})")


def run_section(mode: str, image_size: int, runtime_s: float, reps: int,
                exportd_cmd: list[str] | None, exportd_missing_reason: str,
                exportd_env: dict[str, str], log) -> dict:
    """The whole section in a scratch directory of its own (removed at the end)."""
    missing = driver_available()
    if missing:
        log(f"nbd-driver: skipped: {missing}")
        return {"skipped": missing}
    from .session import start_peer  # late: session imports the other sections
    settings = driver_settings(mode, image_size, runtime_s, reps)
    scratch = Scratch()
    try:
        env = PeerEnv(scratch=scratch, images=Images(scratch.dir("images"), settings.image_size),
                      exportd_cmd=exportd_cmd, exportd_missing_reason=exportd_missing_reason,
                      pyfuse3_python="", pyfuse3_script=Path(), exportd_env=exportd_env)
        return NbdDriverSection(settings, log).run(env, start_peer)
    finally:
        scratch.cleanup()


def nbd_driver_markdown(section: dict | None) -> list[str]:
    """One row per figure: exportd, nbdfuse, load, exportd / nbdfuse."""
    title = "## NBD driver (issue 13): a FUSE export of an nbd node against nbdfuse"
    if not section:
        return []
    if "skipped" in section:
        return [title, "", f"Skipped: {section['skipped']}.", ""]
    s, summary, clients = section["settings"], section["summary"], section["clients"]
    size = s["image_size"]
    size_text = f"{size // 2**30} GiB" if size >= 2**30 else f"{size // 2**20} MiB"
    server = section["server"]
    lines = [
        title, "",
        f"Both clients of one nbdkit file plugin (default threads, multi-conn "
        f"{server.get('multi_conn')}) on a {size_text} raw image on tmpfs over a UNIX socket; "
        f"fio O_DIRECT on the mounted file, {s['runtime_s']:g} s per run, {s['reps']} "
        "repetition(s) interleaved. Cells: median [min–max]; *load*: 1-minute load average at "
        "the end of the row's runs [min–max]; *exportd / nbdfuse*: ratio of the medians (> 1: "
        "exportd is faster) with the per-repetition ratios' range; *CPU per I/O*: the client "
        "process's user + system time (all threads) during the run over fio's I/O count, "
        "less sensitive to the machine's other load than throughput. "
        + "; ".join(v for v in section.get("versions", {}).values() if v) + ".",
        "",
    ]
    down = [f"{n}: {c['status']}: {c['reason']}" for n, c in clients.items()
            if c["status"] not in ("ok", "stopped")]
    if server["status"] not in ("ok", "stopped"):
        down.insert(0, f"nbdkit: {server['status']}: {server['reason']}")
    if down:
        lines += ["Not measured: " + "; ".join(_short(d, 200) for d in down) + ".", ""]
    lines += [f"| figure | {MINE} | {REFERENCE} | load | {MINE} / {REFERENCE} | CPU per I/O, "
              f"{MINE} | CPU per I/O, {REFERENCE} |", "|---|---:|---:|---:|---:|---:|---:|"]
    for w in section["workloads"]:
        entry = summary[w["key"]]
        cells = [w["title"]]
        for n in (MINE, REFERENCE):
            sp = entry["clients"].get(n)
            cells.append(_spread_cell(sp, ",.0f", " " + w["unit"]) if sp else "n/a")
        cells.append(_spread_cell(entry["loadavg"], ".2f") or "")
        ratio = "n/a" if entry["ratio"] is None else f"{entry['ratio']:.2f}x"
        pr = entry["ratio_per_rep"]
        if pr and pr["min"] != pr["max"]:
            ratio += f" [{pr['min']:.2f}–{pr['max']:.2f}]"
        cells.append(ratio)
        for n in (MINE, REFERENCE):
            cells.append(_spread_cell(entry.get("cpu_us_per_io", {}).get(n), ".1f", " us") or "n/a")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "| process | status | command |", "|---|---|---|"]
    if server.get("command"):
        lines.append(f"| server | {_cell(server['status'])} | "
                     f"`{_cell(_scratchless(' '.join(server['command'])))}` |")
    for n, c in clients.items():
        status = c["status"]
        errors = section["errors"].get(n) or []
        if errors:
            status += f"; {len(errors)} failed run(s), first: {errors[0]}"
        command = _scratchless(" ".join(c["command"])) if c.get("command") else ""
        lines.append(f"| {n} | {_cell(_short(status, 300))} | "
                     + (f"`{_cell(command)}` |" if command else " |"))
    lines.append("")
    return lines
