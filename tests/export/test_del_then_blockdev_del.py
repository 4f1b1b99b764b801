"""block-export-del then blockdev-del of the same node, sent back to back,
as scripts written for qemu-storage-daemon do: when no request is in
flight the export is gone (unmounted, node released, BLOCK_EXPORT_DELETED
sent) before block-export-del replies, so blockdev-del always succeeds.
(exportd used to finish the deletion after the reply: 20 of 20 failed.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from qemu.qmp import EventListener

from tests.support.daemon import Exportd
from tests.support.mounts import fuse_mounts_under


@pytest.mark.parametrize("kind", ["fuse", "nbd"])
async def test_back_to_back_deletes(exportd: Exportd, workdir: Path, kind: str) -> None:
    mnt = workdir / "disk.raw"
    mnt.touch()
    if kind == "nbd":
        await exportd.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(workdir / "n.sock")}}})
    listener = EventListener(("BLOCK_EXPORT_DELETED",))
    with exportd.client.listen(listener):
        for i in range(20):
            await exportd.cmd("blockdev-add", {"driver": "null-co", "node-name": f"n{i}", "size": 1 << 20})
            args = {"type": kind, "id": "e", "node-name": f"n{i}", "writable": True}
            args.update({"mountpoint": str(mnt)} if kind == "fuse" else {"name": "disk"})
            await exportd.cmd("block-export-add", args)
            await exportd.cmd("block-export-del", {"id": "e"})
            # the event came before the reply
            assert not listener.empty(), i
            assert (await listener.get())["data"] == {"id": "e"}
            await exportd.cmd("blockdev-del", {"node-name": f"n{i}"})
            assert fuse_mounts_under(str(workdir)) == []
    if kind == "nbd":
        await exportd.cmd("nbd-server-stop")
