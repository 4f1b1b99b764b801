"""mountinfo parsing, idempotent unmount, and live-but-slow mounts not taken for stale."""

from __future__ import annotations

import asyncio
import os
import signal

from exportd.fuse import mount as fuse_mount
from tests.support.fuse import start_toy


def test_mountinfo_parsing_with_escapes(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "61 22 0:53 / /srv/my\\040disk.img rw,nosuid,nodev,noatime shared:30 - fuse.exportd"
        " exportd:vm\\0401 rw,user_id=0,group_id=0,default_permissions\n"
        "broken line without separator\n"
    )
    mounts = fuse_mount.read_mountinfo(str(info))
    assert [m.mount_id for m in mounts] == [22, 61]
    m = mounts[1]
    assert m.mountpoint == "/srv/my disk.img" and m.source == "exportd:vm 1"
    assert m.fstype == "fuse.exportd" and m.connection == 53 and "default_permissions" in m.options


def test_unmount_of_a_plain_file_is_a_no_op(tmp_path):
    f = tmp_path / "plain"
    f.write_bytes(b"x")
    assert fuse_mount.unmount(str(f)) is False
    assert fuse_mount.unmount_if_ours(str(f), 12345) is False


def test_a_stopped_daemon_is_hung_not_stale(target):
    proc = start_toy(target, "--size", "4096", "--fsname", "exportd:stopped")
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        # stat waits for a GETATTR nobody answers: reported as hung, and left alone
        assert fuse_mount.probe(target, timeout=0.5) == "hung"
        assert fuse_mount.find_stale_mounts([target], timeout=0.5) == []
        assert len(fuse_mount.exportd_mounts(target)) == 1
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert "ended closed" in out
    assert not fuse_mount.exportd_mounts(target)


async def test_statx_finds_our_connection_without_the_server(target):
    from tests.support.fuse import serving
    from tests.support.toyfs import MemoryFS

    assert fuse_mount.is_mount_root(target) is False
    assert fuse_mount.top_connection(target) is None  # a plain file on a real device
    async with serving(MemoryFS(4096), target) as session:
        # from a thread, as the daemon does (a syscall on the mount from the
        # loop thread could wait on the loop)
        assert await asyncio.to_thread(fuse_mount.is_mount_root, target) is True
        connection = await asyncio.to_thread(fuse_mount.top_connection, target)
        assert connection == session.connection
        [entry] = fuse_mount.exportd_mounts(target)
        assert entry.connection == session.connection
    assert fuse_mount.is_mount_root(target) is False
