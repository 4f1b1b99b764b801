"""The exportd command line, compatible with qemu-storage-daemon's.

    exportd [--chardev socket,id=ID,path=PATH,server=on,wait=off --monitor chardev=ID]...
            [--socket PATH] [--object OPTIONS]... [--blockdev OPTIONS]... [--export OPTIONS]...
            [--pidfile PATH] [--daemonize] [--log-file PATH] [--log-level LEVEL] [--syslog] [-V] [-h]

--object, --blockdev and --export take QEMU's keyval syntax or a JSON object
and run the same validation and handler as the QMP commands object-add,
blockdev-add and block-export-add, in the order given (--object's first
element is its qom-type: `tls-creds-x509,id=tls0,dir=...`). Any startup error prints
`exportd: <desc>` and exits 1, leaving nothing behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from exportd import __version__, systemd
from exportd.errors import QMPError
from exportd.logsetup import LEVELS, configure, detach_stderr
from exportd.qapi.keyval import KeyvalError, coerce, parse, parse_option

if TYPE_CHECKING:
    from exportd.qapi.schema import Schema

log = logging.getLogger("exportd")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StartupError(Exception):
    pass


def default_socket_path() -> str:
    """$XDG_RUNTIME_DIR/exportd.sock, or /run/exportd.sock for root."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "exportd.sock")
    if os.geteuid() == 0:
        return "/run/exportd.sock"
    raise StartupError("no monitor given and XDG_RUNTIME_DIR is not set: use --socket PATH")


@dataclass
class MonitorSpec:
    path: str  # "" for a socket passed in as `fd`
    pretty: bool = False
    name: str = ""
    fd: int | None = None  # a listening socket given by a service manager


@dataclass
class Options:
    monitors: list[MonitorSpec] = field(default_factory=list)
    actions: list[tuple[str, str]] = field(default_factory=list)  # (QMP command, text)
    pidfile: str | None = None
    daemonize: bool = False
    log_file: str | None = None
    log_level: str | None = None
    syslog: bool = False
    socket_mode: int = 0o600


class _Ordered(argparse.Action):
    """Keep --chardev/--monitor/--socket/--blockdev/--export in command-line order."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        items = getattr(namespace, "ordered", None) or []
        items.append((self.dest, values))
        namespace.ordered = items


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        # startup errors all look alike: `exportd: <desc>`, status 1
        self.exit(1, f"exportd: {message} (see exportd --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="exportd",
        description="Export disk images and block devices as raw files through FUSE, "
        "controlled over QMP (qemu-storage-daemon compatible command line).",
        epilog="Without any monitor option exportd listens on $XDG_RUNTIME_DIR/exportd.sock "
        "(/run/exportd.sock for root).",
    )
    p.add_argument("-V", "--version", action="version",
                   version=f"exportd {__version__} (QMP as QEMU %d.%d.%d)" % (9, 2, 0))
    p.add_argument("--chardev", action=_Ordered, dest="chardev", metavar="socket,id=ID,path=PATH,server=on,wait=off",
                   help="a UNIX socket character device for --monitor")
    p.add_argument("--monitor", action=_Ordered, dest="monitor", metavar="[chardev=]ID[,pretty=on|off]",
                   help="serve QMP on the chardev ID")
    p.add_argument("--socket", action=_Ordered, dest="socket", metavar="PATH",
                   help="shorthand for a --chardev socket plus --monitor on PATH")
    p.add_argument("--object", action=_Ordered, dest="object", metavar="TYPE,id=ID[,PROP=VALUE...]",
                   help="add an object, e.g. tls-creds-x509 (keyval or JSON, as the QMP object-add)")
    p.add_argument("--blockdev", action=_Ordered, dest="blockdev", metavar="OPTIONS",
                   help="add a block node (keyval or JSON, as the QMP blockdev-add)")
    p.add_argument("--export", action=_Ordered, dest="export", metavar="OPTIONS",
                   help="add an export (keyval or JSON, as the QMP block-export-add)")
    p.add_argument("--nbd-server", action=_Ordered, dest="nbd_server", metavar="OPTIONS",
                   help="start the NBD server (addr.type=unix,addr.path=P or addr.type=inet,"
                        "addr.host=H,addr.port=N; as the QMP nbd-server-start)")
    p.add_argument("--pidfile", metavar="PATH", help="write the daemon's pid to PATH (locked)")
    p.add_argument("--daemonize", action="store_true",
                   help="run in the background; return once startup succeeded or failed")
    p.add_argument("--log-file", metavar="PATH",
                   help="append log lines to PATH (default: stderr; syslog once daemonized)")
    p.add_argument("--log-level", choices=LEVELS,
                   help="log lines of this level and above (default: warning; debug logs every QMP command)")
    p.add_argument("--syslog", action="store_true", help="log to syslog (the journal) also in the foreground")
    p.add_argument("--socket-mode", metavar="MODE", default="0600",
                   help="permissions of the monitor sockets exportd creates, in octal (default 0600: "
                        "only the daemon's user may connect)")
    return p


def parse_options(argv: Sequence[str]) -> Options:
    ns = build_parser().parse_args(argv)
    try:
        socket_mode = int(ns.socket_mode, 8)
    except ValueError:
        raise StartupError(f"--socket-mode: '{ns.socket_mode}' is not an octal mode") from None
    if not 0 <= socket_mode <= 0o777:
        raise StartupError(f"--socket-mode: '{ns.socket_mode}' is not a permission mode (0000-0777)")
    opts = Options(pidfile=ns.pidfile, daemonize=ns.daemonize, log_file=ns.log_file, log_level=ns.log_level,
                   syslog=ns.syslog, socket_mode=socket_mode)
    chardevs: dict[str, str | int] = {}
    for kind, text in getattr(ns, "ordered", None) or []:
        if kind == "chardev":
            cid, path = _parse_chardev(text)
            if cid in chardevs:
                raise StartupError(f"attempt to add duplicate chardev '{cid}'")
            chardevs[cid] = path
        elif kind == "monitor":
            opts.monitors.append(_parse_monitor(text, chardevs))
        elif kind == "socket":
            opts.monitors.append(MonitorSpec(text))
        elif kind == "blockdev":
            opts.actions.append(("blockdev-add", text))
        elif kind == "export":
            opts.actions.append(("block-export-add", text))
        elif kind == "object":
            opts.actions.append(("object-add", text))
        elif kind == "nbd_server":
            opts.actions.append(("nbd-server-start", text))
    return opts


def _parse_chardev(text: str) -> tuple[str, str | int]:
    try:
        kv = parse(text, implied_key="backend")
    except KeyvalError as e:
        raise StartupError(f"--chardev: {e}") from None
    backend = kv.pop("backend", None)
    if backend != "socket":
        raise StartupError(f"--chardev: backend '{backend}' is not supported (only 'socket')")
    cid = kv.pop("id", None)
    if not isinstance(cid, str) or not cid:
        raise StartupError("--chardev: Parameter 'id' is missing")
    path = kv.pop("path", None)
    fd = kv.pop("fd", None)
    if "host" in kv or "port" in kv:
        raise StartupError(f"chardev '{cid}': only UNIX sockets (path= or fd=) are supported")
    if fd is not None:
        if path is not None:
            raise StartupError(f"chardev '{cid}': Parameters 'path' and 'fd' are mutually exclusive")
        if not isinstance(fd, str) or not fd.isdigit():
            raise StartupError(f"chardev '{cid}': Parameter 'fd' expects a file descriptor number")
    elif not isinstance(path, str) or not path:
        raise StartupError(f"chardev '{cid}': Parameter 'path' is missing")
    for key in ("server", "wait"):
        value = kv.pop(key, "on" if key == "server" else "off")
        if value not in ("on", "off", "yes", "no", "true", "false"):
            raise StartupError(f"chardev '{cid}': Parameter '{key}' expects 'on' or 'off'")
        if key == "server" and value in ("off", "no", "false"):
            raise StartupError(f"chardev '{cid}': exportd serves QMP, it does not connect (use server=on)")
    for key in kv:
        raise StartupError(f"chardev '{cid}': Invalid parameter '{key}'")
    return cid, int(fd) if fd is not None else path  # type: ignore[return-value]


def _parse_monitor(text: str, chardevs: dict[str, str | int]) -> MonitorSpec:
    try:
        kv = parse(text, implied_key="chardev")
    except KeyvalError as e:
        raise StartupError(f"--monitor: {e}") from None
    cid = kv.pop("chardev", None)
    if not isinstance(cid, str) or cid not in chardevs:
        raise StartupError(f"--monitor: chardev '{cid}' not found")
    mode = kv.pop("mode", "control")
    if mode != "control":
        raise StartupError(f"--monitor: mode '{mode}' is not supported (only 'control')")
    pretty = kv.pop("pretty", "off")
    if pretty not in ("on", "off"):
        raise StartupError("--monitor: Parameter 'pretty' expects 'on' or 'off'")
    name = kv.pop("id", "")
    for key in kv:
        raise StartupError(f"--monitor: Invalid parameter '{key}'")
    target = chardevs[cid]
    name = name if isinstance(name, str) else ""
    if isinstance(target, int):
        return MonitorSpec("", pretty == "on", name, fd=target)
    return MonitorSpec(target, pretty == "on", name)


# the key a first bare word stands for, as in qemu-storage-daemon:
# `--object tls-creds-x509,id=...`, `--blockdev file,...`, `--export fuse,...`
OPTION_OF = {"object-add": "--object", "blockdev-add": "--blockdev", "block-export-add": "--export",
             "nbd-server-start": "--nbd-server"}
IMPLIED_KEYS = {"object-add": "qom-type", "blockdev-add": "driver", "block-export-add": "type"}


def option_arguments(schema: Schema, command: str, text: str) -> dict[str, Any]:
    """A --object/--blockdev/--export value as the arguments of its QMP command."""
    try:
        args, is_keyval = parse_option(text, IMPLIED_KEYS.get(command))
    except KeyvalError as e:
        raise QMPError(str(e)) from None
    if command == "nbd-server-start":
        args = _nbd_server_legacy(args)  # --nbd-server's addr is a flat SocketAddress
    if is_keyval:
        args = coerce(schema, command, args)
    return args


def _nbd_server_legacy(args: dict[str, Any]) -> dict[str, Any]:
    """--nbd-server's flat addr (type=unix,path=...) as nbd-server-start's
    SocketAddressLegacy (type=unix,data.path=...)."""
    addr = args.get("addr")
    if isinstance(addr, dict) and "data" not in addr and "type" in addr:
        addr = dict(addr)
        kind = addr.pop("type")
        args = {**args, "addr": {"type": kind, "data": addr}}
    return args


# --- daemonizing ------------------------------------------------------------------------
def daemonize() -> Callable[[int], None]:
    """Fork; the parent waits for the child's startup status and exits with it.

    Returns notify(status) for the child: it reports the status to the parent,
    and on success detaches stdio (errors before that still reach the user).
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        data = b""
        with contextlib.suppress(OSError):
            data = os.read(rfd, 1)
        status = data[0] if data else 1
        if not data:
            # the child died before reporting: reap it if it already exited
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        os._exit(status)
    os.close(rfd)
    os.setsid()
    pid = os.fork()  # not a session leader: can never get a controlling tty
    if pid > 0:
        os._exit(0)
    sent = False

    def notify(status: int) -> None:
        nonlocal sent
        if sent:
            return
        sent = True
        with contextlib.suppress(OSError):
            os.write(wfd, bytes([status]))
            os.close(wfd)
        if status == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
            os.chdir("/")
            detach_stderr()

    return notify


# --- running ------------------------------------------------------------------------------
async def run(opts: Options, notify: Callable[[int], None]) -> int:
    from exportd.daemon import Daemon
    from exportd.monitor.server import MonitorError

    daemon = Daemon()
    loop = asyncio.get_running_loop()
    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, daemon.request_shutdown, "host-signal")
    try:
        activated = [MonitorSpec("", name=name, fd=fd) for fd, name in systemd.listen_fds()]
        monitors = opts.monitors + activated or [MonitorSpec(default_socket_path())]
        for spec in monitors:
            path = os.path.abspath(spec.path) if spec.fd is None else spec.path
            await daemon.add_monitor(path, pretty=spec.pretty, name=spec.name, fd=spec.fd, mode=opts.socket_mode)
        for command, text in opts.actions:
            if daemon.shutting_down:
                break
            try:
                args = option_arguments(daemon.schema, command, text)
                await daemon.execute(command, args)
            except QMPError as e:
                # QEMU names the option that failed: `--blockdev TEXT: desc`
                e.desc = f"{OPTION_OF[command]} {text}: {e.desc}"
                raise
        if opts.pidfile and not daemon.shutting_down:
            daemon.write_pidfile(opts.pidfile)
    except (QMPError, StartupError, MonitorError, OSError) as e:
        desc = e.desc if isinstance(e, QMPError) else str(e)
        print(f"exportd: {desc}", file=sys.stderr, flush=True)
        await daemon.shutdown(None)
        notify(1)
        return 1
    notify(0)
    systemd.notify(f"READY=1\nMAINPID={os.getpid()}")
    await daemon.stopped.wait()
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    configure(None, None, False)
    # ids and arguments may nest up to the framing limit (1024 levels)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    try:
        opts = parse_options(argv)
        if not opts.monitors and "LISTEN_FDS" not in os.environ:
            default_socket_path()  # fail now, before daemonizing
    except StartupError as e:
        print(f"exportd: {e}", file=sys.stderr)
        return 1
    try:
        configure(opts.log_level, opts.log_file, opts.syslog)
    except OSError as e:
        print(f"exportd: cannot open log file: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    notify: Callable[[int], None] = lambda status: None  # noqa: E731
    if opts.daemonize:
        notify = daemonize()
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            status = runner.run(run(opts, notify))
    except BaseException:
        notify(1)
        raise
    notify(status)
    return status
