"""The "nbd" section (issue 13, Speed): exportd's NBD export against the NBD servers
a user would otherwise run, on the same tmpfs raw image, from the same clients.

Servers (each on a private copy of the raw image, a UNIX socket of its own):
- qemu-nbd in its best configuration on this machine (see QEMU_NBD_OPTIONS);
- qemu-storage-daemon 7.2's NBD export, in its main loop (7.2 aborts, by a race,
  when a client of an export in an iothread disconnects);
- nbdkit's file plugin with its default threads;
- exportd's NBD export (QEMU's --nbd-server / --export type=nbd syntax), only
  when the exportd in use has nbd-server-start: otherwise "not available".

Clients: fio's nbd engine (libnbd, one connection per job) for 4 KiB random
read/write at QD1 and QD16 and 1 MiB sequential read/write, and nbdcopy of the
whole image out (to null:) and in (from a tmpfs copy), with nbdcopy's default
connections (multi-conn when the server advertises it). Repetitions interleave
the servers; every run keeps the 1-minute load average at its end.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .machine import load_average
from .peers import PeerEnv, PeerUnavailable, ProcessPeer, _last_line

EXPORT = "disk"
# Picked with a probe (fio nbd, 1 s runs, 256 MiB image, load 5-8): -t keeps
# the server up between clients; --shared=8 allows several connections and
# makes qemu-nbd advertise multi-conn (nbdcopy then uses 4 connections);
# --cache=none --aio=native gave the best 4 KiB QD1 read (19.4k IOPS vs
# 9.6-13.2k for writeback/threads and io_uring) and tied elsewhere.
QEMU_NBD_OPTIONS = ["-t", "--shared=8", "--cache=none", "--aio=native"]


@dataclass(frozen=True)
class NbdWorkload:
    key: str
    title: str
    tool: str          # fio | nbdcopy
    rw: str = ""       # fio rw=, or nbdcopy direction (out | in)
    bs: str = ""
    iodepth: int = 1
    unit: str = "IOPS"


WORKLOADS = (
    NbdWorkload("rr1", "4 KiB random read, QD1", "fio", "randread", "4k", 1),
    NbdWorkload("rw1", "4 KiB random write, QD1", "fio", "randwrite", "4k", 1),
    NbdWorkload("rr16", "4 KiB random read, QD16", "fio", "randread", "4k", 16),
    NbdWorkload("rw16", "4 KiB random write, QD16", "fio", "randwrite", "4k", 16),
    NbdWorkload("sr", "1 MiB sequential read, QD1", "fio", "read", "1M", 1, "MiB/s"),
    NbdWorkload("sw", "1 MiB sequential write, QD1", "fio", "write", "1M", 1, "MiB/s"),
    NbdWorkload("copy-out", "nbdcopy of the image out (to null:)", "nbdcopy", "out", unit="MiB/s"),
    NbdWorkload("copy-in", "nbdcopy of the image in (from a tmpfs file)", "nbdcopy", "in",
                unit="MiB/s"),
)
REFERENCES = ("qsd", "qemu-nbd")   # the target: ahead of these on every figure


@dataclass(frozen=True)
class NbdSettings:
    runtime_s: float   # per fio run
    reps: int


def nbd_settings(mode: str, runtime_s: float, reps: int) -> NbdSettings:
    # Full mode: 2 s per fio run (the section's 4 servers x 8 figures x 3
    # repetitions stay near 4 minutes); at least 3 repetitions, QD1 swings.
    if mode == "quick":
        return NbdSettings(min(runtime_s, 1.0), reps)
    return NbdSettings(min(runtime_s, 2.0), max(reps, 3))


def uri(socket: Path) -> str:
    return f"nbd+unix:///{EXPORT}?socket={socket}"


class NbdServer(ProcessPeer):
    """A server process that serves EXPORT on `self.socket`."""

    def __init__(self, name: str, label: str) -> None:
        super().__init__(name, label, "raw")

    def command(self, env: PeerEnv, image: Path) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self, env: PeerEnv) -> None:
        self.workdir = env.scratch.dir(f"nbd-{self.name}")
        self.socket = self.workdir / "nbd.sock"
        cmd, environ = self.command(env, env.images.private_copy("raw", f"nbd-{self.name}"))
        self._launch(env, cmd, self.workdir, environ)
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.proc.poll() is not None:
                last = _last_line(self.log_path)
                raise PeerUnavailable(f"exited with status {self.proc.returncode}"
                                      + (f": {last}" if last else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise PeerUnavailable("no socket after 20 s")
            time.sleep(0.05)
        self.info["multi_conn"] = multi_conn(self.socket)

    def fio_paths(self, two_exports: bool) -> list[Path]:
        return []


class QemuNbd(NbdServer):
    def command(self, env, image):
        program = shutil.which("qemu-nbd")
        if program is None:
            raise PeerUnavailable("qemu-nbd not installed (qemu-utils)")
        return [program, f"--socket={self.socket}", "-f", "raw", "-x", EXPORT,
                *QEMU_NBD_OPTIONS, str(image)], {}


class QsdNbd(NbdServer):
    def command(self, env, image):
        program = shutil.which("qemu-storage-daemon")
        if program is None:
            raise PeerUnavailable("qemu-storage-daemon not installed (qemu-system-common)")
        # No iothread: with the export in an iothread, 7.2 aborts when a client
        # disconnects (nbd_blockdev_client_closed: Assertion
        # `qemu_in_main_thread() && nbd_server' failed): a race, here within
        # 1-3 short fio runs, and on SIGTERM.
        return [program,
                "--blockdev", f"driver=file,node-name=file0,filename={image}",
                "--nbd-server", f"addr.type=unix,addr.path={self.socket}",
                "--export", f"type=nbd,id=e,node-name=file0,name={EXPORT},writable=on"], {}


class Nbdkit(NbdServer):
    def command(self, env, image):
        program = shutil.which("nbdkit")
        if program is None:
            raise PeerUnavailable("nbdkit not installed")
        # -f: stay in the foreground, so the harness owns the pid.
        return [program, "-f", "--unix", str(self.socket), "--exportname", EXPORT,
                "file", str(image)], {}


class ExportdNbd(NbdServer):
    def command(self, env, image):
        if env.exportd_cmd is None:
            raise PeerUnavailable(env.exportd_missing_reason)
        missing = exportd_lacks_nbd(env)
        if missing:
            raise PeerUnavailable(missing)
        return [*env.exportd_cmd,
                "--blockdev", f"driver=file,node-name=file0,filename={image}",
                "--nbd-server", f"addr.type=unix,addr.path={self.socket}",
                "--export", f"type=nbd,id=e,node-name=file0,name={EXPORT},writable=on",
                # a monitor of its own: the default socket may be another daemon's
                "--chardev", f"socket,id=mon0,path={self.workdir / 'qmp.sock'},server=on,wait=off",
                "--monitor", "chardev=mon0"], \
            dict(env.exportd_env)


def exportd_lacks_nbd(env: PeerEnv) -> str:
    """'' when this exportd has an NBD server (its --help names --nbd-server)."""
    try:
        out = subprocess.run([*env.exportd_cmd, "--help"], capture_output=True, text=True,
                             timeout=30, env=os.environ | env.exportd_env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not available: exportd --help failed ({exc})"
    if "--nbd-server" not in out.stdout + out.stderr:
        return "not available: this exportd has no NBD server (no --nbd-server in --help)"
    return ""


def multi_conn(socket: Path) -> bool | None:
    try:
        out = subprocess.run(["nbdinfo", "--json", uri(socket)], capture_output=True,
                             text=True, timeout=20)
        return json.loads(out.stdout)["exports"][0].get("can_multi_conn")
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
        return None


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"{Path(cmd[0]).name} exited with status {proc.returncode}"
                           + (f": {tail[-1]}" if tail else ""))
    return proc


def run_fio(w: NbdWorkload, socket: Path, runtime_s: float, output: Path) -> float:
    cmd = ["fio", "--output-format=json", f"--output={output}", "--name=nbd",
           "--ioengine=nbd", f"--uri={uri(socket)}", f"--rw={w.rw}", f"--bs={w.bs}",
           f"--iodepth={w.iodepth}", "--time_based", f"--runtime={int(runtime_s * 1000)}ms",
           "--randrepeat=0"]
    _run(cmd, runtime_s + 60)
    text = output.read_text()
    job = json.loads(text[text.find("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    side = job["write" if "write" in w.rw else "read"]
    if side["total_ios"] == 0:
        raise RuntimeError("fio completed no I/O")
    return side["iops"] if w.unit == "IOPS" else side["bw_bytes"] / 2**20


def run_nbdcopy(w: NbdWorkload, socket: Path, source: Path, size: int) -> float:
    src, dst = (uri(socket), "null:") if w.rw == "out" else (str(source), uri(socket))
    t0 = time.monotonic()
    _run(["nbdcopy", src, dst], 600)
    return size / 2**20 / (time.monotonic() - t0)


def spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """Per figure: each server's median [min-max] and load; exportd / each other
    server (ratio of medians, and the per-repetition ratios' range); targets."""
    out: dict[str, dict] = {}
    for w in WORKLOADS:
        per = runs.get(w.key, {})
        entry = {"servers": {n: spread([r["value"] for r in rs]) for n, rs in per.items()},
                 "loadavg": spread([r["loadavg_1min"] for rs in per.values() for r in rs]),
                 "ratios": {}, "targets": {}}
        mine = per.get("exportd", [])
        for other, theirs in per.items():
            if other == "exportd":
                continue
            a, b = entry["servers"].get("exportd"), entry["servers"].get(other)
            pairs = {r["rep"]: r["value"] for r in theirs}
            per_rep = [r["value"] / pairs[r["rep"]] for r in mine
                       if pairs.get(r["rep"], 0) > 0]
            ratio = a["median"] / b["median"] if a and b and b["median"] > 0 else None
            entry["ratios"][other] = {"of_medians": ratio, "per_rep": spread(per_rep)}
            if other in REFERENCES:
                entry["targets"][other] = ("n/a" if ratio is None
                                           else "met" if ratio > 1 else "missed")
        for ref in REFERENCES:
            entry["targets"].setdefault(ref, "n/a")
        out[w.key] = entry
    return out


def versions() -> dict[str, str]:
    out = {}
    for tool in ("qemu-nbd", "nbdkit", "nbdcopy"):
        try:
            text = subprocess.run([tool, "--version"], capture_output=True, text=True,
                                  timeout=20).stdout.strip().splitlines()
            out[tool] = text[0] if text else ""
        except OSError:
            out[tool] = "not installed"
    return out


def nbd_available() -> str:
    for tool in ("fio", "nbdcopy", "nbdinfo"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return ""


class NbdSection:
    def __init__(self, settings: NbdSettings, log) -> None:
        self.settings = settings
        self.log = log
        self.servers: list[NbdServer] = [
            ExportdNbd("exportd", "exportd, NBD export"),
            QsdNbd("qsd", "qemu-storage-daemon 7.2, NBD export (main loop)"),
            QemuNbd("qemu-nbd", "qemu-nbd " + " ".join(QEMU_NBD_OPTIONS)),
            Nbdkit("nbdkit", "nbdkit file plugin (default threads)"),
        ]
        self.runs: dict[str, dict[str, list[dict]]] = {}
        self.errors: dict[str, list[str]] = {}

    def run(self, env: PeerEnv, start_peer) -> dict:
        s = self.settings
        self.log(f"nbd: image ({env.images.size // 2**20} MiB raw), servers")
        env.images.prepare({"raw"})
        source = env.images.private_copy("raw", "nbdcopy-source")
        for d in self.servers:
            self.errors[d.name] = []
            start_peer(d, env)
        try:
            ready = [d for d in self.servers if d.status == "ok"]
            for d in ready:  # warm-up, unrecorded
                try:
                    run_fio(WORKLOADS[1], d.socket, min(0.5, s.runtime_s),
                            env.scratch.file(f"fio-nbd-warmup-{d.name}.json"))
                except Exception as exc:
                    self.log(f"  nbd: {d.name}: warm-up: {exc}")
            for w in WORKLOADS:
                self.runs[w.key] = {d.name: [] for d in ready}
                for rep in range(s.reps):
                    for d in ready:  # A B C D, A B C D: drift hits every server alike
                        self._one(d, w, rep, env, source)
        finally:
            for d in self.servers:
                d.stop()
            source.unlink(missing_ok=True)
        return {
            "settings": asdict(s) | {"image_size": env.images.size, "export": EXPORT,
                                     "qemu_nbd_options": QEMU_NBD_OPTIONS},
            "workloads": [asdict(w) for w in WORKLOADS],
            "versions": versions(),
            "servers": {d.name: {"label": d.label, "status": d.status, "reason": d.reason,
                                 "command": d.info.get("command"),
                                 "multi_conn": d.info.get("multi_conn"),
                                 "exit_status": d.info.get("exit_status")} for d in self.servers},
            "runs": self.runs,
            "errors": self.errors,
            "summary": summarize(self.runs),
        }

    def _one(self, d: NbdServer, w: NbdWorkload, rep: int, env: PeerEnv, source: Path) -> None:
        if d.status != "ok":
            return
        if not d.alive():
            d.status, d.reason = "failed", "server died during the run: " + _last_line(d.log_path)
            self.log(f"  nbd: {d.name}: {d.reason}")
            return
        try:
            if w.tool == "fio":
                value = run_fio(w, d.socket, self.settings.runtime_s,
                                env.scratch.file(f"fio-nbd-{w.key}-{d.name}-{rep}.json"))
            else:
                value = run_nbdcopy(w, d.socket, source, env.images.size)
        except Exception as exc:
            self.errors[d.name].append(f"{w.key} #{rep + 1}: {type(exc).__name__}: {exc}")
            self.log(f"  nbd: {w.key} #{rep + 1} {d.name}: {exc}")
            return
        load = round(load_average()[0], 2)
        self.runs[w.key][d.name].append({"rep": rep, "value": value, "loadavg_1min": load})
        self.log(f"  nbd: {w.key} #{rep + 1} {d.name}: {value:,.0f} {w.unit} (load {load})")
