"""A second process holding a file node, for the image locking tests.

usage: lockpeer.py FILENAME PERM SHARED [read-only|locking-off]
Opens FILENAME with the file driver, attaches a user with PERM/SHARED (ints,
exportd.block.node.Perm bits), prints "OK" or "ERR <desc>" and holds the
node until stdin closes.
"""

import asyncio
import sys

from exportd.block.graph import BlockGraph
from exportd.block.node import Perm
from exportd.errors import BlockError


async def main() -> None:
    filename, perm, shared = sys.argv[1], Perm(int(sys.argv[2])), Perm(int(sys.argv[3]))
    extra = set(sys.argv[4:])
    g = BlockGraph(None)
    opts = {"driver": "file", "node-name": "peer", "filename": filename,
            "read-only": "read-only" in extra}
    if "locking-off" in extra:
        opts["locking"] = "off"
    try:
        node = await g.add(opts)
        node.attach("peer", perm, shared)
        print("OK", flush=True)
    except BlockError as e:
        print("ERR " + e.desc.replace("\n", "|"), flush=True)
        return
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await g.close_all()


asyncio.run(main())
