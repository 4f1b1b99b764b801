"""The exportd command line: monitors, pidfile, daemonize, signals, default
socket, --blockdev/--export at startup and startup errors."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest


def run_exportd(exportd_bin, *args, timeout=30, env=None):
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run([str(exportd_bin), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


def test_version_and_help(exportd_bin):
    r = run_exportd(exportd_bin, "-V")
    assert r.returncode == 0 and r.stdout.startswith("exportd ")
    r = run_exportd(exportd_bin, "--version")
    assert r.returncode == 0 and "exportd" in r.stdout
    r = run_exportd(exportd_bin, "-h")
    assert r.returncode == 0
    for opt in ("--chardev", "--monitor", "--socket", "--blockdev", "--export", "--pidfile", "--daemonize"):
        assert opt in r.stdout


def test_unknown_option(exportd_bin):
    r = run_exportd(exportd_bin, "--vnc", "unix:/tmp/x")
    assert r.returncode == 1
    assert r.stderr.startswith("exportd: unrecognized arguments: --vnc")


@pytest.mark.parametrize("path, reason", [
    ("/nonexistent-dir/s.sock", "No such file or directory"),
    ("/tmp/" + "x" * 120, "AF_UNIX path too long"),
])
def test_socket_bind_errors(exportd_bin, path, reason):
    r = run_exportd(exportd_bin, "--socket", path)
    assert r.returncode == 1
    assert r.stderr.strip() == f"exportd: Failed to bind socket to {path}: {reason}"


def test_python_dash_m(exportd_bin):
    import sys

    r = subprocess.run([sys.executable, "-m", "exportd", "-V"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("exportd ")


def test_socket_mode_and_removal(daemon):
    d = daemon()
    st = os.stat(d.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert d.terminate() == 0
    assert not os.path.exists(d.socket)


def test_chardev_monitor_pairs(daemon, raw_qmp, tmp_path):
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    d = daemon(
        "--chardev", f"socket,id=m0,path={a},server=on,wait=off", "--monitor", "chardev=m0",
        "--chardev", f"socket,id=m1,path={b},server=on,wait=off", "--monitor", "m1,pretty=on",
        with_socket=False, wait=False,
    )
    deadline = time.monotonic() + 30
    while not (os.path.exists(a) and os.path.exists(b)):
        assert d.alive, d.stderr
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ca, cb = raw_qmp(a), raw_qmp(b)
    ca.negotiate()
    cb.send(b'{"execute": "qmp_capabilities"}')
    line = cb.recv_line()
    # pretty=on: multi-line JSON, still ending in CRLF
    assert line.endswith(b"\r\n") and json.loads(line) == {"return": {}}
    cb.send(b'{"execute": "query-version"}')
    data = b""
    while True:
        data += cb.recv_line()
        try:
            reply = json.loads(data)
            break
        except ValueError:
            continue
    assert b"\n" in data.rstrip(b"\r\n")
    assert reply["return"]["package"].startswith("exportd")
    # a quit on one monitor: the other gets the SHUTDOWN event
    assert ca.cmd("quit") == {"return": {}}
    assert d.wait(15) == 0
    assert not os.path.exists(a) and not os.path.exists(b)


@pytest.mark.parametrize("args, message", [
    (["--chardev", "socket,id=m0,path=/tmp/x.sock", "--monitor", "chardev=other"],
     "exportd: --monitor: chardev 'other' not found"),
    (["--chardev", "pty,id=m0"], "exportd: --chardev: backend 'pty' is not supported (only 'socket')"),
    (["--chardev", "socket,path=/tmp/x.sock"], "exportd: --chardev: Parameter 'id' is missing"),
    (["--chardev", "socket,id=m0,host=localhost,port=4444"],
     "exportd: chardev 'm0': only UNIX sockets (path= or fd=) are supported"),
    (["--chardev", "socket,id=m0,path=/tmp/x.sock,server=off"],
     "exportd: chardev 'm0': exportd serves QMP, it does not connect (use server=on)"),
])
def test_monitor_option_errors(exportd_bin, args, message):
    r = run_exportd(exportd_bin, *args)
    assert r.returncode == 1
    assert r.stderr.strip() == message


def test_pidfile(daemon, tmp_path):
    pidfile = tmp_path / "exportd.pid"
    d = daemon("--pidfile", str(pidfile))
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert int(pidfile.read_text()) == d.pid
    # a second daemon with the same pidfile is refused, and leaves nothing behind
    d2 = daemon("--pidfile", str(pidfile), wait=False)
    assert d2.wait(30) == 1
    assert "exportd: cannot create PID file: Cannot lock pid file: Resource temporarily unavailable" in d2.stderr
    assert not os.path.exists(d2.socket)
    assert int(pidfile.read_text()) == d.pid
    assert d.terminate() == 0
    assert not pidfile.exists()
    # one that cannot be created: QEMU's words
    d3 = daemon("--pidfile", str(tmp_path / "nonexistent" / "x.pid"), wait=False)
    assert d3.wait(30) == 1
    assert (f"exportd: cannot create PID file: Could not create '{tmp_path}/nonexistent/x.pid': "
            "No such file or directory") in d3.stderr


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_daemonize(exportd_bin, raw_qmp, tmp_path):
    sock, pidfile = str(tmp_path / "d.sock"), tmp_path / "d.pid"
    r = run_exportd(exportd_bin, "--daemonize", "--socket", sock, "--pidfile", str(pidfile))
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    try:
        assert r.returncode == 0, r.stderr
        # the parent returned only once the daemon was ready
        assert pid is not None and _pid_alive(pid)
        c = raw_qmp(sock)
        c.negotiate()
        assert c.cmd("quit") == {"return": {}}
        deadline = time.monotonic() + 15
        while _pid_alive(pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not pidfile.exists()
        assert not os.path.exists(sock)
    finally:
        if pid is not None and _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_daemonize_failure_reports_status(exportd_bin, tmp_path):
    sock = str(tmp_path / "d.sock")
    r = run_exportd(exportd_bin, "--daemonize", "--socket", sock, "--blockdev", "driver=bogus,node-name=x")
    assert r.returncode == 1
    assert r.stderr.strip() == "exportd: --blockdev driver=bogus,node-name=x: Parameter 'driver' does not accept value 'bogus'"
    assert not os.path.exists(sock)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_shut_down_cleanly(daemon, raw_qmp, sig):
    d = daemon()
    c = raw_qmp(d)
    c.negotiate()
    os.kill(d.pid, sig)
    ev = c.recv_msg()
    assert ev["event"] == "SHUTDOWN"
    assert ev["data"] == {"guest": False, "reason": "host-signal"}
    assert d.wait(15) == 0
    assert not os.path.exists(d.socket)


def test_default_socket(daemon, raw_qmp, tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    d = daemon(with_socket=False, wait=False, env={"XDG_RUNTIME_DIR": str(runtime)})
    sock = runtime / "exportd.sock"
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert d.alive, d.stderr
        assert time.monotonic() < deadline
        time.sleep(0.02)
    c = raw_qmp(str(sock))
    c.negotiate()
    assert "return" in c.cmd("query-version")
    assert d.terminate() == 0
    assert not sock.exists()


def test_default_socket_needs_a_place(exportd_bin):
    if os.geteuid() == 0:
        pytest.skip("as root the default is /run/exportd.sock, which a real daemon may hold")
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    r = subprocess.run([str(exportd_bin)], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 1 and "XDG_RUNTIME_DIR" in r.stderr


def test_stale_socket_replaced_live_socket_kept(daemon, raw_qmp, tmp_path):
    import socket as socketmod

    path = str(tmp_path / "s.sock")
    stale = socketmod.socket(socketmod.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on, as after a crash
    first = daemon("--socket", path, with_socket=False, wait=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            c = raw_qmp(path)
            break
        except OSError:
            assert first.alive, first.stderr
            assert time.monotonic() < deadline
            time.sleep(0.02)
    second = daemon("--socket", path, with_socket=False, wait=False)
    assert second.wait(30) == 1
    assert "another daemon is listening there" in second.stderr
    c.negotiate()
    assert "return" in c.cmd("query-version")  # the first daemon kept its socket
    assert first.terminate() == 0


def test_blockdev_on_command_line(daemon, raw_qmp):
    d = daemon(
        "--blockdev", "driver=null-co,node-name=kv0,size=1M,read-zeroes=on",
        "--blockdev", '{"driver": "null-co", "node-name": "js0", "size": 4096}',
    )
    c = raw_qmp(d)
    c.negotiate()
    reply = c.cmd("query-named-block-nodes")
    if "error" in reply:
        pytest.skip(f"query-named-block-nodes not available yet: {reply}")
    nodes = {n["node-name"]: n for n in reply["return"]}
    assert nodes["kv0"]["image"]["virtual-size"] == 1 << 20
    assert nodes["js0"]["image"]["virtual-size"] == 4096


@pytest.mark.parametrize("args, message", [
    (["--blockdev", "driver=bogus,node-name=x"], "exportd: Parameter 'driver' does not accept value 'bogus'"),
    (["--blockdev", "driver=null-co,size=big"], "exportd: Invalid parameter type for 'size', expected: integer"),
    (["--blockdev", "driver=raw,file.driver=file"], "exportd: Parameter 'file.filename' is missing"),
    (["--blockdev", "driver=null-co,oops"], "exportd: Expected '=' after parameter 'oops'"),
    (["--blockdev", '{"driver": "null-co"'], "exportd: Invalid JSON: expected exactly one object"),
    (["--blockdev", '{"driver": "null-co", "x": 1}'], "exportd: Parameter 'x' is unexpected"),
    (["--export", "type=fuse,id=e,node-name=n"], "exportd: Parameter 'mountpoint' is missing"),
    (["--export", "type=vhost-user-blk,id=e,node-name=n"], "exportd: Parameter 'type' does not accept value 'vhost-user-blk'"),
])
def test_startup_errors(daemon, args, message):
    d = daemon(*args, wait=False)
    assert d.wait(30) == 1
    # QEMU names the failing option first (the last one given here)
    message = message.replace("exportd: ", f"exportd: {args[-2]} {args[-1]}: ", 1)
    assert d.stderr.strip().splitlines()[-1] == message
    assert not os.path.exists(d.socket)


def test_failed_startup_leaves_nothing(daemon, tmp_path):
    """A later option failing undoes what earlier ones created (no socket, no pidfile)."""
    pidfile = tmp_path / "p.pid"
    d = daemon("--pidfile", str(pidfile), "--blockdev", "driver=null-co,node-name=a",
               "--blockdev", "driver=null-co,node-name=a", wait=False)
    assert d.wait(30) == 1
    assert "exportd: " in d.stderr
    assert not os.path.exists(d.socket)
    assert not pidfile.exists()


def test_socket_file_appears_only_when_listening(daemon):
    """Clients that wait for the socket file and connect at once never get
    ECONNREFUSED (the file is renamed into place after listen())."""
    import socket as socketmod

    for _ in range(8):
        d = daemon(wait=False)
        deadline = time.monotonic() + 30
        while not os.path.exists(d.socket):
            assert d.alive, d.stderr
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        s = socketmod.socket(socketmod.AF_UNIX)
        s.connect(d.socket)  # must not be refused
        s.close()
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
        assert d.terminate() == 0
    leftovers = [p for p in os.listdir(os.path.dirname(d.socket)) if p.startswith(".exportd-")]
    assert leftovers == []


def _daemonized(exportd_bin, tmp_path, *args, env=None):
    sock, pidfile = str(tmp_path / "d.sock"), tmp_path / "d.pid"
    r = run_exportd(exportd_bin, "--daemonize", "--socket", sock, "--pidfile", str(pidfile), *args, env=env)
    assert r.returncode == 0, r.stderr
    return sock, int(pidfile.read_text())


def _quit(raw_qmp, sock, pid):
    try:
        c = raw_qmp(sock)
        c.negotiate()
        c.cmd("query-version")
        assert c.cmd("quit") == {"return": {}}
        deadline = time.monotonic() + 15
        while _pid_alive(pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_log_file_survives_daemonize(exportd_bin, raw_qmp, tmp_path, monkeypatch):
    # a relative path is the caller's directory's, though the daemon goes to /
    monkeypatch.chdir(tmp_path)
    sock, pid = _daemonized(exportd_bin, tmp_path, "--log-file", "d.log", "--log-level", "debug")
    _quit(raw_qmp, sock, pid)
    lines = (tmp_path / "d.log").read_text().splitlines()
    assert any(line.endswith("DEBUG: exportd.daemon: qmp: query-version {}") for line in lines), lines
    r = run_exportd(exportd_bin, "--socket", str(tmp_path / "x.sock"), "--log-file", str(tmp_path / "no" / "x.log"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"exportd: cannot open log file: {tmp_path}/no/x.log: No such file or directory"


def test_daemonized_logs_go_to_syslog(exportd_bin, raw_qmp, tmp_path):
    import socket

    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "log.sock")
    syslog.bind(path)
    syslog.settimeout(10)
    try:
        sock, pid = _daemonized(exportd_bin, tmp_path, "--log-level", "debug", env={"EXPORTD_SYSLOG_SOCKET": path})
        _quit(raw_qmp, sock, pid)
        seen = []
        while not any("qmp: query-version" in m for m in seen):
            seen.append(syslog.recv(65536).decode())
        # <31>: facility daemon (3 << 3) + priority debug (7)
        assert any(m.startswith("<31>exportd[") and "DEBUG: exportd.daemon: qmp: query-version {}" in m
                   for m in seen), seen
    finally:
        syslog.close()


def test_implied_keys_as_qemu(daemon, raw_qmp, tmp_path):
    # `--blockdev file,...` and `--export fuse,...` as qemu-storage-daemon takes them
    img, mnt = tmp_path / "d.img", tmp_path / "d.raw"
    img.write_bytes(bytes(1 << 20))
    mnt.touch()
    d = daemon("--blockdev", f"file,node-name=f,filename={img}",
               "--export", f"fuse,id=e,node-name=f,mountpoint={mnt}")
    c = raw_qmp(d)
    c.negotiate()
    assert [e["type"] for e in c.cmd("query-block-exports")["return"]] == ["fuse"]
    assert c.cmd("block-export-del", {"id": "e"}) == {"return": {}}
