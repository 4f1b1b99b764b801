"""Random writes, punched holes and zeroed ranges through a writable FUSE
export of every variant (over backing files and with internal snapshots):
the export reads back what was written, then `qemu-img check` is clean,
`qemu-img compare` matches a raw copy that received the same writes, the
snapshots are unchanged, and SEEK_DATA/SEEK_HOLE agree with `qemu-img map`
(see roundtrip.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.daemon import Exportd
from tests.support.qcow2_roundtrip import roundtrip
from tests.support.qcow2_variants import VARIANTS, build
from tests.support.threads import athread


@pytest.mark.parametrize("variant", VARIANTS)
async def test_random_writes_through_export(exportd: Exportd, workdir: Path, variant: str) -> None:
    img = await athread(build, variant, workdir, timeout=60)
    snapshots = ("s1", "s2") if variant == "snapshots" else ()
    # half the variants with discard=unmap (holes are freed), half with QEMU's default
    opts = {"discard": "unmap"} if VARIANTS.index(variant) % 2 == 0 else {}
    await roundtrip(exportd, workdir, img, variant, snapshots=snapshots, **opts)
