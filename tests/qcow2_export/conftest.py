"""Fixtures for qcow2 images exported through FUSE by a real exportd process.

The `workdir` and `exportd` fixtures (a real daemon, lazy-unmount safety net)
are tests/export's; images are built by tests/qcow2/variants.py (qemu-img and
qemu-io, the oracles)."""

from tests.export.conftest import exportd, workdir  # noqa: F401  (fixtures)
