"""exportd started the way systemd starts it (the environment and file
descriptors a service manager gives; no systemd needed): Type=notify
readiness (READY=1 only once the monitor answers and the --blockdev is
there, STOPPING=1 at shutdown), socket activation (LISTEN_FDS/LISTEN_PID:
the passed socket is the monitor), `--chardev socket,id=x,fd=N`, and
--socket-mode. The unit files in contrib/systemd name options that exist."""

from __future__ import annotations

import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for the service manager's fork+exec: the passed socket becomes
# fd 3, and LISTEN_PID names the process that will exec exportd.
ACTIVATE = ("import os, sys\n"
            "fd = int(sys.argv[1])\n"
            "if fd != 3:\n"
            "    os.dup2(fd, 3)\n"
            "    os.close(fd)\n"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='qmp')\n"
            "os.execv(sys.argv[2], sys.argv[2:])\n")


def listening_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(8)
    return s


def notify_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(20)
    return s


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()
    return proc.wait(20)


def test_notify_ready_and_stopping(exportd_bin, raw_qmp, tmp_path):
    notify = notify_socket(tmp_path / "notify")
    sock = tmp_path / "qmp.sock"
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    proc = subprocess.Popen([str(exportd_bin), "--socket", str(sock), "--blockdev",
                             f"driver=file,node-name=f,filename={img}"],
                            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}, stdin=subprocess.DEVNULL)
    try:
        ready = notify.recv(4096).decode()
        assert ready == f"READY=1\nMAINPID={proc.pid}"
        # ready means ready: the monitor answers and the node exists
        c = raw_qmp(str(sock))
        c.negotiate()
        nodes = c.cmd("query-named-block-nodes")["return"]
        assert [n["node-name"] for n in nodes] == ["f"]
        proc.send_signal(15)
        assert notify.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(20) == 0
    finally:
        stop(proc)
        notify.close()


def test_socket_activation(exportd_bin, raw_qmp, tmp_path):
    path = tmp_path / "activated.sock"
    listener = listening_socket(path)
    proc = subprocess.Popen([sys.executable, "-c", ACTIVATE, str(listener.fileno()), str(exportd_bin)],
                            pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listener.close()  # the daemon holds it now
    try:
        c = raw_qmp(str(path))
        c.negotiate()
        assert c.cmd("query-version")["return"]["qemu"]["major"] >= 7
        assert c.cmd("quit") == {"return": {}}
        assert proc.wait(20) == 0, proc.stderr.read() if proc.stderr else ""
        # the socket file belongs to the service manager: left in place
        assert path.exists()
    finally:
        stop(proc)


def test_chardev_fd(exportd_bin, raw_qmp, tmp_path):
    path = tmp_path / "passed.sock"
    listener = listening_socket(path)
    fd = listener.fileno()
    proc = subprocess.Popen([str(exportd_bin), "--chardev", f"socket,id=m,fd={fd}", "--monitor", "chardev=m"],
                            pass_fds=[fd], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listener.close()
    try:
        c = raw_qmp(str(path))
        c.negotiate()
        assert c.cmd("quit") == {"return": {}}
        assert proc.wait(20) == 0
    finally:
        stop(proc)
    # a descriptor that is not a listening socket is refused at startup
    with open(tmp_path / "plain", "w") as f:
        plain = f.fileno()
        r = subprocess.run([str(exportd_bin), "--chardev", f"socket,id=m,fd={plain}", "--monitor", "m"],
                           pass_fds=[plain], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.startswith(f"exportd: file descriptor {plain} is not a socket"), r.stderr


def test_socket_mode(exportd_bin, raw_qmp, tmp_path):
    sock = tmp_path / "g.sock"
    proc = subprocess.Popen([str(exportd_bin), "--socket", str(sock), "--socket-mode", "0660"],
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    finally:
        stop(proc)
    r = subprocess.run([str(exportd_bin), "--socket", str(sock), "--socket-mode", "999"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.strip() == "exportd: --socket-mode: '999' is not an octal mode"


@pytest.mark.parametrize("unit", ["exportd.service", "exportd@.service", "exportd.socket"])
def test_unit_files_use_real_options(exportd_bin, unit):
    text = (ROOT / "contrib" / "systemd" / unit).read_text()
    help_text = subprocess.run([str(exportd_bin), "--help"], capture_output=True, text=True).stdout
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            argv = shlex.split(line.removeprefix("ExecStart="))
            assert argv[0].endswith("/exportd")
            for opt in (a for a in argv[1:] if a.startswith("--")):
                assert re.search(rf"{re.escape(opt)}\b", help_text), opt
    if unit.endswith(".service"):
        assert "Type=notify" in text
