"""query-named-block-nodes: QEMU's BlockDeviceInfo / ImageInfo for a node."""

from __future__ import annotations

from typing import Any

from exportd.block.node import BlockNode


def backing_chain(node: BlockNode) -> list[BlockNode]:
    """The backing nodes below `node`, nearest first."""
    chain, seen = [], {id(node)}
    cur = node.children.get("backing")
    while cur is not None and id(cur) not in seen:
        chain.append(cur)
        seen.add(id(cur))
        cur = cur.children.get("backing")
    return chain


def qemu_length(node: BlockNode) -> int:
    """The size QEMU reports: it counts a host file in 512-byte sectors, so
    a file (and a raw node reaching its end) reads as rounded up. exportd's
    exports keep the exact size; only the query shows QEMU's figure."""
    if node.driver in ("file", "host_device"):
        return -(-node.getlength() // 512) * 512
    if node.driver == "raw" and getattr(node, "size", 0) is None:
        file = node.child("file")
        if file is not None:
            return max(0, qemu_length(file) - getattr(node, "offset", 0))
    return node.getlength()


async def image_info(node: BlockNode, *, flat: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {
        "filename": node.filename(),
        "format": node.driver,
        "virtual-size": qemu_length(node),
    }
    actual = await node.allocated_size()
    if actual >= 0:
        info["actual-size"] = actual
    if node.driver not in ("null-co", "null-aio", "nbd"):  # drivers without bdrv_get_info in QEMU
        info["dirty-flag"] = False
    backing = node.children.get("backing")
    if backing is not None:
        info["backing-filename"] = backing.filename()
        info["full-backing-filename"] = backing.filename()
        info["backing-filename-format"] = backing.driver
        if not flat:
            info["backing-image"] = await image_info(backing, flat=False)
    info.update(node.info())
    return info


async def block_device_info(node: BlockNode, *, flat: bool = False) -> dict[str, Any]:
    chain = backing_chain(node)
    result: dict[str, Any] = {
        "node-name": node.node_name,
        "drv": node.driver,
        "ro": node.read_only,
        "file": node.filename(),
        "encrypted": False,
        "backing_file_depth": len(chain),
        "detect_zeroes": node.options.get("detect-zeroes", "off"),
        "image": await image_info(node, flat=flat),
        "cache": {
            "writeback": True,
            "direct": node.cache_direct,
            "no-flush": node.cache_no_flush,
        },
        "write_threshold": node.write_threshold,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
    }
    if chain:
        result["backing_file"] = chain[0].filename()
    if node.dirty_bitmaps:
        result["dirty-bitmaps"] = [bm.info() for bm in node.dirty_bitmaps]
    return result


async def named_block_nodes(nodes: list[BlockNode], *, flat: bool = False) -> list[dict[str, Any]]:
    """Every node, newest first (QEMU's order)."""
    return [await block_device_info(n, flat=flat) for n in reversed(nodes)]
