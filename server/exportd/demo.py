"""`make demo`: exportd's main job, end to end.

Creates a small qcow2 image (with exportd's own image creation), starts an
exportd daemon in the background, exports the image through FUSE as a raw
file, writes a message through that file, then shows `exportctl list` and a
read of the raw file. The daemon is left running as the demo's result; the
exact command that stops it is printed at the end.

    python -m exportd.demo [--dir DIR]      (default DIR: /tmp/exportd-demo)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MESSAGE = b"Hello from exportd: this qcow2 image reads as a raw file.\n"
IMAGE_SIZE = "64M"


def tool(name: str) -> list[str]:
    """The console script next to this Python (the venv's), else `python -m`."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return [str(candidate)]
    return [sys.executable, "-m", name]


def show(cmd: list[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    printable = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
    print(f"$ {printable}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print(out)
    if check and r.returncode != 0:
        raise SystemExit(f"demo: `{printable}` failed (exit {r.returncode})")
    return r


def stop_previous(exportctl: list[str], sock: Path, pidfile: Path) -> None:
    """A daemon left by an earlier demo run is asked to quit first."""
    if not sock.exists():
        return
    subprocess.run([*exportctl, "-s", str(sock), "--connect-timeout", "3", "quit"],
                   capture_output=True, timeout=30)
    for _ in range(100):
        if not pidfile.exists():
            break
        time.sleep(0.1)


def hexdump(data: bytes, offset: int = 0) -> str:
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset + i:08x}  {hexes:<47}  |{text}|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="exportd.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=os.environ.get("EXPORTD_DEMO_DIR", "/tmp/exportd-demo"))
    args = parser.parse_args(argv)

    workdir = Path(args.dir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sock, pidfile = workdir / "exportd.sock", workdir / "exportd.pid"
    image, raw = workdir / "disk.qcow2", workdir / "disk.raw"
    exportd, exportctl = tool("exportd"), tool("exportctl")
    ctl = [*exportctl, "-s", str(sock)]

    stop_previous(exportctl, sock, pidfile)

    print("== 1. A small qcow2 image, created by exportd itself")
    fmt = "qcow2"
    r = show([*exportctl, "create", str(image), IMAGE_SIZE, "--format", "qcow2"], check=False)
    if r.returncode != 0:  # a build without qcow2 creation: fall back to raw
        fmt, image = "raw", workdir / "disk.img"
        show([*exportctl, "create", str(image), IMAGE_SIZE, "--format", "raw"])

    print("\n== 2. The daemon, in the background")
    show([*exportd, "--socket", str(sock), "--pidfile", str(pidfile), "--daemonize"])

    print("\n== 3. The image as a block node, exported through FUSE as a raw file")
    r = show([*ctl, "blockdev-add",
              f"driver={fmt},node-name=disk,file.driver=file,file.filename={image}"], check=False)
    if r.returncode != 0 and fmt == "qcow2":  # no qcow2 driver in this build
        fmt, image = "raw", workdir / "disk.img"
        show([*exportctl, "create", str(image), IMAGE_SIZE, "--format", "raw"])
        show([*ctl, "blockdev-add",
              f"driver=raw,node-name=disk,file.driver=file,file.filename={image}"])
    elif r.returncode != 0:
        raise SystemExit("demo: blockdev-add failed")
    raw.touch()
    show([*ctl, "add", "disk", str(raw), "--id", "demo", "--writable"])

    print(f"\n== 4. Writing through the raw file ({raw.name}), as any program would")
    fd = os.open(raw, os.O_WRONLY)
    try:
        os.pwrite(fd, MESSAGE, 0)
        os.pwrite(fd, MESSAGE, 1 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"wrote {len(MESSAGE)} bytes at offsets 0 and 1 MiB, fsync'ed")

    print("\n== 5. exportctl list")
    show([*ctl, "list"])

    print(f"\n== 6. Reading the raw file {raw}")
    st = os.stat(raw)
    print(f"size {st.st_size} bytes (the image's virtual size), mode {st.st_mode & 0o7777:o}")
    with open(raw, "rb") as f:
        head = f.read(64)
        f.seek(1 << 20)
        again = f.read(len(MESSAGE))
    print(hexdump(head))
    print(f"at 1 MiB: {again.decode(errors='replace').rstrip()}")
    print(f"the {fmt} file itself: {image.stat().st_size} bytes on disk "
          f"for {st.st_size} virtual bytes")
    if again != MESSAGE or not head.startswith(MESSAGE):
        raise SystemExit("demo: the raw file does not read back what was written")

    stop = " ".join([*ctl, "quit"])
    print("\n== The daemon keeps running with the export mounted on")
    print(f"   {raw}")
    print("   Try: cmp, qemu-img info -f raw, hexdump, dd ... on it.")
    print("   Stop it (unmounts, deletes the export, exits):")
    print(f"   {stop}")
    if shutil.which("exportctl") is None:
        print(f"   (exportctl lives in {Path(exportctl[0]).parent})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
