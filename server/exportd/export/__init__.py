"""Block exports: the life cycle every type shares (base.BlockExport), the
I/O every type does on its node (io.ExportIO), the daemon's export table
(table.ExportTable), and one module per export type (fuse.py, ...).

Export types form a table, as QEMU's blk_exp_drivers[]: a type's module
defines a BlockExport subclass with `type = "<QAPI BlockExportType>"`,
decorated with `@register_export_type`, and is listed in EXPORT_MODULES so
that it is imported on first use. Adding an export type means that module,
its row here, and its members in schema/ (block-export-add's union).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exportd.export.base import BlockExport

EXPORT_MODULES: dict[str, str] = {
    "fuse": "exportd.export.fuse",
    "nbd": "exportd.export.nbd",
}

EXPORT_TYPES: dict[str, type[BlockExport]] = {}


def register_export_type(cls: type[BlockExport]) -> type[BlockExport]:
    """Class decorator: make `cls` the block-export-add type `cls.type`."""
    EXPORT_TYPES[cls.type] = cls
    return cls


def export_type(name: str) -> type[BlockExport] | None:
    """The class for export type `name`, importing its module on first use."""
    cls = EXPORT_TYPES.get(name)
    if cls is None and name in EXPORT_MODULES:
        importlib.import_module(EXPORT_MODULES[name])
        cls = EXPORT_TYPES.get(name)
    return cls
