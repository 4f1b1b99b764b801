"""Fixtures for qcow2 images exported through FUSE by a real exportd process.

The `workdir` and `exportd` fixtures (a real daemon, lazy-unmount safety net)
are tests.support.export_fixtures'; images are built by
tests.support.qcow2_variants (qemu-img and qemu-io, the oracles)."""

from tests.support.export_fixtures import exportd, workdir  # noqa: F401  (fixtures)
