"""Helpers and fixtures shared by exportd's tests, one module per kind of thing:

daemon.py           real exportd processes: DaemonProcess/spawn_daemon, Exportd (QMP client)
qmp.py              RawQMP (byte-level QMP), JobClient (JOB_STATUS_CHANGE recorder)
export_fixtures.py  the `workdir` and `exportd` fixtures of tests/export and tests/qcow2_export
host.py             Host: an in-process ExportTable and BlockGraph, add() an export on it
threads.py          athread: a blocking call off the serving event loop
programs.py         have, run, arun, command: external programs with a time limit
mounts.py           finding and lazily detaching FUSE mounts left below a directory
images.py           raw image files and the bytes they hold
fuse.py             the FUSE layer tests' serving(), start_toy(), child() and PRELUDE
toyfs.py            test filesystems (MemoryFS, FileFS) and `python -m tests.support.toyfs`
other_user.py       a copy of the code a child run as another user (`nobody`) imports
qcow2.py            qemu-img/qemu-io as oracles, open_qcow2(), read_all()
qcow2_variants.py   qcow2 image variants built by qemu-img/qemu-io
qcow2_export.py     qcow2 images exported over QMP; SEEK_DATA/HOLE vs `qemu-img map`
qcow2_roundtrip.py  the write round trip of the qcow2 export tests
qsd.py              qemu-storage-daemon as the differential tests' reference (running_qsd)

Scripts run as child processes by tests:
fileops.py          seeded random file operations (python fileops.py PATH SEED COUNT fuse|ref)
fuse_storm.py       write storm on a mount for the kill -9 test (python fuse_storm.py PATH SEED)
qcow2_storm.py      write storm through the qcow2 node (python -m tests.support.qcow2_storm)
qcow2_fuzz.py       the qcow2 fuzzer (python -m tests.support.qcow2_fuzz)
lockpeer.py         a second process holding a file node (python lockpeer.py FILE PERM SHARED)
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUPPORT_DIR = Path(__file__).resolve().parent  # where the scripts above are
