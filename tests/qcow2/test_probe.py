"""One format probe (exportd.block.probe): every format driver declares
`probe(head)` on its class; the surest one wins, raw takes the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from exportd.block import driver_class
from exportd.block.probe import probe_backing_format, probe_format
from exportd.errors import BlockError
from tests.support.qcow2 import MiB, run


def test_probe_picks_the_format(tmp_path: Path) -> None:
    q, r, empty = tmp_path / "a.qcow2", tmp_path / "a.raw", tmp_path / "empty"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(q), str(MiB))
    r.write_bytes(b"QFI" + bytes(5000))  # almost the magic: still raw
    empty.write_bytes(b"")
    assert probe_format(str(q)) == "qcow2"
    assert probe_format(str(r)) == "raw"
    assert probe_format(str(empty)) == "raw"


def test_drivers_declare_their_probe() -> None:
    qcow2, raw, file = driver_class("qcow2"), driver_class("raw"), driver_class("file")
    assert qcow2 is not None and raw is not None and file is not None
    assert qcow2.probe(b"QFI\xfb" + bytes(100)) == 100 and qcow2.probe(b"\0" * 100) == 0
    assert 0 < raw.probe(b"anything") < 100
    assert not file.is_format  # protocol drivers are never probed


def test_missing_backing_file(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        probe_format(str(tmp_path / "nope"))
    with pytest.raises(BlockError, match="Could not open backing file"):
        probe_backing_format(str(tmp_path / "nope"))
