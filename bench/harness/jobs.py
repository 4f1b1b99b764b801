"""The "jobs" section (issue 12): does a block job stall the daemon's other exports?

One daemon, two FUSE exports: A on a qcow2 image, B on another qcow2 image
of the same size. fio reads 4 KiB blocks at random from A at QD1, first with
no job, then while a mirror (sync=full, to a new qcow2) of B's node runs at
full speed; a mirror that reaches READY before fio is done is cancelled (a
soft cancel: the copy stays consistent, the source stays in place) and a new
one starts on a fresh target, so the reads always meet a job that copies.
The job's throughput comes from query-block-jobs' offset, sampled while it
copies.

A second figure checks that `speed` is a real limit: a mirror started with
speed=S alone on the daemon, its offset sampled over a few seconds.

qemu-storage-daemon runs the same in its best configuration for this: export
A in an iothread of its own (`--object iothread`, `iothread=` on the export),
so that the job, in the main loop, shares no loop with A's reads. exportd has
one loop for everything (it accepts and ignores `iothread=`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .fio import fio_command
from .machine import load_average
from .peers import PeerEnv, PeerUnavailable, ProcessPeer
from .qmp import QMP_TIMEOUT_S, connect
from .workloads import BY_KEY

READ_LOAD = BY_KEY["rand-read"]   # 4 KiB randread, psync, QD1, direct=1
PERCENTILES = "50:99:99.9"
SAMPLE_S = 0.05                    # query-block-jobs period while a job runs


@dataclass(frozen=True)
class JobSettings:
    runtime_s: float          # per fio run
    reps: int
    speed: int                # bytes/s for the rate-limit figure
    speed_window_s: float     # how long the rate is measured


def job_settings(mode: str, runtime_s: float, reps: int) -> JobSettings:
    if mode == "quick":
        return JobSettings(max(runtime_s, 1.0), reps, 8 << 20, 3.0)
    return JobSettings(runtime_s, reps, 32 << 20, 6.0)


class JobDaemon(ProcessPeer):
    """A daemon with nodes `nodeA` (export A) and `nodeB` (export B, the job's source)."""

    def __init__(self, name: str, label: str, kind: str) -> None:
        super().__init__(name, label, "qcow2")
        self.kind = kind  # exportd | qsd
        self.targets = 0

    def start(self, env: PeerEnv) -> None:
        if self.kind == "qsd":
            program = shutil.which("qemu-storage-daemon")
            if program is None:
                raise PeerUnavailable("qemu-storage-daemon not installed (qemu-system-common)")
            program = [program]
        else:
            if env.exportd_cmd is None:
                raise PeerUnavailable(env.exportd_missing_reason)
            program = list(env.exportd_cmd)
        self.workdir = env.scratch.dir(self.name)
        # Private copies: no daemon meets another's image locks.
        image_a = env.images.private_copy("qcow2", f"{self.name}-A")
        image_b = env.images.private_copy("qcow2", f"{self.name}-B")
        self.size = env.images.size
        args = []
        export_a = ""
        if self.kind == "qsd":
            args += ["--object", "iothread,id=iot0"]
            export_a = ",iothread=iot0"
        for node, image in (("A", image_a), ("B", image_b)):
            args += ["--blockdev", f"driver=file,node-name=file{node},filename={image}",
                     "--blockdev", f"driver=qcow2,node-name=node{node},file=file{node}"]
        self.mountpoints = []
        # B read-only: qemu-storage-daemon's writable FUSE export takes the
        # resize permission, which the mirror job's source edge does not share.
        for node, extra in (("A", f"writable=on{export_a}"), ("B", "writable=off")):
            mountpoint = self.workdir / f"export{node}.raw"
            mountpoint.touch()
            self.mountpoints.append(mountpoint)
            args += ["--export", f"type=fuse,id=export{node},node-name=node{node},"
                     f"mountpoint={mountpoint},{extra}"]
        self.qmp_path = self.workdir / "qmp.sock"
        args += ["--chardev", f"socket,id=mon0,path={self.qmp_path},server=on,wait=off",
                 "--monitor", "chardev=mon0"]
        environ = dict(env.exportd_env) if self.kind == "exportd" else {}
        self._launch(env, program + args, self.workdir, environ)
        self._wait_ready(extra_ready=self.qmp_path.exists)

    def new_target(self) -> tuple[str, Path]:
        """A fresh, empty qcow2 file of B's size (made while no daemon holds it)."""
        self.targets += 1
        node = f"tgt{self.targets}"
        path = self.workdir / f"{node}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
                        str(path), str(self.size)], check=True, capture_output=True)
        return node, path


@dataclass
class JobStats:
    """What the job loop saw: bytes copied while copying, and for how long."""
    rounds: int = 0
    copied: int = 0
    copying_s: float = 0.0
    window_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "bytes": self.copied, "copying_s": round(self.copying_s, 3),
                "window_s": round(self.window_s, 3),
                # the sample pair spanning fio's start counts whole: at most one period over
                "duty": round(min(1.0, self.copying_s / self.window_s), 3) if self.window_s else None,
                "bytes_per_s": self.copied / self.copying_s if self.copying_s else None,
                "errors": self.errors}


class Mirrors:
    """Runs mirrors of nodeB over one QMP connection, one after another."""

    def __init__(self, daemon: JobDaemon, client) -> None:
        self.daemon = daemon
        self.client = client

    async def q(self, command: str, args: dict | None = None):
        return await asyncio.wait_for(self.client.execute(command, args), QMP_TIMEOUT_S)

    async def start(self, speed: int = 0) -> tuple[str, str, Path]:
        node, path = await asyncio.to_thread(self.daemon.new_target)
        await self.q("blockdev-add", {"driver": "qcow2", "node-name": node,
                                      "file": {"driver": "file", "filename": str(path)}})
        job = f"job-{node}"
        args = {"job-id": job, "device": "nodeB", "target": node, "sync": "full"}
        if speed:
            args["speed"] = speed
        await self.q("blockdev-mirror", args)
        return job, node, path

    async def info(self, job: str) -> dict | None:
        for j in await self.q("query-block-jobs"):
            if j["device"] == job:
                return j
        return None

    async def finish(self, job: str, node: str, path: Path) -> None:
        """Cancel (soft once READY: the copy stays consistent) and drop the target."""
        if await self.info(job) is not None:
            try:
                await self.q("block-job-cancel", {"device": job})
            except Exception:  # it may have just concluded
                pass
            deadline = time.monotonic() + QMP_TIMEOUT_S
            while await self.info(job) is not None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job {job} still there {QMP_TIMEOUT_S:.0f} s after cancel")
                await asyncio.sleep(0.02)
        await self.q("blockdev-del", {"node-name": node})
        path.unlink(missing_ok=True)

    async def keep_copying(self, stop: asyncio.Event, copying: asyncio.Event, stats: JobStats) -> None:
        """Mirror after mirror until `stop`; `copying` is set once the first one copies."""
        while not stop.is_set():
            job, node, path = await self.start()
            stats.rounds += 1
            last = None
            try:
                while not stop.is_set():
                    info = await self.info(job)
                    now = time.monotonic()
                    if info is None:
                        break
                    if last is not None and not last[2]:
                        stats.copied += info["offset"] - last[1]
                        stats.copying_s += now - last[0]
                    last = (now, info["offset"], info["ready"])
                    if info["ready"]:
                        break
                    copying.set()
                    try:
                        await asyncio.wait_for(stop.wait(), SAMPLE_S)
                    except TimeoutError:
                        pass
            finally:
                await self.finish(job, node, path)


def _percentiles(doc: dict) -> dict:
    job = doc["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job failed: error {job['error']}")
    read = job["read"]
    clat = read["clat_ns"]
    pct = clat.get("percentile", {})
    if read["total_ios"] == 0:
        raise RuntimeError("fio completed no I/O")
    return {"iops": read["iops"], "ios": read["total_ios"],
            "p50_us": pct["50.000000"] / 1000, "p99_us": pct["99.000000"] / 1000,
            "p999_us": pct["99.900000"] / 1000, "max_us": clat["max"] / 1000,
            "mean_us": clat["mean"] / 1000}


async def run_read_load(path: Path, runtime_s: float, output: Path) -> dict:
    cmd = fio_command(READ_LOAD, [path], runtime_s, output)
    first_job = cmd.index(next(c for c in cmd if c.startswith("--name=")))
    cmd.insert(first_job, f"--percentile_list={PERCENTILES}")
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), runtime_s + 60)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    text = output.read_text() if output.exists() else ""
    if not text.strip():
        raise RuntimeError(f"fio wrote nothing (status {proc.returncode}): "
                           f"{stderr.decode(errors='replace').strip()[-300:]}")
    return _percentiles(json.loads(text[text.find("{"):]))


async def measure_reads(daemon: JobDaemon, runtime_s: float, output: Path, with_job: bool) -> dict:
    """One fio run on export A, alone or while mirrors of B copy."""
    if not with_job:
        result = await run_read_load(daemon.mountpoints[0], runtime_s, output)
        return result | {"loadavg_1min": round(load_average()[0], 2)}
    client = await connect(daemon.qmp_path)
    try:
        mirrors = Mirrors(daemon, client)
        stop, copying, stats = asyncio.Event(), asyncio.Event(), JobStats()
        loop_task = asyncio.create_task(mirrors.keep_copying(stop, copying, stats))
        try:
            waiter = asyncio.create_task(copying.wait())
            await asyncio.wait({waiter, loop_task}, timeout=QMP_TIMEOUT_S,
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if loop_task.done():
                loop_task.result()  # raises what went wrong
                raise RuntimeError("the job loop ended before fio started")
            if not copying.is_set():
                raise RuntimeError("no job started copying")
            copied0, copying0 = stats.copied, stats.copying_s
            t0 = time.monotonic()
            result = await run_read_load(daemon.mountpoints[0], runtime_s, output)
            window = time.monotonic() - t0
        finally:
            stop.set()
            await loop_task
        # only what the job did while fio ran
        inside = JobStats(stats.rounds, stats.copied - copied0, stats.copying_s - copying0, window)
        return result | {"job": inside.as_dict(), "loadavg_1min": round(load_average()[0], 2)}
    finally:
        await client.disconnect()


def steady_rate(samples: list[tuple[float, int]]) -> float | None:
    """Bytes/s between the first and the last sample at which the offset
    moved. A daemon that copies a buffer at once and then sleeps it off
    (QEMU: 16 MiB, then 2 s at 8 MiB/s) advances in steps; measured from step
    to step, a window of a few seconds still gives its rate."""
    moved = [i for i in range(1, len(samples)) if samples[i][1] != samples[i - 1][1]]
    if len(moved) < 2:
        return None
    (t0, o0), (t1, o1) = samples[moved[0]], samples[moved[-1]]
    return (o1 - o0) / (t1 - t0) if t1 > t0 else None


async def measure_speed(daemon: JobDaemon, speed: int, window_s: float) -> dict:
    """A mirror with speed=`speed` alone, its offset sampled every 0.1 s
    for `window_s` seconds from the command's return."""
    client = await connect(daemon.qmp_path)
    try:
        mirrors = Mirrors(daemon, client)
        job, node, path = await mirrors.start(speed)
        t0 = time.monotonic()
        samples: list[tuple[float, int]] = [(0.0, 0)]
        try:
            while time.monotonic() - t0 < window_s:
                await asyncio.sleep(0.1)
                info = await mirrors.info(job)
                if info is None or info["ready"]:
                    raise RuntimeError("the rate-limited mirror finished inside the window "
                                       "(image too small)")
                samples.append((round(time.monotonic() - t0, 3), info["offset"]))
                reported = info["speed"]
        finally:
            await mirrors.finish(job, node, path)
        rate = steady_rate(samples)
        if rate is None:
            raise RuntimeError(f"the offset moved fewer than twice in {window_s:g} s")
        t_end, copied = samples[-1]
        return {"speed": speed, "reported_speed": reported, "window_s": t_end, "bytes": copied,
                "bytes_per_s": rate, "ratio": rate / speed,
                "bytes_per_s_from_start": copied / t_end, "samples": samples}
    finally:
        await client.disconnect()


def spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


FIGURES = ("p50_us", "p99_us", "max_us", "iops")


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """Per daemon: medians of each figure with and without a job, the
    with/without ratio per repetition (min/median/max), the job's
    throughput; and exportd / qsd for each figure and condition."""
    out: dict[str, dict] = {}
    for name, by_cond in runs.items():
        entry: dict[str, dict] = {}
        pairs = list(zip(by_cond.get("without", []), by_cond.get("with", []), strict=False))
        for fig in FIGURES:
            entry[fig] = {
                "without": spread([r[fig] for r in by_cond.get("without", [])]),
                "with": spread([r[fig] for r in by_cond.get("with", [])]),
                "with_over_without": spread([w[fig] / wo[fig] for wo, w in pairs if wo[fig] > 0]),
            }
        jobs = [r["job"] for r in by_cond.get("with", []) if r.get("job")]
        entry["job_bytes_per_s"] = spread([j["bytes_per_s"] for j in jobs if j["bytes_per_s"]])
        entry["job_duty"] = spread([j["duty"] for j in jobs if j["duty"] is not None])
        entry["loadavg_1min"] = spread([r["loadavg_1min"] for c in by_cond.values() for r in c])
        out[name] = entry
    if "exportd" in runs and "qsd" in runs:
        vs: dict[str, dict] = {}
        for cond in ("without", "with"):
            for fig in FIGURES:
                mine = [r[fig] for r in runs["exportd"].get(cond, [])]
                theirs = [r[fig] for r in runs["qsd"].get(cond, [])]
                vs.setdefault(fig, {})[cond] = spread(
                    [a / b for a, b in zip(mine, theirs, strict=False) if b > 0])
        out["exportd_over_qsd"] = vs
    return out


class JobsSection:
    """The whole section: both daemons up, repetitions interleaved, then the speed figure."""

    def __init__(self, settings: JobSettings, log) -> None:
        self.settings = settings
        self.log = log
        self.daemons = [JobDaemon("exportd", "exportd", "exportd"),
                        JobDaemon("qsd", "qemu-storage-daemon (export A in an iothread)", "qsd")]
        self.runs: dict[str, dict[str, list[dict]]] = {}
        self.errors: dict[str, list[str]] = {}
        self.speed: dict[str, dict] = {}

    def run(self, env: PeerEnv, start_peer) -> dict:
        self.log(f"jobs: images ({env.images.size // 2**20} MiB qcow2), daemons")
        env.images.prepare({"qcow2"})
        for d in self.daemons:
            start_peer(d, env)
            self.runs[d.name] = {"without": [], "with": []}
            self.errors[d.name] = []
        try:
            ready = [d for d in self.daemons if d.status == "ok"]
            s = self.settings
            for d in ready:  # warm-up, unrecorded: first-touch costs of export A
                self._one(d, env, "warmup", False, 0, min(0.5, s.runtime_s), record=False)
            for rep in range(s.reps):
                for with_job in (False, True):
                    for d in ready:
                        self._one(d, env, "with" if with_job else "without", with_job, rep, s.runtime_s)
            for d in ready:
                if not d.alive():
                    continue
                try:
                    self.speed[d.name] = asyncio.run(measure_speed(d, s.speed, s.speed_window_s))
                    sp = self.speed[d.name]
                    self.log(f"  jobs: {d.name}: speed={s.speed >> 20} MiB/s measured "
                             f"{sp['bytes_per_s'] / 2**20:.2f} MiB/s ({sp['ratio']:.2f}x)")
                except Exception as exc:
                    self.errors[d.name].append(f"speed: {type(exc).__name__}: {exc}")
                    self.log(f"  jobs: {d.name}: speed: {exc}")
        finally:
            for d in self.daemons:
                d.stop()
        return {
            "settings": {"runtime_s": s.runtime_s, "reps": s.reps, "speed": s.speed,
                         "speed_window_s": s.speed_window_s, "image_size": env.images.size,
                         "read_load": "fio randread bs=4k psync iodepth=1 direct=1 on export A",
                         "job": "blockdev-mirror sync=full of node B to a new qcow2, "
                                "restarted on a fresh target when READY"},
            "daemons": {d.name: {"label": d.label, "status": d.status, "reason": d.reason,
                                 "command": d.info.get("command"),
                                 "exit_status": d.info.get("exit_status")} for d in self.daemons},
            "runs": self.runs,
            "errors": self.errors,
            "summary": summarize(self.runs),
            "speed": self.speed,
        }

    def _one(self, d: JobDaemon, env: PeerEnv, cond: str, with_job: bool, rep: int,
             runtime_s: float, record: bool = True) -> None:
        if d.status != "ok":
            return
        if not d.alive():
            d.status, d.reason = "failed", "server died during the run"
            self.log(f"  jobs: {d.name}: {d.reason}")
            return
        output = env.scratch.file(f"fio-jobs-{d.name}-{cond}-{rep}.json")
        try:
            result = asyncio.run(measure_reads(d, runtime_s, output, with_job))
        except Exception as exc:
            self.errors[d.name].append(f"{cond} #{rep + 1}: {type(exc).__name__}: {exc}")
            self.log(f"  jobs: {d.name} {cond} #{rep + 1}: {type(exc).__name__}: {exc}")
            return
        if not record:
            return
        result["rep"] = rep
        self.runs[d.name][cond].append(result)
        job = result.get("job")
        self.log(f"  jobs: {d.name} {cond} job #{rep + 1}: p50 {result['p50_us']:.1f} us, "
                 f"p99 {result['p99_us']:.1f} us, max {result['max_us']:.0f} us, "
                 f"{result['iops']:,.0f} IOPS"
                 + (f"; job {job['bytes_per_s'] / 2**20:,.0f} MiB/s, duty {job['duty']:.2f}, "
                    f"{job['rounds']} round(s)" if job and job["bytes_per_s"] else ""))


def jobs_available() -> str:
    """Why the section cannot run here ('' when it can)."""
    for tool in ("qemu-img",):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "no /dev/fuse"
    return ""
