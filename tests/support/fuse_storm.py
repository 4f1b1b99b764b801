"""Write storm on a FUSE mount for tests/qcow2_export/test_kill9.py, run as a child process:

    python fuse_storm.py PATH SEED

Performs fileops.ops(SEED, size, ...) on PATH (pwrite, fallocate punch-hole
and zero-range, fsync), printing `OP i` before operation i and `ACK n` once
the first n operations are durable (fsync returned). Ends at the first error
(the daemon was killed). The parent replays the operations to know what must
be on disk."""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fileops import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate, ops  # noqa: E402

OPS = 5000


def main(path: str, seed: str) -> int:
    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    data_rng = random.Random(f"data-{seed}")
    try:
        for i, (kind, off, ln) in enumerate(ops(seed, size, OPS)):
            print(f"OP {i}", flush=True)
            if kind == "write":
                os.pwrite(fd, data_rng.randbytes(ln), off)
            elif kind == "punch":
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, ln)
            elif kind == "zero":
                fallocate(fd, FALLOC_FL_ZERO_RANGE, off, ln)
            else:
                os.fsync(fd)
                print(f"ACK {i + 1}", flush=True)
    except OSError as e:
        print(f"ERR {e.errno}", flush=True)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
