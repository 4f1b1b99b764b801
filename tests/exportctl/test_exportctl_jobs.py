"""exportctl stream / commit / mirror / jobs / job, run as a program against a
real daemon: qemu-storage-daemon 7.2 (QEMU's QMP, the reference) and exportd
(skipped, per test, while its query-commands lacks what the test drives).

Images are made and checked with qemu-img / qemu-io; the daemons hold them
open, so the checks use -U (no lock).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import pty
import re
import select
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from exportctl.client import Client
from tests.support.daemon import short_dir, spawn_daemon
from tests.support.qsd import QSD, running_qsd

MiB = 1 << 20
# what every test here drives; a test needing more asks with d.require()
JOB_COMMANDS = {"block-stream", "block-commit", "blockdev-mirror", "query-block-jobs", "query-jobs",
                "job-complete", "job-pause", "job-resume", "job-cancel", "job-dismiss",
                "block-job-cancel"}


async def _commands(socket_path: str) -> set[str]:
    async with Client() as c:
        await c.connect(socket_path)
        return {x["name"] for x in await c.execute("query-commands")}


class Daemon:
    """socket, and a second one for a client that stays connected
    (qemu-storage-daemon serves one client per monitor socket)."""

    def __init__(self, kind: str, socket: str, socket2: str, stop: Callable[[], object]) -> None:
        self.kind, self.socket, self.socket2, self._stop = kind, socket, socket2, stop
        self.commands: set[str] = set()

    def stop(self) -> None:
        """Shut down cleanly: qcow2 metadata is on disk only after that."""
        self._stop()

    def require(self, *names: str) -> None:
        missing = sorted(set(names) - self.commands)
        if missing:
            pytest.skip(f"{self.kind} lacks {', '.join(missing)}")


@pytest.fixture(scope="session")
def exportd_commands(exportd_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """What this build of exportd answers to query-commands (one probe daemon)."""
    logdir = tmp_path_factory.mktemp("exportd-probe")
    workdir = short_dir(logdir)
    d = spawn_daemon(exportd_bin, workdir, logdir)
    try:
        # a thread of its own: this may be asked for from inside a test's loop
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, _commands(d.socket)).result(60)
    finally:
        d.terminate()
        if workdir != logdir:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(params=["qsd", "exportd"])
async def jobd(request, exportd_bin: Path, tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """Factory: start(*blockdev_options) -> Daemon, the parametrized daemon with
    those --blockdev nodes. The exportd variant is skipped while exportd's
    query-commands lacks one of JOB_COMMANDS: it runs as soon as they land."""
    kind = request.param
    if kind == "qsd" and QSD is None:
        pytest.skip("qemu-storage-daemon is not installed")
    if kind == "exportd":
        missing = sorted(JOB_COMMANDS - request.getfixturevalue("exportd_commands"))
        if missing:
            pytest.skip(f"exportd lacks {', '.join(missing)}")
    workdir = short_dir(tmp_path)
    stack = contextlib.AsyncExitStack()

    async def start(*blockdevs: str) -> Daemon:
        args = [a for b in blockdevs for a in ("--blockdev", b)]
        if kind == "qsd":
            sock, sock2 = str(workdir / "qsd.sock"), str(workdir / "qsd2.sock")
            args += ["--chardev", f"socket,id=m2,path={sock2},server=on,wait=off", "--monitor", "chardev=m2"]
            proc = await stack.enter_async_context(running_qsd(sock, *args))
            daemon = Daemon(kind, sock, sock2, lambda: (proc.terminate(), proc.wait(15)))
        else:
            d = spawn_daemon(exportd_bin, workdir, tmp_path, *args)
            stack.callback(d.terminate)
            daemon = Daemon(kind, d.socket, d.socket, d.terminate)
        daemon.commands = await _commands(daemon.socket)
        daemon.require(*JOB_COMMANDS)
        return daemon

    async with stack:
        yield start
    if workdir != tmp_path:
        shutil.rmtree(workdir, ignore_errors=True)


# --- images -----------------------------------------------------------------------------------
def img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True).stdout


def io(path: Path, *cmds: str) -> None:
    for cmd in cmds:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(path)], capture_output=True, check=True)


def same(a: Path, b: Path) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode == 0


def backing_of(path: Path) -> str | None:
    return json.loads(img("info", "-U", "--output=json", str(path))).get("backing-filename")


def chain(d: Path, size: int = 8 * MiB) -> tuple[list[str], Path]:
    """base <- mid <- top, each layer with its own data, as --blockdev options
    naming every node; and ref.raw, the guest-visible content of top."""
    base, mid, top = d / "base.qcow2", d / "mid.qcow2", d / "top.qcow2"
    img("create", "-q", "-f", "qcow2", str(base), str(size))
    io(base, "write -P 1 0 4M")
    img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid))
    io(mid, "write -P 2 1M 2M")
    img("create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    io(top, "write -P 3 2M 1M", "write -P 4 6M 512K")
    img("convert", "-O", "raw", str(top), str(d / "ref.raw"))
    q = "driver=qcow2,file.driver=file"
    return [f"{q},node-name=base,file.filename={base}",
            f"{q},node-name=mid,file.filename={mid},backing=base",
            f"{q},node-name=top,file.filename={top},backing=mid"], d / "ref.raw"


def wait_no_jobs(exportctl, d: Daemon, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = exportctl(d.socket, "--json", "jobs")
        if json.loads(r.stdout) == {"jobs": [], "block-jobs": []}:
            return
        time.sleep(0.1)
    raise AssertionError(f"jobs still there: {r.stdout}")


# --- mirror -------------------------------------------------------------------------------------
async def test_mirror_wait_complete_then_compare(jobd, exportctl, tmp_path: Path) -> None:
    nodes, ref = chain(tmp_path)
    tgt = tmp_path / "tgt.qcow2"
    img("create", "-q", "-f", "qcow2", str(tgt), str(8 * MiB))
    d = await jobd(*nodes, f"driver=qcow2,node-name=tgt,file.driver=file,file.filename={tgt}")
    r = exportctl(d.socket, "mirror", "top", "tgt", "--complete")  # --complete implies --wait
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == "mirror job top completed\n"  # no progress bar: stdout is a pipe
    wait_no_jobs(exportctl, d)  # auto-dismissed
    d.stop()
    assert same(tgt, ref) and backing_of(tgt) is None  # sync full: the whole chain, flat


async def test_mirror_to_a_new_file_with_json(jobd, exportctl, tmp_path: Path) -> None:
    nodes, ref = chain(tmp_path)
    d = await jobd(*nodes)
    d.require("drive-mirror")
    new = tmp_path / "new.qcow2"
    r = exportctl(d.socket, "--json", "mirror", "top", "--target-file", str(new), "--job-id", "m1",
                  "--granularity", "64K", "--buf-size", "1M", "--complete")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # offset/len count what mirror copied: the allocated part
    assert (out["job-id"], out["status"]) == ("m1", "completed") and out["offset"] == out["len"] > 0
    d.stop()
    assert same(new, ref)


async def test_mirror_ready_without_complete_then_job_complete(jobd, exportctl, tmp_path: Path) -> None:
    nodes, ref = chain(tmp_path)
    tgt = tmp_path / "tgt.qcow2"
    img("create", "-q", "-f", "qcow2", str(tgt), str(8 * MiB))
    d = await jobd(*nodes, f"driver=qcow2,node-name=tgt,file.driver=file,file.filename={tgt}")
    r = exportctl(d.socket, "mirror", "top", "tgt", "--wait", "--copy-mode", "write-blocking")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "job top is ready (finish it with: exportctl job complete top)\n"
    rows = json.loads(exportctl(d.socket, "--json", "jobs").stdout)["block-jobs"]
    assert [(j["device"], j["type"], j["status"], j["ready"]) for j in rows] == [("top", "mirror", "ready", True)]
    r = exportctl(d.socket, "job", "complete", "top")
    assert (r.returncode, r.stdout) == (0, "completion of job top requested\n")
    wait_no_jobs(exportctl, d)
    d.stop()
    assert same(tgt, ref)


# --- commit -------------------------------------------------------------------------------------
async def test_commit_intermediate_layer(jobd, exportctl, tmp_path: Path) -> None:
    nodes, ref = chain(tmp_path)
    d = await jobd(*nodes)
    r = exportctl(d.socket, "commit", "top", "--top-node", "mid", "--base-node", "base", "--wait")
    assert (r.returncode, r.stdout, r.stderr) == (0, "commit job top completed\n", "")
    wait_no_jobs(exportctl, d)
    d.stop()
    assert backing_of(tmp_path / "top.qcow2") == str(tmp_path / "base.qcow2")  # mid dropped
    assert same(tmp_path / "top.qcow2", ref)


async def test_active_commit_complete(jobd, exportctl, tmp_path: Path) -> None:
    nodes, ref = chain(tmp_path)
    d = await jobd(*nodes)
    r = exportctl(d.socket, "commit", "top", "--job-id", "ac", "--complete", "--wait")
    assert (r.returncode, r.stdout, r.stderr) == (0, "commit job ac completed\n", "")
    wait_no_jobs(exportctl, d)
    d.stop()
    assert same(tmp_path / "base.qcow2", ref)  # everything is in base now


# --- stream -------------------------------------------------------------------------------------
async def test_stream_whole_chain(jobd, exportctl, tmp_path: Path) -> None:
    nodes, ref = chain(tmp_path)
    d = await jobd(*nodes)
    r = exportctl(d.socket, "stream", "top", "--wait")
    assert (r.returncode, r.stdout, r.stderr) == (0, "stream job top completed\n", "")
    d.stop()
    assert backing_of(tmp_path / "top.qcow2") is None
    assert same(tmp_path / "top.qcow2", ref)


async def test_stream_to_a_base_node(jobd, exportctl, tmp_path: Path) -> None:
    nodes, ref = chain(tmp_path)
    d = await jobd(*nodes)
    r = exportctl(d.socket, "--json", "stream", "top", "--base-node", "base", "--job-id", "s1", "--wait")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "completed"
    d.stop()
    assert backing_of(tmp_path / "top.qcow2") == str(tmp_path / "base.qcow2")
    assert same(tmp_path / "top.qcow2", ref)


# --- jobs, job ----------------------------------------------------------------------------------
async def test_jobs_table_and_control_of_a_slow_job(jobd, exportctl, tmp_path: Path) -> None:
    nodes, _ = chain(tmp_path)
    d = await jobd(*nodes)
    assert exportctl(d.socket, "jobs").stdout == "no jobs\n"
    r = exportctl(d.socket, "stream", "top", "--job-id", "slow", "--speed", "64K/s")
    assert (r.returncode, r.stdout) == (0, "started stream job slow\n"), r.stderr
    raw = json.loads(exportctl(d.socket, "--json", "jobs").stdout)
    assert [(j["id"], j["type"]) for j in raw["jobs"]] == [("slow", "stream")]
    assert [(j["device"], j["speed"]) for j in raw["block-jobs"]] == [("slow", 64 << 10)]
    lines = exportctl(d.socket, "jobs").stdout.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "STATUS", "PROGRESS", "%", "SPEED", "READY", "ERROR"]
    cells = re.split(r"\s{2,}", lines[1])
    assert cells[:3] == ["slow", "stream", "running"] and cells[3].endswith("/8 MiB")
    assert cells[4].endswith("%") and cells[5:] == ["64 KiB/s", "no", "-"]

    r = exportctl(d.socket, "job", "complete", "slow")  # not a READY job: QEMU's text
    assert (r.returncode, r.stderr) == (1, "error: Job 'slow' in state 'running' cannot accept command verb 'complete'\n")
    r = exportctl(d.socket, "job", "pause", "slow")
    assert (r.returncode, r.stdout) == (0, "pause of job slow requested\n")
    deadline = time.monotonic() + 10
    while "paused" not in exportctl(d.socket, "jobs").stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert exportctl(d.socket, "jobs").stdout.splitlines()[1].split()[2] == "paused"
    r = exportctl(d.socket, "job", "cancel", "slow")  # block-job-cancel refuses a paused job
    assert (r.returncode, r.stderr) == (1, "error: The block job for device 'slow' is currently paused\n")
    assert exportctl(d.socket, "job", "resume", "slow").returncode == 0
    r = exportctl(d.socket, "job", "cancel", "slow")
    assert (r.returncode, r.stdout) == (0, "cancel of job slow requested\n")
    wait_no_jobs(exportctl, d)


async def test_force_cancel_of_a_paused_job(jobd, exportctl, tmp_path: Path) -> None:
    nodes, _ = chain(tmp_path)
    d = await jobd(*nodes)
    assert exportctl(d.socket, "commit", "top", "--top-node", "mid", "--speed", "64K").returncode == 0
    assert exportctl(d.socket, "job", "pause", "top").returncode == 0
    r = exportctl(d.socket, "job", "cancel", "top", "--force")
    assert r.returncode == 0, r.stderr
    wait_no_jobs(exportctl, d)
    r = exportctl(d.socket, "job", "pause", "top", "--force")
    assert r.returncode == 2 and "--force goes with cancel only" in r.stderr


async def test_waiting_client_sees_a_cancel(jobd, exportctl, exportctl_bin, tmp_path: Path) -> None:
    nodes, _ = chain(tmp_path)
    d = await jobd(*nodes)
    waiter = subprocess.Popen([str(exportctl_bin), "-s", d.socket2, "stream", "top", "--speed", "64K", "--wait"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while "top" not in exportctl(d.socket, "jobs").stdout and time.monotonic() < deadline:
            assert waiter.poll() is None, waiter.communicate()
            time.sleep(0.05)
        r = exportctl(d.socket, "job", "cancel", "top")
        assert r.returncode == 0, (r.stderr, exportctl(d.socket, "--json", "jobs").stdout)
        out, err = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert (waiter.returncode, out, err) == (1, "", "error: job 'top' was cancelled\n")


# --- errors -------------------------------------------------------------------------------------
async def test_errors_carry_qemus_text(jobd, exportctl, tmp_path: Path) -> None:
    nodes, _ = chain(tmp_path)
    solo = tmp_path / "solo.qcow2"
    img("create", "-q", "-f", "qcow2", str(solo), str(MiB))
    d = await jobd(*nodes, f"driver=qcow2,node-name=solo,file.driver=file,file.filename={solo}")
    for argv, text in ((["stream", "nope"], "Cannot find device='nope' nor node-name='nope'"),
                       (["commit", "nope"], "Device 'nope' not found"),
                       (["commit", "top", "--top-node", "nope"], "Cannot find device='' nor node-name='nope'"),
                       (["stream", "top", "--base-node", "nope"], "Cannot find device='' nor node-name='nope'"),
                       (["mirror", "nope", "top"], "Cannot find device='nope' nor node-name='nope'"),
                       (["mirror", "top", "nope"], "Cannot find device='nope' nor node-name='nope'")):
        r = exportctl(d.socket, *argv, "--wait")
        assert (r.returncode, r.stdout, r.stderr) == (1, "", f"error: {text}\n"), argv
    assert exportctl(d.socket, "stream", "top", "--job-id", "j", "--speed", "64K").returncode == 0
    r = exportctl(d.socket, "stream", "solo", "--job-id", "j", "--wait")
    assert (r.returncode, r.stderr) == (1, "error: Job ID 'j' already in use\n")
    r = exportctl(d.socket, "job", "resume", "nope")
    assert (r.returncode, r.stderr) == (1, "error: Job not found\n")
    r = exportctl(d.socket, "mirror", "top")
    assert r.returncode == 2 and "either TARGET" in r.stderr
    r = exportctl(d.socket, "stream", "top", "--speed", "fast")
    assert r.returncode == 2 and "invalid size 'fast'" in r.stderr
    assert exportctl(d.socket, "job", "cancel", "j", "--force").returncode == 0
    wait_no_jobs(exportctl, d)


# --- the progress bar, on a terminal ------------------------------------------------------------
async def test_progress_bar_only_on_a_terminal(jobd, exportctl_bin, tmp_path: Path) -> None:
    nodes, ref = chain(tmp_path)
    d = await jobd(*nodes)
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(exportctl_bin), "-s", d.socket, "stream", "top", "--speed", "4M", "--wait"],
                            stdout=slave, stderr=subprocess.PIPE, env=dict(os.environ, COLUMNS="100"))
    os.close(slave)
    seen = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(30) == 0, proc.stderr.read()
        d.stop()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    text = seen.decode(errors="replace")
    assert "%" in text and "top (running)" in text  # the bar: job id, status, percentage
    assert text.rstrip().endswith("stream job top completed")
    assert same(tmp_path / "top.qcow2", ref)


async def test_job_finalize_and_dismiss(jobd, exportctl, tmp_path: Path) -> None:
    nodes, ref = chain(tmp_path)
    d = await jobd(*nodes)
    d.require("job-finalize")
    r = exportctl(d.socket, "qmp", '{"execute": "block-stream", "arguments": {"job-id": "s", "device": "top",'
                  ' "auto-finalize": false, "auto-dismiss": false}}')
    assert r.returncode == 0, r.stderr

    def status() -> str:
        jobs = json.loads(exportctl(d.socket, "--json", "jobs").stdout)["jobs"]
        return jobs[0]["status"] if jobs else "gone"

    for verb, before, after in (("finalize", "pending", "concluded"), ("dismiss", "concluded", "gone")):
        deadline = time.monotonic() + 30
        while status() != before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status() == before
        r = exportctl(d.socket, "job", verb, "s")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 30
        while status() != after and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status() == after
    d.stop()
    assert same(tmp_path / "top.qcow2", ref)


def test_help_lists_the_job_commands(exportctl) -> None:
    r = exportctl(None, "--help")
    assert r.returncode == 0
    listed = {line.split()[0] for line in r.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert {"stream", "commit", "mirror", "jobs", "job"} <= set(listed)
    r = exportctl(None, "mirror", "--help")
    for flag in ("--target-file", "--sync", "--granularity", "--buf-size", "--copy-mode", "--complete",
                 "--wait", "--speed", "--job-id"):
        assert flag in r.stdout
