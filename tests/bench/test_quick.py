"""The benchmark harness (bench/run.py) keeps working: one QUICK run on null-co.

It runs the real harness in its own process (real qemu-storage-daemon, real
exportd, real fio, real FUSE mounts), writing into tmp_path, never into
bench/results/. It checks that the outputs exist and parse, that fio really
moved data, that exportd is either measured or reported unavailable with a
reason, and that nothing is left mounted or on tmpfs afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "bench" / "run.py"
WORKLOAD_KEYS = {"seq-read", "seq-write", "rand-read", "rand-write", "rand-read-qd16", "two-exports"}

pytestmark = [
    pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed"),
    pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                       reason="qemu-storage-daemon not installed"),
    pytest.mark.skipif(not os.access("/dev/fuse", os.R_OK | os.W_OK), reason="no /dev/fuse"),
    pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm"),
]


def _mounts_under(directory: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == directory or p.startswith(directory + "/")]


def _kill_processes_working_in(directory: str) -> None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if directory in cmdline:
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)


@contextlib.contextmanager
def harness_run(args: list[str], out: Path, timeout: float = 170):
    """Run bench/run.py with `args` into `out`; yields the CompletedProcess.
    Whatever happens, nothing of the run stays mounted or on tmpfs."""
    # --allow-load: the suite itself loads the machine; these runs check that
    # the harness works, not its figures (the table is then marked).
    proc = subprocess.Popen(
        [sys.executable, str(RUN), *args, "--allow-load", "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    scratch = f"/dev/shm/exportd-bench-{proc.pid}"
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        yield subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    finally:
        # The harness cleans up after itself; this is the net for when it could not.
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if os.path.exists(scratch):
            _kill_processes_working_in(scratch)
            for mount in sorted(_mounts_under(scratch), key=len, reverse=True):
                subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
            shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench-out")
    with harness_run(["--quick", "--only", "null-co", "--runtime", "0.3"], out) as proc:
        yield proc, out


def test_harness_exits_cleanly(quick_run) -> None:
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_scratch_directory_and_mounts_are_gone(quick_run) -> None:
    proc, _ = quick_run
    match = re.search(r"scratch directory (/dev/shm/exportd-bench-\d+)", proc.stderr)
    assert match, proc.stderr[-2000:]
    scratch = match.group(1)
    assert not os.path.exists(scratch)
    assert _mounts_under(scratch) == []


def test_json_record_has_real_fio_figures(quick_run) -> None:
    _, out = quick_run
    record = json.loads((out / "latest.json").read_text())
    assert record["mode"] == "quick"
    assert record["only"] == ["null-co"]
    assert record["machine"]["fio"].startswith("fio-")
    assert record["machine"]["kernel"]
    assert set(record["peers"]) == {"qsd-null-co", "exportd-null-co", "qsd", "exportd"}
    assert set(record["fio"]) == WORKLOAD_KEYS

    assert record["peers"]["qsd-null-co"]["status"] == "ok"
    for key in WORKLOAD_KEYS:
        runs = record["fio"][key]["qsd-null-co"]["runs"]
        assert len(runs) == 1, (key, record["fio"][key]["qsd-null-co"]["errors"])
        assert runs[0]["iops"] > 0 and runs[0]["ios"] > 0 and runs[0]["bw_bytes"] > 0
        assert record["figures"][f"qsd-null-co/{key}"] == runs[0]["value"]


def test_exportd_is_measured(quick_run) -> None:
    _, out = quick_run
    record = json.loads((out / "latest.json").read_text())
    peer = record["peers"]["exportd-null-co"]
    assert peer["status"] == "ok", peer
    for key in WORKLOAD_KEYS:
        entry = record["fio"][key]["exportd-null-co"]
        assert entry["runs"] and not entry["errors"], (key, entry["errors"])
        for run in entry["runs"]:
            assert run["iops"] > 0
    targets = {(t["peer"], t["metric"]): t for t in record["targets"]}
    assert targets[("exportd-null-co", "seq-read")]["target"] == "> 1x qsd"
    assert targets[("exportd", "memory")]["target"] == "< 128 KiB"


def test_control_plane_measured_for_qemu_storage_daemon(quick_run) -> None:
    _, out = quick_run
    record = json.loads((out / "latest.json").read_text())
    qsd = record["control"]["qsd"]
    assert qsd["errors"] == []
    assert len(qsd["cycle_ms"]) == 1 and qsd["cycle_ms"][0] > 0
    memory = qsd["memory"]
    assert memory["exports"] == 100
    assert set(memory["rss_kib"]) == {"0", "1", "100", "1-after-io", "100-after-io"}
    assert memory["rss_kib"]["100"] > 0
    # qemu-storage-daemon keeps a private ~1 MiB buffer per export: the
    # after-I/O figure must see it, or the measurement is blind to buffers.
    assert memory["per_export_after_io_kib"] > 512
    exportd = record["control"]["exportd"]
    assert record["peers"]["exportd"]["status"] == "ok"
    assert exportd["errors"] == [] and exportd["cycle_ms"][0] > 0


def test_load_is_recorded_and_marked(quick_run) -> None:
    _, out = quick_run
    record = json.loads((out / "latest.json").read_text())
    check = record["load_check"]
    assert check["allowed"] is True and check["limit"] == 0.5
    assert check["over_limit"] == (check["loadavg_1min_before"] > 0.5)
    md = (out / "latest.md").read_text()
    assert ("**Measured on a loaded machine**" in md) == check["over_limit"]
    for per_peer in record["fio"].values():
        for run in per_peer["exportd-null-co"]["runs"]:
            assert run["loadavg_1min_before"] >= 0 and run["loadavg_1min"] >= 0


def test_markdown_table(quick_run) -> None:
    _, out = quick_run
    md = (out / "latest.md").read_text()
    assert "| workload | peer | median | vs qsd | vs direct | target | status |" in md
    assert "qemu-storage-daemon, null-co" in md
    assert re.search(r"\| qemu-storage-daemon, null-co \| [\d,]+ MiB/s \| 1\.00x \|", md)
    assert "## Control plane" in md
    record = json.loads((out / "latest.json").read_text())
    if record["peers"]["exportd-null-co"]["status"] != "ok":
        assert "unavailable: " in md or "failed: " in md


def test_chart_only_with_matplotlib(quick_run) -> None:
    _, out = quick_run
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "latest.png").exists()
    else:
        assert (out / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

