"""The harness's own logic (issue 17): the load-average refusal, min/median/max,
the better of two configurations, the issue's targets, the peers' command
lines, start errors, and a real passthrough_hp over io_uring when it is built.

Most of this needs no fio: records are built by the harness's own code
(BenchRun._record) from figures given here, and run.py renders them in a
process of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "bench" / "run.py"
sys.path.insert(0, str(REPO / "bench"))

from harness.cpu import CpuWindow  # noqa: E402
from harness.figures import Figures, issue17_targets, spread  # noqa: E402
from harness.images import Images  # noqa: E402
from harness.loadcheck import banner, load_check, refusal  # noqa: E402
from harness.mounts import is_mounted  # noqa: E402
from harness.peers import (  # noqa: E402
    ExportdPeer,
    PassthroughHpPeer,
    PeerEnv,
    fio_peers,
    uring_enabled,
)
from harness.report import render_markdown  # noqa: E402
from harness.scratch import Scratch  # noqa: E402
from harness.session import BenchRun, Settings, start_peer  # noqa: E402
from harness.workloads import BY_KEY, WORKLOADS  # noqa: E402
from run import default_passthrough_hp, parse_args, settings_from  # noqa: E402

EXPORTD = REPO / ".venv" / "bin" / "exportd"
PASSTHROUGH_HP = default_passthrough_hp()


# -- load average ------------------------------------------------------------

def test_load_above_the_limit_is_refused_unless_allowed() -> None:
    assert refusal(load_check(0.51, allowed=False)) is not None
    assert "0.51" in refusal(load_check(0.51, allowed=False))
    assert refusal(load_check(0.51, allowed=True)) is None
    assert refusal(load_check(0.5, allowed=False)) is None   # "above 0.5" refuses, 0.5 does not
    assert refusal(load_check(0.12, allowed=False)) is None
    assert refusal(None) is None                             # records from before the check


def test_banner_only_on_a_loaded_run() -> None:
    assert banner(load_check(0.3, allowed=False)) is None
    assert "1.70" in banner(load_check(1.7, allowed=True))


def test_cpu_of_other_work_is_told_from_the_peers() -> None:
    """A spinning process counts as the peer's when it is the server, as other
    work when it is not."""
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\n"
                                "while time.time() < end: pass"])
    try:
        time.sleep(0.3)
        as_server = CpuWindow(spinner.pid)
        time.sleep(0.8)
        as_server = as_server.close()
        as_other = CpuWindow(None)
        time.sleep(0.8)
        as_other = as_other.close()
    finally:
        spinner.kill()
        spinner.wait()
    assert as_server["ours_cpus"] - as_other["ours_cpus"] > 0.3, (as_server, as_other)
    assert as_other["others_cpus"] - as_server["others_cpus"] > 0.3, (as_server, as_other)


# -- min / median / max ------------------------------------------------------

def test_spread() -> None:
    assert spread([]) is None
    assert spread([5.0]) == {"min": 5.0, "median": 5.0, "max": 5.0, "n": 1}
    assert spread([30.0, 10.0, 20.0, 40.0, 1.0]) == {"min": 1.0, "median": 20.0, "max": 40.0, "n": 5}
    assert spread([4.0, 1.0, 3.0, 2.0])["median"] == 2.5


def test_full_mode_repeats_4k_qd1_at_least_five_times() -> None:
    full, quick = Settings.for_mode(False), Settings.for_mode(True)
    small_qd1 = [w for w in WORKLOADS if w.small_qd1]
    assert {w.key for w in small_qd1} == {"rand-read", "rand-write", "two-exports"}
    for w in small_qd1:
        assert full.reps_for(w) >= 5
        assert quick.reps_for(w) == 1
    assert full.reps_for(BY_KEY["seq-read"]) == full.reps == 3
    assert full.reps_for(BY_KEY["rand-read-qd16"]) == 3


def test_command_line_overrides_reach_every_workload() -> None:
    s = settings_from(parse_args(["--reps", "2", "--runtime", "0.5"]))
    assert [s.reps_for(w) for w in WORKLOADS] == [2] * len(WORKLOADS)
    assert [s.runtime_for(w) for w in WORKLOADS] == [0.5] * len(WORKLOADS)
    assert s.section_runtime_s == 0.5
    full = settings_from(parse_args([]))
    assert full.mode == "full" and full.section_runtime_s == 4.0  # the sections keep their 4 s


# -- records: best of two configurations, ratios, targets ----------------------

def _record(medians: dict[str, dict[str, list[float]]], reps: int = 5) -> dict:
    """A record made by the harness's own code from per-peer run values."""
    peers = {p.name: p for p in fio_peers()}
    run = BenchRun(Settings.for_mode(False), list(medians), False, None, "", sys.executable, REPO)
    run.peers = [peers[name] for name in medians]
    for p in run.peers:
        p.status = "ok"
    for w in WORKLOADS:
        run.fio_record[w.key] = {
            name: {"runs": [{"value": v, "rep": i, "loadavg_1min_before": 0.1, "loadavg_1min": 0.2}
                            for i, v in enumerate(values.get(w.key, [100.0] * reps))],
                   "errors": []}
            for name, values in medians.items()}
    machine = {"cpu": "cpu", "cpus": 2, "mem_total_kib": 2**20, "kernel": "k", "os": "os",
               "fio": "fio-3", "qemu_storage_daemon": "qsd", "pyfuse3": "-", "exportd": "exportd 0",
               "git_commit": "0" * 40, "loadavg_start": [0.1, 0.1, 0.1], "loadavg_end": [0.2, 0.2, 0.2]}
    return run._record("2026-11-27T00:00:00+00:00", 60.0, machine, {})


def test_record_keeps_min_median_max_per_peer_and_workload() -> None:
    record = _record({"qsd-raw": {"rand-read": [10.0, 50.0, 30.0, 20.0, 40.0]}})
    entry = record["fio"]["rand-read"]["qsd-raw"]
    assert entry["spread"] == {"min": 10.0, "median": 30.0, "max": 50.0, "n": 5}
    assert record["figures"]["qsd-raw/rand-read"] == 30.0
    md = render_markdown(record)
    assert "30 IOPS [10–50]" in md


def test_qsd_is_compared_through_its_best_configuration() -> None:
    record = _record({
        "qsd-raw": {"rand-read": [100.0] * 5, "seq-read": [500.0] * 3, "seq-write": [300.0] * 3},
        "qsd-raw-iothread": {"rand-read": [80.0] * 5, "seq-read": [1000.0] * 3, "seq-write": [200.0] * 3},
        "qsd-raw-aio-uring": {"rand-read": [90.0] * 5, "seq-read": [900.0] * 3, "seq-write": [400.0] * 3},
        "exportd-raw": {"rand-read": [200.0] * 5, "seq-read": [2000.0] * 3, "seq-write": [800.0] * 3},
    })
    chosen = record["best_of"]["qsd-raw-best"]["chosen"]
    assert (chosen["rand-read"], chosen["seq-read"], chosen["seq-write"]) == (
        "qsd-raw", "qsd-raw-iothread", "qsd-raw-aio-uring")
    assert record["ratios"]["exportd-raw"]["rand-read"]["qsd"] == pytest.approx(2.0)
    assert record["ratios"]["exportd-raw"]["seq-read"]["qsd"] == pytest.approx(2.0)  # vs 1000, not 500
    assert record["ratios"]["exportd-raw"]["seq-write"]["qsd"] == pytest.approx(2.0)  # vs 400
    md = render_markdown(record)
    assert "| exportd raw /dev/fuse / qsd best | 2.00x | " in md
    assert "| qsd-raw-best: which won | qsd-raw-iothread | qsd-raw-aio-uring | qsd-raw | " in md


def test_best_of_picks_the_lower_figure_for_times() -> None:
    figures = Figures({"qsd": "null-co"})
    figures.set("a", "cycle", 3.0)
    figures.set("b", "cycle", 2.0)
    chosen = figures.add_best_of({"ab": ("a or b", ("a", "b"))})
    assert chosen == {"ab": {"cycle": "b"}} and figures.get("ab", "cycle") == 2.0


def test_issue17_ratios_and_targets() -> None:
    record = _record({
        "passthrough-hp": {"rand-read": [100.0] * 5},
        "passthrough-hp-uring": {"rand-read": [200.0] * 5},
        "exportd-raw": {"rand-read": [120.0] * 5, "rand-write": [100.0] * 5},
        "exportd-raw-uring": {"rand-read": [180.0] * 5, "rand-write": [110.0] * 5},
        "exportd-raw-uring-threads": {"rand-read": [150.0] * 5, "rand-write": [130.0] * 5},
    })
    md = render_markdown(record)
    assert "| exportd raw io_uring / exportd raw /dev/fuse | " in md
    assert "| exportd raw ring threads / loop-driven ring | " in md
    assert "| passthrough_hp io_uring / passthrough_hp /dev/fuse | 1.00x | 1.00x | 2.00x |" in md
    targets = {(t["peer"], t["metric"], t["reference"]): t for t in record["targets_issue17"]}
    # the ring's gain is its better design's, per figure
    gain = targets[("exportd-raw-ring-best", "rand-read", "exportd-raw")]
    assert gain["status"] == "met" and gain["value"] == pytest.approx(1.5)  # the loop-driven ring
    write = targets[("exportd-raw-ring-best", "rand-write", "exportd-raw")]
    assert write["status"] == "missed" and write["value"] == pytest.approx(1.3)  # ring threads
    # exportd's better configuration (180) against the C server: > 1x classic, >= 0.8x io_uring
    assert targets[("exportd-raw-best", "rand-read", "passthrough-hp")]["status"] == "met"
    vs_uring = targets[("exportd-raw-best", "rand-read", "passthrough-hp-uring")]
    assert vs_uring["status"] == "met" and vs_uring["value"] == pytest.approx(0.9)
    # no qemu-storage-daemon in this record: its targets cannot be judged
    assert targets[("exportd-raw-best", "rand-read", "qsd-raw-best")]["status"] == "n/a"


def test_issue17_targets_cover_the_issue() -> None:
    described = {(t.peer, t.key): t.describe() for t in issue17_targets()
                 if t.reference in ("qsd-raw-best", "qsd-qcow2-best")}
    assert described[("exportd-raw-best", "rand-write")] == "≥ 2x qsd best"
    assert described[("exportd-qcow2-best", "rand-read")] == "≥ 3x qsd best"
    assert described[("exportd-qcow2-best", "seq-read")] == "> 1x qsd best"


# -- run.py: no table for a loaded run unless allowed ------------------------------

def _render(record: dict, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    source = tmp_path / "record.json"
    source.write_text(json.dumps(record))
    return subprocess.run([sys.executable, str(RUN), "--render", str(source), "--out",
                           str(tmp_path / "out"), *extra], capture_output=True, text=True, timeout=120)


def test_loaded_record_gets_no_table_without_allow_load(tmp_path: Path) -> None:
    record = _record({"exportd-raw": {}})
    record["load_check"] = load_check(1.3, allowed=False)
    refused = _render(record, tmp_path)
    assert refused.returncode == 3, refused.stderr
    assert "no table" in refused.stderr and "1.30" in refused.stderr
    assert not (tmp_path / "out" / "latest.md").exists()
    allowed = _render(record, tmp_path, "--allow-load")
    assert allowed.returncode == 0, allowed.stderr
    md = (tmp_path / "out" / "latest.md").read_text()
    assert md.splitlines()[2].startswith("**Measured on a loaded machine** (1-minute load average 1.30")


def test_quiet_record_renders_without_a_mark(tmp_path: Path) -> None:
    record = _record({"exportd-raw": {}})
    record["load_check"] = load_check(0.2, allowed=False)
    done = _render(record, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "loaded machine" not in (tmp_path / "out" / "latest.md").read_text()


# -- peers' command lines ---------------------------------------------------------

def test_qsd_iothread_command_line(tmp_path: Path) -> None:
    peers = {p.name: p for p in fio_peers()}
    tuned = peers["qsd-qcow2-iothread"]
    cmd = tuned.command(["qsd"], tmp_path / "i.qcow2", tmp_path, 2**20)
    assert cmd[:3] == ["qsd", "--object", "iothread,id=io0"]       # before the nodes
    exports = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--export"]
    assert len(exports) == 2 and all(e.endswith(",writable=on,iothread=io0") for e in exports)
    assert tuned.private_image and not peers["qsd-raw-iothread"].private_image  # qcow2 locks
    plain = peers["qsd-qcow2"].command(["qsd"], tmp_path / "i.qcow2", tmp_path, 2**20)
    assert "--object" not in plain and not any(",iothread=" in a for a in plain)


def test_qsd_aio_io_uring_command_line(tmp_path: Path) -> None:
    peers = {p.name: p for p in fio_peers()}
    cmd = peers["qsd-qcow2-aio-uring"].command(["qsd"], tmp_path / "i.qcow2", tmp_path, 2**20)
    nodes = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--blockdev"]
    assert nodes == [f"driver=file,node-name=file0,filename={tmp_path / 'i.qcow2'},aio=io_uring",
                     "driver=qcow2,node-name=qcow0,file=file0"]
    assert "--object" not in cmd


def test_exportd_io_uring_command_line(tmp_path: Path, scratch_env) -> None:
    peers = {p.name: p for p in fio_peers()}
    for name in ("exportd-raw-uring", "exportd-raw-uring-threads", "exportd-qcow2-uring"):
        cmd = peers[name].command(["exportd"], tmp_path / "i", tmp_path, 2**20)
        exports = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--export"]
        assert exports and all(",io-uring=on" in e for e in exports), name
    env = scratch_env
    env.exportd_env = {"X": "1"}
    assert peers["exportd-raw-uring-threads"].environment(env) == {"X": "1", "EXPORTD_FUSE_URING_THREADS": "1"}
    assert peers["exportd-raw-uring"].environment(env) == {"X": "1", "EXPORTD_FUSE_URING_THREADS": "0"}
    cmd = peers["exportd-raw"].command(["exportd"], tmp_path / "i", tmp_path, 2**20)
    assert not any("io-uring" in a for a in cmd)


def test_passthrough_hp_command_lines(tmp_path: Path) -> None:
    peers = {p.name: p for p in fio_peers()}
    classic = peers["passthrough-hp"].command(Path("/b/passthrough_hp"), tmp_path / "s", tmp_path / "m")
    assert classic == ["/b/passthrough_hp", "--foreground", "--nopassthrough", "--nosplice",
                       str(tmp_path / "s"), str(tmp_path / "m")]
    ring = peers["passthrough-hp-uring"].command(Path("/b/passthrough_hp"), tmp_path / "s", tmp_path / "m")
    assert ring[4:6] == ["-o", "io_uring"] and ring[1:4] == classic[1:4]


# -- real processes ---------------------------------------------------------------

@pytest.fixture
def scratch_env():
    scratch = Scratch()
    try:
        env = PeerEnv(scratch=scratch, images=Images(scratch.dir("images"), 4 * 2**20),
                      exportd_cmd=[str(EXPORTD)], exportd_missing_reason="",
                      pyfuse3_python=sys.executable, pyfuse3_script=Path("/nonexistent"),
                      null_size=2**20, passthrough_hp=PASSTHROUGH_HP)
        yield env
    finally:
        scratch.cleanup()


@pytest.mark.skipif(not EXPORTD.exists(), reason="no .venv/bin/exportd (make setup)")
@pytest.mark.skipif(not os.access("/dev/fuse", os.R_OK | os.W_OK), reason="no /dev/fuse")
def test_a_daemon_that_refuses_its_arguments_is_a_start_error(scratch_env: PeerEnv) -> None:
    peer = ExportdPeer("exportd-bogus", "exportd, bogus", "null-co")
    peer.extra_export_options += ",no-such-option=on"
    start_peer(peer, scratch_env)
    try:
        assert peer.status == "start-error"
        assert peer.reason.startswith("exited with status ") and "no-such-option" in peer.reason
        assert not any(is_mounted(m) for m in peer.mountpoints)
    finally:
        peer.stop()


def test_a_missing_program_is_unavailable_not_a_start_error(scratch_env: PeerEnv) -> None:
    scratch_env.passthrough_hp = scratch_env.scratch.path / "no-passthrough_hp"
    peer = PassthroughHpPeer("passthrough-hp", "libfuse passthrough_hp", "raw")
    start_peer(peer, scratch_env)
    assert peer.status == "unavailable" and "build_passthrough_hp.sh" in peer.reason


@pytest.mark.skipif(not PASSTHROUGH_HP.exists(), reason="passthrough_hp not built "
                    "(bench/peers/build_passthrough_hp.sh)")
@pytest.mark.skipif(not uring_enabled()[0], reason="FUSE over io_uring off: " + uring_enabled()[1])
@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="no qemu-img")
def test_passthrough_hp_serves_through_its_rings(scratch_env: PeerEnv) -> None:
    peer = PassthroughHpPeer("passthrough-hp-uring", "libfuse passthrough_hp, io_uring", "raw",
                             io_uring=True)
    start_peer(peer, scratch_env)
    try:
        assert peer.status == "ok", peer.reason
        assert any(name.startswith("fuse-ring-") for name in peer.info["threads"])
        served = peer.fio_paths(False)[0]
        base = scratch_env.images.raw()
        fd = os.open(served, os.O_RDWR)
        try:
            assert os.pread(fd, 65536, 4096) == base.read_bytes()[4096:4096 + 65536]
            os.pwrite(fd, b"x" * 4096, 0)
        finally:
            os.close(fd)
        # Written through the mount, into the peer's private copy (not the base image).
        assert Path(peer.info["image"]).read_bytes()[:4096] == b"x" * 4096
        assert base.read_bytes()[:4096] != b"x" * 4096
    finally:
        peer.stop()
    assert not is_mounted(peer.mountpoints[0])
    assert peer.info["exit_status_expected"], peer.info["exit_status"]
