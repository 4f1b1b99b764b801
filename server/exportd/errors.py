"""Errors that reach QMP clients, with QEMU's error classes."""

from __future__ import annotations


class QMPError(Exception):
    """An error reply: {"error": {"class": cls, "desc": desc}}."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


class CommandNotFound(QMPError):
    def __init__(self, desc: str) -> None:
        super().__init__(desc, "CommandNotFound")


class DeviceNotFound(QMPError):
    def __init__(self, desc: str) -> None:
        super().__init__(desc, "DeviceNotFound")


class BlockError(QMPError):
    """A block-layer failure at open/attach/permission time (GenericError)."""


class DeviceNotActive(QMPError):
    def __init__(self, desc: str) -> None:
        super().__init__(desc, "DeviceNotActive")
