"""One benchmark run: start the peers, run the workloads interleaved, measure
the control plane, stop everything, and return the raw record (latest.json)."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from .control import measure_cycles, measure_memory
from .cpu import CpuWindow
from .figures import BEST_OF, CONTROL_METRICS, Figures, issue7_targets, issue17_targets, spread
from .fio import FioError, run_fio
from .images import Images
from .jobs import JobsSection, job_settings, jobs_available
from .machine import load_average, machine_info
from .nbd import NbdSection, nbd_available, nbd_settings
from .peers import (
    DaemonPeer,
    Peer,
    PeerEnv,
    PeerStartError,
    PeerUnavailable,
    control_peers,
    fio_peers,
    select,
)
from .scratch import Scratch, sweep_stale
from .workloads import WARMUP, WORKLOADS, Workload

RECORD_SCHEMA = 1


@dataclass(frozen=True)
class Settings:
    mode: str                 # quick | full
    image_size: int
    runtime_s: float          # per fio run
    reps: int                 # fio repetitions, interleaved across peers
    control_cycles: int
    memory_exports: int
    control_reps: int
    qd1_reps: int = 1         # repetitions of the 4 KiB QD1 workloads (noisiest)
    qd1_runtime_s: float = 1.0
    section_runtime_s: float = 1.0  # per fio run of the jobs / NBD sections (they cap it)

    @staticmethod
    def for_mode(quick: bool) -> Settings:
        if quick:
            return Settings("quick", 64 * 2**20, 1.0, 1, 100, 100, 1, 1, 1.0, 1.0)
        # 17 I/O peers: 3 x 2 s for 1 MiB and QD16, 5 x 2 s for 4 KiB QD1
        # (back-to-back runs of one peer swing up to 4x there: more runs, and
        # shorter, so that the whole stays near 16 min of fio); the sections
        # keep the 4 s they were tuned with.
        return Settings("full", 2**30, 2.0, 3, 100, 100, 3, 5, 2.0, 4.0)

    def reps_for(self, workload: Workload) -> int:
        return max(self.reps, self.qd1_reps) if workload.small_qd1 else self.reps

    def runtime_for(self, workload: Workload) -> float:
        return self.qd1_runtime_s if workload.small_qd1 else self.runtime_s


def log(message: str) -> None:
    # Progress only: a closed stderr (`| head`) must not abort the run or its cleanup.
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text if isinstance(exc, PeerUnavailable) else f"{type(exc).__name__}: {text}"


def _load_1min() -> float:
    return round(load_average()[0], 2)


def start_peer(peer: Peer, env: PeerEnv) -> None:
    peer.info["loadavg_1min_at_start"] = _load_1min()
    try:
        peer.start(env)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # any failure to start makes the peer unavailable, not the run
        # A program that ran and refused (e.g. an exportd without an option
        # yet) is a start error; a missing program or facility is unavailable.
        peer.status = "start-error" if isinstance(exc, PeerStartError) else "unavailable"
        peer.reason = _describe(exc)
        log(f"  {peer.name}: {peer.status.replace('-', ' ')}: {peer.reason}")
        return
    peer.status = "ok"
    log(f"  {peer.name}: ready" + (f" (pid {peer.pid})" if peer.pid else ""))


def stop_peer(peer: Peer) -> None:
    peer.stop()
    peer.info.setdefault("loadavg_1min_at_stop", _load_1min())


def _mark_dead(peer: Peer) -> None:
    last = ""
    log_path = getattr(peer, "log_path", None)
    if log_path is not None and log_path.exists():
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else ""
    peer.status = "failed"
    peer.reason = "server died during the run" + (f": {last}" if last else "")
    peer.kill()
    log(f"  {peer.name}: {peer.reason}")


def _hung(peer: Peer) -> None:
    peer.status = "failed"
    peer.reason = "stopped answering (fio overstayed its runtime by a minute); killed"
    peer.kill()
    log(f"  {peer.name}: {peer.reason}")


class BenchRun:
    def __init__(self, settings: Settings, only: list[str] | None, control: bool,
                 exportd_cmd: list[str] | None, exportd_missing_reason: str,
                 pyfuse3_python: str, repo: Path, exportd_env: dict[str, str] | None = None,
                 note: str = "", jobs: bool = False, nbd: bool = False,
                 passthrough_hp: Path | None = None) -> None:
        self.passthrough_hp = passthrough_hp
        self.jobs = jobs
        self.nbd = nbd
        self.nbd_record: dict | None = None
        self.jobs_record: dict | None = None
        self.exportd_env = exportd_env or {}
        self.note = note
        self.settings = settings
        self.only = only
        self.control = control
        self.exportd_cmd = exportd_cmd
        self.exportd_missing_reason = exportd_missing_reason
        self.pyfuse3_python = pyfuse3_python
        self.repo = repo
        self.peers = select(fio_peers(), only)
        self.ctl_peers: list[DaemonPeer] = control_peers() if control else []
        self.fio_record: dict[str, dict[str, dict]] = {}
        self.control_record: dict[str, dict] = {}

    def estimate_s(self) -> float:
        s = self.settings
        fio = len(self.peers) * sum(s.reps_for(w) * (s.runtime_for(w) + 0.4) for w in WORKLOADS)
        if self.jobs:  # 2 daemons x (without, with) x reps, plus the speed figure
            fio += 4 * self.settings.reps * (self.settings.section_runtime_s + 0.8) + 10
        if self.nbd:  # 4 servers x 6 fio figures x reps, plus the nbdcopy runs
            s = nbd_settings(self.settings.mode, self.settings.section_runtime_s, self.settings.reps)
            fio += 4 * s.reps * (6 * (s.runtime_s + 0.3) + 2 * (0.3 + self.settings.image_size / 2**30))
        return fio

    def run(self) -> dict:
        started, t0 = _now(), time.monotonic()
        machine = machine_info(self.repo, self.exportd_cmd, self.pyfuse3_python)
        for stale in sweep_stale():
            log(f"removed stale scratch directory {stale}")
        scratch = Scratch()
        log(f"scratch directory {scratch.path}; at most ~{self.estimate_s() / 60:.1f} min of fio")
        try:
            images = Images(scratch.dir("images"), self.settings.image_size)
            env = PeerEnv(scratch=scratch, images=images, exportd_cmd=self.exportd_cmd,
                          exportd_missing_reason=self.exportd_missing_reason,
                          pyfuse3_python=self.pyfuse3_python,
                          pyfuse3_script=self.repo / "bench" / "peers" / "pyfuse3_file.py",
                          exportd_env=self.exportd_env, passthrough_hp=self.passthrough_hp)
            self._io_phase(env, scratch)
            if self.jobs:
                self._jobs_phase(env)
            if self.nbd:
                self._nbd_phase(env)
            if self.ctl_peers:
                self._control_phase(env, scratch)
            image_facts = images.facts
        finally:
            try:
                for peer in self.peers + self.ctl_peers:
                    try:
                        stop_peer(peer)
                    except Exception as exc:  # keep cleaning up the others
                        log(f"  {peer.name}: stop failed: {exc}")
            finally:
                scratch.cleanup()
        machine["loadavg_end"] = load_average()
        return self._record(started, time.monotonic() - t0, machine, image_facts)

    # I/O workloads ---------------------------------------------------------

    def _io_phase(self, env: PeerEnv, scratch: Scratch) -> None:
        if not self.peers:
            return
        families = {p.family for p in self.peers}
        log(f"making images ({self.settings.image_size // 2**20} MiB) for {sorted(families)}")
        try:
            env.images.prepare(families)
        except Exception as exc:  # peers needing the images will report it
            log(f"  images: {_describe(exc)}")
        log("starting peers")
        for peer in self.peers:
            start_peer(peer, env)
        active = [p for p in self.peers if p.status == "ok"]
        for peer in active:
            try:
                run_fio(WARMUP, peer.fio_paths(False), min(0.5, self.settings.runtime_s),
                        scratch.file(f"fio-warmup-{peer.name}.json"),
                        on_hang=lambda peer=peer: _hung(peer))
            except FioError as exc:  # the measured runs will show it again
                log(f"  {peer.name}: warm-up: {exc}")
        active = [p for p in active if p.status == "ok"]
        for w in WORKLOADS:
            self.fio_record[w.key] = {p.name: {"runs": [], "errors": []} for p in self.peers}
        total = sum(self.settings.reps_for(w) for w in WORKLOADS) * len(active)
        done = 0
        for w in WORKLOADS:
            for rep in range(self.settings.reps_for(w)):
                for peer in active:  # A B C A B C: drift hits every peer alike
                    done += 1
                    if peer.status != "ok":
                        continue
                    if not peer.alive():
                        _mark_dead(peer)
                        continue
                    entry = self.fio_record[w.key][peer.name]
                    output = scratch.file(f"fio-{w.key}-{peer.name}-{rep}.json")
                    load_before = _load_1min()
                    cpu = CpuWindow(peer.pid)
                    try:
                        result = run_fio(w, peer.fio_paths(w.two_exports), self.settings.runtime_for(w),
                                         output, on_hang=lambda peer=peer: _hung(peer))
                    except FioError as exc:
                        entry["errors"].append(str(exc))
                        log(f"[{done}/{total}] {w.key} #{rep + 1} {peer.name}: fio error: {exc}")
                        if peer.status == "ok" and not peer.alive():
                            _mark_dead(peer)
                        continue
                    entry["runs"].append(result.as_dict() | {
                        "value": result.value(w.metric), "rep": rep,
                        "loadavg_1min_before": load_before, "loadavg_1min": _load_1min()} | cpu.close())
                    log(f"[{done}/{total}] {w.key} #{rep + 1} {peer.name}: "
                        f"{result.value(w.metric):,.0f} {w.unit} "
                        f"(other work: {entry['runs'][-1]['others_cpus']:.2f} CPUs)")
        for peer in self.peers:
            stop_peer(peer)

    # block jobs (issue 12) ---------------------------------------------------

    def _jobs_phase(self, env: PeerEnv) -> None:
        missing = jobs_available()
        if missing:
            log(f"jobs: skipped: {missing}")
            self.jobs_record = {"skipped": missing}
            return
        s = self.settings
        section = JobsSection(job_settings(s.mode, s.section_runtime_s, s.reps), log)
        self.jobs_record = section.run(env, start_peer)

    # NBD export (issue 13) ---------------------------------------------------

    def _nbd_phase(self, env: PeerEnv) -> None:
        missing = nbd_available()
        if missing:
            log(f"nbd: skipped: {missing}")
            self.nbd_record = {"skipped": missing}
            return
        s = self.settings
        section = NbdSection(nbd_settings(s.mode, s.section_runtime_s, s.reps), log)
        self.nbd_record = section.run(env, start_peer)

    # control plane -----------------------------------------------------------

    def _control_phase(self, env: PeerEnv, scratch: Scratch) -> None:
        log("control plane")
        for peer in self.ctl_peers:
            start_peer(peer, env)
            self.control_record[peer.name] = {"cycle_ms": [], "errors": []}
        ready = [p for p in self.ctl_peers if p.status == "ok"]
        for peer in ready:
            entry = self.control_record[peer.name]
            try:
                entry["memory"] = asyncio.run(measure_memory(
                    peer.qmp_path, peer.node_name, peer.pid, scratch.dir(f"{peer.name}-memory"),
                    self.settings.memory_exports))
                log(f"  {peer.name}: {entry['memory']['per_export_kib']:.1f} KiB per extra export")
            except Exception as exc:  # reported per peer; the other daemon still runs
                entry["errors"].append(f"memory: {_describe(exc)}")
                log(f"  {peer.name}: memory: {_describe(exc)}")
        mountpoints = {}
        for peer in ready:
            mountpoints[peer.name] = scratch.dir(f"{peer.name}-cycle") / "cycle.raw"
            mountpoints[peer.name].touch()
        for rep in range(self.settings.control_reps):
            for peer in ready:
                entry = self.control_record[peer.name]
                if entry["errors"] and not entry["cycle_ms"] and rep > 0:
                    continue
                try:
                    ms = asyncio.run(measure_cycles(peer.qmp_path, peer.node_name,
                                                    mountpoints[peer.name],
                                                    self.settings.control_cycles))
                except Exception as exc:
                    entry["errors"].append(f"cycles: {_describe(exc)}")
                    log(f"  {peer.name}: cycles: {_describe(exc)}")
                    continue
                entry["cycle_ms"].append(ms)
                log(f"  {peer.name}: {ms:.2f} ms per add+del cycle")
        for peer in self.ctl_peers:
            stop_peer(peer)

    # the record ---------------------------------------------------------------

    def _record(self, started: str, duration: float, machine: dict, image_facts: dict) -> dict:
        families = {p.name: p.family for p in self.peers + self.ctl_peers}
        figures = Figures(families)
        wl_by_key = {w.key: w for w in WORKLOADS}
        for key, per_peer in self.fio_record.items():
            for name, entry in per_peer.items():
                entry["spread"] = spread([r["value"] for r in entry["runs"]])
                entry["median"] = entry["spread"]["median"] if entry["spread"] else None
                entry["unit"] = wl_by_key[key].unit
                figures.set(name, key, entry["median"])
        for name, entry in self.control_record.items():
            cycles = spread(entry["cycle_ms"])
            entry["cycle_ms_median"] = cycles["median"] if cycles else None
            figures.set(name, "cycle", entry["cycle_ms_median"])
            if "memory" in entry:
                figures.set(name, "memory", entry["memory"]["per_export_kib"])
                figures.set(name, "memory-io", entry["memory"]["per_export_after_io_kib"])
        best_of = figures.add_best_of()
        targets = []
        for t in issue7_targets():
            if t.peer not in families:
                continue
            status, value = t.evaluate(figures)
            targets.append({"peer": t.peer, "metric": t.key, "target": t.describe(),
                            "status": status, "value": value})
        targets17 = []
        for t in issue17_targets():
            members = BEST_OF[t.peer][1] if t.peer in BEST_OF else (t.peer,)
            if not any(m in families for m in members):
                continue
            status, value = t.evaluate(figures)
            targets17.append({"peer": t.peer, "metric": t.key, "target": t.describe(),
                              "reference": t.reference, "status": status, "value": value})
        ratios: dict[str, dict] = {}
        for (peer, key) in figures.values:
            if peer in BEST_OF:
                continue
            ratios.setdefault(peer, {})[key] = {
                kind: figures.ratio(peer, key, kind) for kind in ("qsd", "direct")}
        return {
            "schema": RECORD_SCHEMA,
            "mode": self.settings.mode,
            "settings": asdict(self.settings),
            "only": self.only,
            "note": self.note,
            "exportd_env": self.exportd_env,
            "started": started,
            "duration_s": round(duration, 1),
            "machine": machine,
            "images": image_facts,
            "workloads": [asdict(w) | {"unit": w.unit} for w in WORKLOADS],
            "control_metrics": {k: {"title": t, "unit": u} for k, (t, u) in CONTROL_METRICS.items()},
            "peers": {p.name: {"label": p.label, "family": p.family, "status": p.status,
                               "reason": p.reason, "info": p.info, "role": "io"}
                      for p in self.peers}
                     | {p.name: {"label": p.label, "family": p.family, "status": p.status,
                                 "reason": p.reason, "info": p.info, "role": "control"}
                        for p in self.ctl_peers},
            "fio": self.fio_record,
            "control": self.control_record,
            "jobs": self.jobs_record,
            "nbd": self.nbd_record,
            "figures": {f"{peer}/{key}": v for (peer, key), v in figures.values.items()},
            "best_of": {group: {"label": BEST_OF[group][0], "members": list(BEST_OF[group][1]),
                                "chosen": chosen} for group, chosen in best_of.items()},
            "ratios": ratios,
            "targets": targets,
            "targets_issue17": targets17,
        }
