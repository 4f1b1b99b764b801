"""The peers the benchmark compares: how each one starts, where fio aims, how it stops.

A peer that cannot start is not an error of the run: start() raises
PeerUnavailable with a one-line reason (a missing program or facility: the
report says "unavailable: <reason>") or its subclass PeerStartError (the
program ran and refused or died while starting, e.g. an exportd that does not
know an option yet: "start error: <reason>"), and the run goes on without it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .images import Images
from .mounts import force_unmount, is_mounted
from .scratch import Scratch, stop_process

READY_TIMEOUT_S = 20.0
NULL_SIZE = 1024**3


class PeerUnavailable(Exception):
    """The peer cannot run here; str(exc) is the reason shown in the report."""


class PeerStartError(PeerUnavailable):
    """The peer's program was launched but exited or never served."""


@dataclass
class PeerEnv:
    """What peers need from the run."""
    scratch: Scratch
    images: Images
    exportd_cmd: list[str] | None          # None: no exportd executable found
    exportd_missing_reason: str
    pyfuse3_python: str                    # interpreter that has pyfuse3 and trio
    pyfuse3_script: Path
    null_size: int = NULL_SIZE
    exportd_env: dict[str, str] = field(default_factory=dict)  # e.g. a lever's switch
    passthrough_hp: Path | None = None     # libfuse's example, built by bench/peers/build_passthrough_hp.sh


@dataclass
class Peer:
    name: str
    label: str
    family: str                            # raw | qcow2 | null-co
    status: str = "new"                    # new | ok | unavailable | start-error | failed | stopped
    reason: str = ""
    info: dict = field(default_factory=dict)

    def start(self, env: PeerEnv) -> None:
        raise NotImplementedError

    def fio_paths(self, two_exports: bool) -> list[Path]:
        raise NotImplementedError

    def alive(self) -> bool:
        return True

    def kill(self) -> None:
        """Abort hard (a hung server): pending I/O on its mounts must fail."""

    def stop(self) -> None:
        pass

    @property
    def pid(self) -> int | None:
        return None


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class DirectPeer(Peer):
    """fio straight on the raw image file: the physical limit."""

    def start(self, env: PeerEnv) -> None:
        self.path = env.images.raw()
        self.info["image"] = str(self.path)

    def fio_paths(self, two_exports: bool) -> list[Path]:
        return [self.path, self.path] if two_exports else [self.path]


class ProcessPeer(Peer):
    """A peer that is a server process exposing mountpoints (regular files)."""

    # Class defaults: Peer's dataclass __init__ does not call a subclass's
    # __post_init__, and stop() must work on a peer whose start() failed early.
    proc: subprocess.Popen | None = None
    mountpoints: list[Path] = []  # only ever replaced, never mutated in place
    sigterm_exit_statuses: tuple[int, ...] = (0,)  # what a clean exit on SIGTERM looks like

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _launch(self, env: PeerEnv, cmd: list[str], workdir: Path,
                extra_environ: dict[str, str] | None = None) -> None:
        self.info["command"] = cmd
        if extra_environ:
            self.info["environment"] = dict(extra_environ)
        self.log_path = workdir / "server.log"
        with self.log_path.open("wb") as log:
            # Own session: a Ctrl-C on the harness must not kill servers under
            # fio's feet; the harness stops them itself, in order.
            self.proc = env.scratch.track(subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=os.environ | (extra_environ or {})))

    def _wait_ready(self, extra_ready=lambda: True) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            status = self.proc.poll()
            if status is not None:
                last = _last_line(self.log_path)
                self._unmount_leftovers()
                raise PeerStartError(f"exited with status {status}" + (f": {last}" if last else ""))
            if all(is_mounted(m) for m in self.mountpoints) and extra_ready():
                return
            if time.monotonic() > deadline:
                last = _last_line(self.log_path)
                self.stop()
                raise PeerStartError(f"not serving after {READY_TIMEOUT_S:.0f} s"
                                      + (f": {last}" if last else ""))
            time.sleep(0.05)

    def _unmount_leftovers(self) -> None:
        for m in self.mountpoints:
            if is_mounted(m):
                force_unmount(m)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._unmount_leftovers()

    def stop(self) -> None:
        if self.proc is not None:
            status = stop_process(self.proc, grace=10.0)
            self.info["exit_status"] = status
            self.info["exit_status_expected"] = status in self.sigterm_exit_statuses
        self._unmount_leftovers()


class Pyfuse3Peer(ProcessPeer):
    """bench/peers/pyfuse3_file.py mounted over a file, serving the raw image."""

    def start(self, env: PeerEnv) -> None:
        probe = subprocess.run([env.pyfuse3_python, "-c", "import pyfuse3, trio"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            raise PeerUnavailable("pyfuse3/trio not importable by "
                                  f"{env.pyfuse3_python} (pip install -e '.[bench]')")
        workdir = env.scratch.dir(self.name)
        mountpoint = workdir / "export0.raw"
        mountpoint.touch()
        self.mountpoints = [mountpoint]
        image = env.images.raw()
        self._launch(env, [env.pyfuse3_python, str(env.pyfuse3_script), str(image), str(mountpoint)],
                     workdir)
        self._wait_ready()

    def fio_paths(self, two_exports: bool) -> list[Path]:
        # One mount per process is all pyfuse3 offers: both jobs share it.
        m = self.mountpoints[0]
        return [m, m] if two_exports else [m]


def blockdev_args(family: str, image: Path | None, null_size: int,
                  file_options: str = "") -> tuple[list[str], str]:
    """--blockdev options for a family and the node name to export;
    file_options (",aio=io_uring") go to the file node."""
    if family == "raw":
        return ["--blockdev", f"driver=file,node-name=file0,filename={image}{file_options}"], "file0"
    if family == "qcow2":
        return ["--blockdev", f"driver=file,node-name=file0,filename={image}{file_options}",
                "--blockdev", "driver=qcow2,node-name=qcow0,file=file0"], "qcow0"
    if family == "null-co":
        return ["--blockdev", f"driver=null-co,node-name=null0,size={null_size}"], "null0"
    raise ValueError(family)


class DaemonPeer(ProcessPeer):
    """qemu-storage-daemon or exportd: same blockdev/export/monitor arguments.

    export_count FUSE exports of one node (two, for the two-exports workload);
    0 for the control-plane daemons, which get their exports over QMP.
    """

    export_count: int = 2
    extra_export_options: str = ""
    private_image: bool = False
    objects: tuple[str, ...] = ()          # --object values, before the block devices
    file_options: str = ""                 # appended to the file node's options

    def program(self, env: PeerEnv) -> list[str]:
        raise NotImplementedError

    def environment(self, env: PeerEnv) -> dict[str, str]:
        return {}

    def command(self, program: list[str], image: Path | None, workdir: Path,
                null_size: int) -> list[str]:
        """The whole command line; fills self.mountpoints, self.node_name and self.qmp_path."""
        blockdevs, self.node_name = blockdev_args(self.family, image, null_size, self.file_options)
        objects = [arg for value in self.objects for arg in ("--object", value)]
        self.mountpoints = []
        exports = []
        for i in range(self.export_count):
            mountpoint = workdir / f"export{i}.raw"
            self.mountpoints.append(mountpoint)
            exports += ["--export", f"type=fuse,id=export{i},node-name={self.node_name},"
                        f"mountpoint={mountpoint},writable=on{self.extra_export_options}"]
        self.qmp_path = workdir / "qmp.sock"
        monitor = ["--chardev", f"socket,id=mon0,path={self.qmp_path},server=on,wait=off",
                   "--monitor", "chardev=mon0"]
        return program + objects + blockdevs + exports + monitor

    def start(self, env: PeerEnv) -> None:
        program = self.program(env)
        workdir = env.scratch.dir(self.name)
        image = None
        if self.family != "null-co":
            image = (env.images.private_copy(self.family, self.name) if self.private_image
                     else env.images.base(self.family))
        cmd = self.command(program, image, workdir, env.null_size)
        for mountpoint in self.mountpoints:
            mountpoint.touch()
        self._launch(env, cmd, workdir, self.environment(env))
        self._wait_ready(extra_ready=self.qmp_path.exists)
        self.info["query-block-exports"] = self._query_exports()

    def _query_exports(self) -> object:
        from .qmp import qmp_execute
        try:
            return asyncio.run(qmp_execute(self.qmp_path, "query-block-exports"))
        except Exception as exc:  # informational only: the mounts already serve
            return f"error: {exc}"

    def fio_paths(self, two_exports: bool) -> list[Path]:
        return self.mountpoints[:2] if two_exports else self.mountpoints[:1]


IOTHREAD_ID = "io0"


class QsdPeer(DaemonPeer):
    """qemu-storage-daemon, plain or with one of the two levers a user tuning
    it would reach for: iothread=True puts every export in one iothread
    (`--object iothread` and the export's `iothread=`; one, because both
    exports share the node and a node lives in one AioContext); aio="io_uring"
    submits the file node's I/O through io_uring instead of its thread pool."""

    def __init__(self, *args, iothread: bool = False, aio: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if (iothread or aio) and self.family == "qcow2":
            # Its own image: the plain peer holds the qcow2 base image's write
            # lock (raw file nodes share it, and 1 GiB copies fill tmpfs).
            self.private_image = True
        if iothread:
            self.objects = (f"iothread,id={IOTHREAD_ID}",)
            self.extra_export_options += f",iothread={IOTHREAD_ID}"
        if aio:
            self.file_options = f",aio={aio}"

    def program(self, env: PeerEnv) -> list[str]:
        qsd = shutil.which("qemu-storage-daemon")
        if qsd is None:
            raise PeerUnavailable("qemu-storage-daemon not installed (qemu-system-common)")
        return [qsd]


class ExportdPeer(DaemonPeer):
    private_image = True  # exportd locks images its own way: never share with another daemon

    def __init__(self, *args, passthrough: str | None = None, growable: bool = False,
                 io_uring: str | None = None, environ: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.passthrough = passthrough
        self.environ = environ or {}  # a design switch of this peer's own
        if growable:
            self.extra_export_options += ",growable=on"
        if passthrough is not None:
            self.extra_export_options += f",passthrough={passthrough}"
        if io_uring is not None:
            # FUSE over io_uring (issue 17); an exportd without the option
            # refuses to start, which the report shows as a start error.
            self.extra_export_options += f",io-uring={io_uring}"

    def program(self, env: PeerEnv) -> list[str]:
        if env.exportd_cmd is None:
            raise PeerUnavailable(env.exportd_missing_reason)
        return list(env.exportd_cmd)

    def environment(self, env: PeerEnv) -> dict[str, str]:
        return dict(env.exportd_env) | self.environ

    def start(self, env: PeerEnv) -> None:
        super().start(env)
        if self.environ.get("EXPORTD_FUSE_URING_THREADS", "0") == "0":
            return
        # an exportd without ring threads would be the loop-driven ring: never
        # report it under this peer's name
        threads = thread_names(self.proc.pid)
        self.info["threads"] = threads
        if not any(name.startswith(RING_THREAD_PREFIX) for name in threads):
            self.stop()
            raise PeerStartError(f"no {RING_THREAD_PREFIX}N thread: no ring threads (threads: {threads})")


URING_PARAMETER = Path("/sys/module/fuse/parameters/enable_uring")
RING_THREAD_PREFIX = "fuse-ring-"
WORKER_THREAD = "fuse_worker"
THREADS_TIMEOUT_S = 5.0


def thread_names(pid: int) -> dict[str, int]:
    """How many threads of the process carry each name (/proc/PID/task/*/comm)."""
    names: dict[str, int] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return names  # the process is gone
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended
        names[name] = names.get(name, 0) + 1
    return dict(sorted(names.items()))


def uring_enabled(parameter: Path = URING_PARAMETER) -> tuple[bool, str]:
    """Whether the kernel offers FUSE over io_uring, and why not."""
    try:
        value = parameter.read_text().strip()
    except OSError:
        return False, f"{parameter} missing (kernel without FUSE over io_uring)"
    if value != "Y":
        return False, f"{parameter} is {value} (as root: echo Y > {parameter}; make bench does)"
    return True, ""


class PassthroughHpPeer(ProcessPeer):
    """libfuse's passthrough_hp (C, libfuse >= 3.18) over a directory holding a
    copy of the raw image (shared by its two configurations only);
    --nopassthrough --nosplice, so it reads and writes the file itself, as
    exportd does. io_uring=False: requests over /dev/fuse,
    served by libfuse's worker threads; True: `-o io_uring`, served by the
    per-CPU ring threads (fuse-ring-N), which start() checks exist."""

    # libfuse's loop returns the signal that ended it and the example exits 1.
    sigterm_exit_statuses = (0, 1)

    def __init__(self, *args, io_uring: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.io_uring = io_uring

    def command(self, binary: Path, source: Path, mountpoint: Path) -> list[str]:
        cmd = [str(binary), "--foreground", "--nopassthrough", "--nosplice"]
        if self.io_uring:
            cmd += ["-o", "io_uring"]
        return cmd + [str(source), str(mountpoint)]

    def start(self, env: PeerEnv) -> None:
        if env.passthrough_hp is None or not env.passthrough_hp.exists():
            raise PeerUnavailable("passthrough_hp not built (bench/peers/build_passthrough_hp.sh; "
                                  "make bench runs it)")
        if self.io_uring:
            enabled, why = uring_enabled()
            if not enabled:
                raise PeerUnavailable(why)
        workdir = env.scratch.dir(self.name)
        # One copy for both configurations (they never lock it and fio
        # measures one peer at a time): a 1 GiB image less on tmpfs.
        source = env.scratch.dir("passthrough-hp-source")
        if not (source / "image.raw").exists():
            env.images.private_copy("raw", "passthrough-hp", source / "image.raw")
        self.info["image"] = str(source / "image.raw")
        mountpoint = workdir / "mnt"
        mountpoint.mkdir()
        self.mountpoints = [mountpoint]
        self.file = mountpoint / "image.raw"
        self._launch(env, self.command(env.passthrough_hp, source, mountpoint), workdir)
        self._wait_ready()
        # The mount shows before libfuse has started its threads (the rings
        # come after INIT); a server that silently fell back to /dev/fuse
        # must not be reported as the io_uring peer.
        deadline = time.monotonic() + THREADS_TIMEOUT_S
        while True:
            threads = thread_names(self.proc.pid)
            rings = sum(n for name, n in threads.items() if name.startswith(RING_THREAD_PREFIX))
            workers = sum(n for name, n in threads.items() if name == WORKER_THREAD)
            if (rings if self.io_uring else workers) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.info["threads"] = threads
        if self.io_uring and rings == 0:
            self.stop()
            raise PeerStartError(f"no {RING_THREAD_PREFIX}N thread: not serving through io_uring "
                                 f"(threads: {threads})")

    def fio_paths(self, two_exports: bool) -> list[Path]:
        return [self.file, self.file] if two_exports else [self.file]


def fio_peers() -> list[Peer]:
    """Every peer of the I/O workloads, in the order they run within a repetition."""
    return [
        DirectPeer("direct", "direct access", "raw"),
        QsdPeer("qsd-raw", "qemu-storage-daemon, raw", "raw"),
        QsdPeer("qsd-raw-iothread", "qemu-storage-daemon, raw, iothread", "raw", iothread=True),
        QsdPeer("qsd-raw-aio-uring", "qemu-storage-daemon, raw, aio=io_uring", "raw", aio="io_uring"),
        Pyfuse3Peer("pyfuse3", "pyfuse3 single-file FS, raw", "raw"),
        PassthroughHpPeer("passthrough-hp", "libfuse passthrough_hp, /dev/fuse", "raw"),
        PassthroughHpPeer("passthrough-hp-uring", "libfuse passthrough_hp, io_uring", "raw", io_uring=True),
        # growable=on: exportd refuses passthrough on a writable, non-growable
        # export (the kernel would let writes past EOF grow the file); fio
        # never writes past EOF, so this changes nothing else.
        ExportdPeer("exportd-raw-pt", "exportd, raw, passthrough=on", "raw", passthrough="on",
                    growable=True),
        ExportdPeer("exportd-raw", "exportd, raw, passthrough=off", "raw", passthrough="off"),
        ExportdPeer("exportd-raw-uring", "exportd, raw, passthrough=off, io-uring=on, loop-driven ring", "raw",
                    passthrough="off", io_uring="on", environ={"EXPORTD_FUSE_URING_THREADS": "0"}),
        ExportdPeer("exportd-raw-uring-threads", "exportd, raw, passthrough=off, io-uring=on, ring threads",
                    "raw", passthrough="off", io_uring="on", environ={"EXPORTD_FUSE_URING_THREADS": "1"}),
        QsdPeer("qsd-qcow2", "qemu-storage-daemon, qcow2", "qcow2"),
        QsdPeer("qsd-qcow2-iothread", "qemu-storage-daemon, qcow2, iothread", "qcow2", iothread=True),
        QsdPeer("qsd-qcow2-aio-uring", "qemu-storage-daemon, qcow2, aio=io_uring", "qcow2",
                aio="io_uring"),
        ExportdPeer("exportd-qcow2", "exportd, qcow2", "qcow2"),
        ExportdPeer("exportd-qcow2-uring", "exportd, qcow2, io-uring=on", "qcow2", io_uring="on"),
        QsdPeer("qsd-null-co", "qemu-storage-daemon, null-co", "null-co"),
        ExportdPeer("exportd-null-co", "exportd, null-co", "null-co"),
    ]


def control_peers() -> list[DaemonPeer]:
    """One daemon of each kind with a null-co node and no export, for the QMP figures."""
    qsd = QsdPeer("qsd", "qemu-storage-daemon", "null-co")
    exportd = ExportdPeer("exportd", "exportd", "null-co")
    for peer in (qsd, exportd):
        peer.export_count = 0
    return [qsd, exportd]


def select(peers: list[Peer], only: list[str] | None) -> list[Peer]:
    """--only takes peer names or families (raw, qcow2, null-co)."""
    if not only:
        return peers
    return [p for p in peers if p.name in only or p.family in only]


def python_for_pyfuse3() -> str:
    return sys.executable
