"""qcow2 format driver (see driver.py) and its parts."""

from exportd.block.qcow2.driver import Qcow2Node

__all__ = ["Qcow2Node"]
