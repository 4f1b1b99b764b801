"""The toy mounted by an unprivileged user (`nobody`) through fusermount3.

`nobody` runs the system Python on a readable copy of the code it imports
(tests.support.other_user): the checkout may be where only root can enter."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile

import pytest

from exportd.fuse import mount as fuse_mount
from tests.support.fuse import PRELUDE
from tests.support.mounts import lazy_unmount_exportd_mounts
from tests.support.other_user import SYSTEM_PYTHON, other_user

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to nobody"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="fusermount3 missing"),
    pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"{SYSTEM_PYTHON} missing"),
]


@pytest.fixture
def nobody_dir():
    with other_user("nobody") as user:
        d = tempfile.mkdtemp(prefix="exportd-fuse-nonroot-", dir="/tmp")
        os.chmod(d, 0o755)
        os.chown(d, user.pw_uid, user.pw_gid)
        try:
            yield d, user
        finally:
            lazy_unmount_exportd_mounts(d)
            shutil.rmtree(d, ignore_errors=True)


def test_nobody_mounts_serves_and_unmounts_via_fusermount3(nobody_dir):
    d, user = nobody_dir
    target = os.path.join(d, "export.img")
    counters = os.path.join(d, "counters.json")
    open(target, "wb").close()
    os.chown(target, user.pw_uid, user.pw_gid)
    server = subprocess.Popen(
        **user.popen_args(
            [
                SYSTEM_PYTHON,
                "-m",
                "tests.support.toyfs",
                target,
                "--fill",
                "--size",
                "100000",
                "--fsname",
                "exportd:nobody",
                "--counters",
                counters,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
    try:
        line = server.stdout.readline()
        assert line.strip() == "ready", server.stderr.read()
        (m,) = fuse_mount.exportd_mounts(target)
        assert m.source == "exportd:nobody" and f"user_id={user.pw_uid}" in m.options
        io = subprocess.run(
            **user.popen_args(
                [
                    SYSTEM_PYTHON,
                    "-c",
                    PRELUDE
                    + """
p = sys.argv[1]
data = open(p, "rb").read()
fd = os.open(p, os.O_RDWR); os.pwrite(fd, b"nobody was here", 1000); os.fsync(fd); os.close(fd)
out([len(data), data[:300] == bytes(range(256)) + bytes(range(44)), open(p, "rb").read()[1000:1015].decode()])
""",
                    target,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
        )
        assert io.returncode == 0, io.stderr
        assert json.loads(io.stdout.strip().splitlines()[-1]) == [100000, True, "nobody was here"]
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
        assert "ended closed" in out, err
        assert json.load(open(counters))["counters"]["WRITE"] >= 1
        assert not fuse_mount.exportd_mounts(target)  # fusermount3 -u removed it
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_fusermount3_refusal_reaches_the_caller(nobody_dir):
    d, user = nobody_dir
    target = os.path.join(d, "root-owned.img")
    open(target, "wb").close()
    os.chmod(target, 0o644)  # owned by root: nobody may not mount over it
    proc = subprocess.run(
        **user.popen_args(
            [
                SYSTEM_PYTHON,
                "-c",
                """
import asyncio, sys
from exportd.fuse.session import FuseSession
from tests.support.toyfs import MemoryFS
from exportd.fuse.mount import MountError
async def main():
    try:
        await FuseSession.start(MemoryFS(1), sys.argv[1], fsname="exportd:refused")
    except MountError as e:
        print("MountError:", e)
asyncio.run(main())
""",
                target,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    )
    assert proc.returncode == 0, proc.stderr
    assert "MountError:" in proc.stdout
    assert "fusermount3: failed to open" in proc.stdout and "Permission denied" in proc.stdout, (
        proc.stdout
    )
    assert not fuse_mount.exportd_mounts(target)


def test_passthrough_refused_without_privileges_falls_back(nobody_dir):
    d, user = nobody_dir
    target = os.path.join(d, "export.img")
    backing = os.path.join(d, "backing.raw")
    counters = os.path.join(d, "counters.json")
    open(target, "wb").close()
    with open(backing, "wb") as f:
        f.write(bytes(range(256)) * 64)
    for p in (target, backing):
        os.chown(p, user.pw_uid, user.pw_gid)
    server = subprocess.Popen(
        **user.popen_args(
            [
                SYSTEM_PYTHON,
                "-m",
                "tests.support.toyfs",
                target,
                "--file",
                backing,
                "--passthrough",
                "--counters",
                counters,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
    try:
        assert server.stdout.readline().strip() == "ready"
        io = subprocess.run(**user.popen_args(["/bin/cat", target], capture_output=True, timeout=60))
        assert io.returncode == 0 and io.stdout == bytes(range(256)) * 64
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
        # FUSE_DEV_IOC_BACKING_OPEN needs CAP_SYS_ADMIN: the toy serves reads itself.
        assert "passthrough unavailable" in err and "Operation not permitted" in err, err
        stats = json.load(open(counters))
        assert stats["passthrough"] is False and stats["counters"]["READ"] >= 1
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
