"""Helpers for the NBD tests: run the real clients off the test's loop,
make images, and run python3-libnbd scripts under the system python (the
venv cannot import the Debian module)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class NbdDaemon:
    d: Any  # tests.support.daemon.Exportd
    sock: Path

    def uri(self, name: str = "") -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    async def export(self, export_id: str, node: str, **opts: Any) -> None:
        args = {"type": "nbd", "id": export_id, "node-name": node}
        args.update({k.replace("_", "-"): v for k, v in opts.items()})
        await self.d.cmd("block-export-add", args)

    async def qcow2(self, node: str, path: Path, **opts: Any) -> None:
        await self.d.cmd("blockdev-add", {"driver": "qcow2", "node-name": node,
                                          "file": {"driver": "file", "filename": str(path)}, **opts})


async def run(*argv: str, check: bool = True, timeout: float = 60, input: bytes | None = None
              ) -> subprocess.CompletedProcess[str]:
    """Run a tool in a worker thread (the test's loop keeps its QMP client)."""
    def go() -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              input=input.decode() if input else None)
    r = await asyncio.to_thread(go)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv} failed ({r.returncode}): {r.stderr}{r.stdout}")
    return r


async def nbdinfo_json(uri: str) -> dict[str, Any]:
    out = json.loads((await run("nbdinfo", "--json", uri)).stdout)
    for e in out["exports"]:
        e.pop("uri", None)
    return out


async def nbdsh(script: str, uri: str, timeout: float = 60) -> Any:
    """Run `script` (python3-libnbd; `h` connected to `uri` with structured
    replies and base:allocation requested) under the system python; it sets
    `result`, returned parsed from JSON."""
    prog = textwrap.dedent("""
        import json, sys, nbd, errno
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.add_meta_context("qemu:allocation-depth")
        h.connect_uri(sys.argv[1])
        result = None
    """) + textwrap.dedent(script) + "\nprint(json.dumps(result))\n"
    r = await run(SYSTEM_PYTHON, "-c", prog, uri, timeout=timeout)
    return json.loads(r.stdout.strip().splitlines()[-1])


def qemu_img_create(path: Path, size: str, fmt: str = "qcow2", backing: Path | None = None) -> None:
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*argv, str(path), size], check=True)


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> str:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    return subprocess.run([*argv, str(path)], check=True, capture_output=True, text=True).stdout


def chain_images(workdir: Path) -> tuple[Path, Path]:
    """base.qcow2 (0xaa at 0..1M, 0x11 at 4M..5M) under top.qcow2 (0xbb at 2M..3M, 0x22 at 4M..4.5M), 64 MiB."""
    base, top = workdir / "base.qcow2", workdir / "top.qcow2"
    for p in (base, top):
        p.unlink(missing_ok=True)
    qemu_img_create(base, "64M")
    qemu_io(base, "write -P 0xaa 0 1M", "write -P 0x11 4M 1M")
    qemu_img_create(top, "64M", backing=base)
    qemu_io(top, "write -P 0xbb 2M 1M", "write -P 0x22 4M 512k", "write -z 8M 1M")
    return base, top
