"""Helpers for the qcow2 tests: qemu-img/qemu-io as oracles, image variants."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

from exportd.block.graph import BlockGraph
from exportd.block.node import BlockNode

MiB = 1 << 20


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def qemu_io(path: Path, cmds: list[str], fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, str(path))


def to_raw(path: Path, out: Path) -> bytes:
    run("qemu-img", "convert", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def check_clean(path: Path) -> dict[str, Any]:
    r = run("qemu-img", "check", "--output=json", str(path), check=False)
    assert r.returncode == 0, f"qemu-img check {path}: rc={r.returncode}\n{r.stdout}{r.stderr}"
    info = json.loads(r.stdout)
    assert not info.get("corruptions") and not info.get("check-errors"), info
    return info


def info(path: Path) -> dict[str, Any]:
    return json.loads(run("qemu-img", "info", "--output=json", str(path)).stdout)


def random_io_cmds(rng: random.Random, size: int, n: int, zeroes: bool = True) -> list[str]:
    """qemu-io commands writing patterns (and zeroes/discards) at random places."""
    cmds = []
    for _ in range(n):
        off = rng.randrange(0, size // 512) * 512
        ln = min(rng.choice([512, 4096, 65536, 200 * 1024, 700 * 1024]), size - off)
        kind = rng.random()
        if zeroes and kind < 0.15:
            cmds.append(f"write -z {off} {ln}")
        elif zeroes and kind < 0.25:
            cmds.append(f"discard {off} {ln}")
        else:
            cmds.append(f"write -P {rng.randrange(1, 256)} {off} {ln}")
    return cmds


async def open_qcow2(graph: BlockGraph, path: Path, name: str = "q", **opts: Any) -> BlockNode:
    options: dict[str, Any] = {"driver": "qcow2", "node-name": name,
                               "file": {"driver": "file", "filename": str(path)}}
    options.update(opts)
    return await graph.add(options)


async def read_image(path: Path) -> bytes:
    """The guest content of a qcow2 image as exportd's own reader sees it,
    opened read-only on a graph of its own."""
    g = BlockGraph(None)
    try:
        return await read_all(await open_qcow2(g, path, **{"read-only": True}))
    finally:
        await g.close_all()


async def read_all(node: BlockNode, chunk: int = 3 * MiB + 4096) -> bytes:
    out = bytearray()
    size = node.getlength()
    pos = 0
    while pos < size:
        n = min(chunk, size - pos)
        out += await node.read(pos, n)
        pos += n
    return bytes(out)
