"""virtual-size as qemu-storage-daemon 7.2 reports it: a host file counts in
512-byte sectors, so an odd-sized file, and a raw node reaching its end,
read as rounded up; a raw window of explicit size does not. (The exports
keep the exact size: only the query shows QEMU's figure.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.qsd import QSD, replies_of_both


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_virtual_size_as_qemu(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    img = tmp_path / "odd.img"
    steps = [
        ("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)}),
        ("blockdev-add", {"driver": "raw", "node-name": "whole", "file": "f"}),
        ("blockdev-add", {"driver": "raw", "node-name": "tail", "file": "f", "offset": 512}),
        ("blockdev-add", {"driver": "raw", "node-name": "window", "file": "f", "offset": 512, "size": 300}),
        ("blockdev-add", {"driver": "raw", "node-name": "window", "file": "f", "offset": 1, "size": 512}),
        ("query-named-block-nodes", {"flat": True}),
    ]
    started = []
    ours, theirs = await replies_of_both(tmp_path, lambda: img.write_bytes(b"x" * 1000), steps,
                                         lambda: (started.append(daemon()) or started[0].socket))

    def sizes(reply: dict) -> dict[str, int]:
        return {n["node-name"]: n["image"]["virtual-size"] for n in reply["return"]}

    assert ours[:-1] == theirs[:-1], (ours, theirs)
    assert ours[3] == {"error": ["GenericError", "Specified size is not multiple of 512"]}
    assert sizes(ours[-1]) == sizes(theirs[-1]) == {"f": 1024, "whole": 1024, "tail": 512, "window": 512}
