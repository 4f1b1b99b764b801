"""The block layer: a graph of named nodes (exportd.block.graph) and its drivers.

Driver registry
---------------
`DRIVERS` maps a QAPI driver name ("file", "raw", "qcow2", ...) to its BlockNode
subclass. A driver module registers its class with the `@register_driver`
decorator at import time. Modules are imported lazily, on the first lookup of
one of their names (`driver_class`), so that an optional or broken driver does
not stop the daemon from starting; the module for a name is found in
`DRIVER_MODULES`, defaulting to `exportd.block.<name>` with '-' replaced by '_'.

To add a driver (qcow2, a network driver, ...) define in its module:

    from exportd.block import register_driver
    from exportd.block.node import BlockNode

    @register_driver
    class Qcow2Node(BlockNode):
        driver = "qcow2"
        is_format = True
        ...

The class is the driver's table (QEMU's BlockDriver): besides open() and
the I/O methods it may declare `probe(head)` (how sure it is that an image
starting with `head` is in its format: exportd.block.probe.probe_format asks
every format driver) and `create_steps(graph, options)` (blockdev-create:
commands/jobs.py asks the class, never the driver's name).

A module that prefers not to import the decorator may instead expose its class
as a module attribute `DRIVER` (or any BlockNode subclass whose `driver` class
attribute is the name asked for); the lookup registers it.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exportd.block.node import BlockNode

DRIVERS: dict[str, type[BlockNode]] = {}

# name -> module, for drivers whose module name differs from the driver name
DRIVER_MODULES: dict[str, str] = {
    "file": "exportd.block.file",
    "host_device": "exportd.block.file",
    "raw": "exportd.block.raw",
    "null-co": "exportd.block.null",
    "null-aio": "exportd.block.null",
    "qcow2": "exportd.block.qcow2",
}


def register_driver(cls: type[BlockNode]) -> type[BlockNode]:
    """Class decorator: make `cls` available as blockdev-add driver `cls.driver`."""
    DRIVERS[cls.driver] = cls
    return cls


def driver_class(name: str) -> type[BlockNode] | None:
    """The class for driver `name`, importing its module on first use; None if
    no such driver exists in this build."""
    cls = DRIVERS.get(name)
    if cls is not None:
        return cls
    module_name = DRIVER_MODULES.get(name, f"{__name__}.{name.replace('-', '_')}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):
            return None  # the driver's module does not exist (yet)
        raise
    if name not in DRIVERS:
        _register_from_module(module, name)
    return DRIVERS.get(name)


async def load_driver(name: str) -> type[BlockNode] | None:
    """driver_class for the event loop: a first import (qcow2's package:
    ~45 ms of module code) runs in a thread of its own, so the loop keeps
    its turns (the interpreter switches threads every 5 ms)."""
    cls = DRIVERS.get(name)
    if cls is not None:
        return cls
    from exportd.aio.threads import in_own_thread

    return await in_own_thread(driver_class, name)


def _register_from_module(module: object, name: str) -> None:
    from exportd.block.node import BlockNode

    candidates = [getattr(module, "DRIVER", None)]
    candidates += [obj for _, obj in inspect.getmembers(module, inspect.isclass)]
    for obj in candidates:
        if (
            inspect.isclass(obj)
            and issubclass(obj, BlockNode)
            and not inspect.isabstract(obj)
            and getattr(obj, "driver", None) == name
        ):
            DRIVERS[name] = obj
            return


def known_drivers() -> list[str]:
    """Every driver name this build can open (imports all driver modules)."""
    for name in list(DRIVER_MODULES):
        driver_class(name)
    return sorted(DRIVERS)
