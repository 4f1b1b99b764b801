"""Qcow2State: the in-memory metadata of an open qcow2 image, as the node's
halves (cluster mapping and allocation, write-back) see it. Declarations
only: Qcow2Node (node.py) fills these in at open."""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from exportd.block.qcow2 import header as hdr
from exportd.block.qcow2.imagefile import ImageFile
from exportd.block.qcow2.l2cache import L2Cache
from exportd.block.qcow2.refcount import Refcounts


class Qcow2State:
    io: ImageFile  # the image file, through the node's file edge
    rc: Refcounts
    header: hdr.Header
    l1: array
    l2cache: L2Cache
    l1_dirty: bool
    meta_clusters: set[int]  # clusters holding metadata: never handed out for data
    pending_free: list[tuple[int, int, bool]]  # (host offset, clusters, punch) after write-back
    cluster_bits: int
    cs: int  # cluster size
    cmask: int
    _last_comp: tuple[int, bytes]  # the last decompressed cluster (L2 entry, data)

    if TYPE_CHECKING:  # defined by the node
        def corruption(self, msg: str, offset: int = -1, size: int = -1) -> OSError: ...
