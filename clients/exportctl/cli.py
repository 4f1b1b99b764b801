"""exportctl: the exportd command-line client.

    exportctl [-s SOCKET] [--json] COMMAND ... (the global options may also follow COMMAND)

Human output by default, --json for scripts. Exit status: 0 success,
1 the daemon answered with an error (printed as `error: <desc>`), 2 usage
error, 3 the daemon could not be reached or the connection broke.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from exportctl.client import Client, ConnectError, QMPError
from exportctl.jobs import JOB_HEADER, JobVanished, job_rows, merge_jobs, wait_job

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONNECT = 0, 1, 2, 3


class UsageError(Exception):
    pass


def default_socket() -> str:
    env = os.environ.get("EXPORTD_SOCKET")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "exportd.sock")
    return "/run/exportd.sock"


def parse_size(text: str) -> int:
    """512, 64K, 1.5G, 10GiB, 1T (binary units)."""
    from exportd.qapi.keyval import parse_size as qemu_size

    t = text.strip()
    for tail in ("iB", "ib", "B") if len(t) > 1 and not t[-2].isdigit() else ():
        if t.endswith(tail):
            t = t[: -len(tail)]
            break
    value = qemu_size(t)
    if value is None:
        raise UsageError(f"invalid size '{text}' (use a number with an optional K, M, G, T suffix)")
    return value


def human_size(n: int | None) -> str:
    if n is None or n < 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024  # type: ignore[assignment]
    return str(n)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


# --- arguments from the command line ---------------------------------------------------------
def keyval_arguments(command: str, words: Sequence[str]) -> dict[str, Any]:
    """`key=value ...` (dotted keys nest, `key:=JSON` is a typed value) or one '{json}'."""
    from exportd.qapi.keyval import KeyvalError, coerce, parse, parse_option
    from exportd.qapi.schema import schema

    if len(words) == 1 and words[0].lstrip().startswith("{"):
        try:
            return parse_option(words[0])[0]
        except KeyvalError as e:
            raise UsageError(str(e)) from None
    args: dict[str, Any] = {}
    typed: list[tuple[list[str], Any]] = []
    for word in words:
        key, sep, raw = word.partition(":=")
        if sep and "=" not in key:
            try:
                typed.append((key.split("."), json.loads(raw)))
            except ValueError as e:
                raise UsageError(f"invalid JSON for '{key}': {e}") from None
            continue
        try:
            _merge(args, parse(word.replace(",", ",,")))
        except KeyvalError as e:
            raise UsageError(str(e)) from None
    args = coerce(schema(), command, args)
    for path, value in typed:
        cur = args
        for part in path[:-1]:
            cur = cur.setdefault(part, {})
        cur[path[-1]] = value
    return args


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def blockdev_arguments(words: Sequence[str]) -> dict[str, Any]:
    from exportd.qapi.keyval import KeyvalError, coerce, parse_option
    from exportd.qapi.schema import schema

    if len(words) == 1:
        try:
            args, is_keyval = parse_option(words[0])
        except KeyvalError as e:
            raise UsageError(str(e)) from None
        args = coerce(schema(), "blockdev-add", args) if is_keyval else args
    else:
        args = keyval_arguments("blockdev-add", words)
    return absolute_filenames(args)


def absolute_filenames(value: Any) -> Any:
    """Every `filename` member resolved in this directory: the daemon's own
    directory is another (/ once daemonized), as `create` and `add` do."""
    if isinstance(value, dict):
        return {k: (os.path.abspath(v) if k == "filename" and isinstance(v, str) and v else absolute_filenames(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [absolute_filenames(v) for v in value]
    return value


# --- output -------------------------------------------------------------------------------
class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def error(self, cls: str, desc: str, human: str, status: int) -> int:
        """An error: QMP's shape on stdout with --json, a line on stderr else."""
        if self.as_json:
            print(json.dumps({"error": {"class": cls, "desc": desc}}))
        else:
            print(human, file=sys.stderr)
        return status

    def result(self, value: Any, human: str | None = None) -> None:
        if self.as_json:
            print(json.dumps(value, indent=None))
        elif human is not None:
            print(human)
        elif value not in (None, {}):
            print(json.dumps(value, indent=2))


def format_event(ev: dict[str, Any]) -> str:
    ts = ev.get("timestamp", {})
    try:
        when = datetime.datetime.fromtimestamp(
            ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
        ).strftime("%H:%M:%S.%f")[:-3]
    except (TypeError, ValueError, OverflowError):
        when = "?"
    data = ev.get("data")
    return f"{when} {ev.get('event')}" + (f" {json.dumps(data)}" if data else "")


# --- commands -----------------------------------------------------------------------------
async def cmd_version(c: Client, a: argparse.Namespace, out: Output) -> int:
    v = await c.execute("query-version")
    q = v.get("qemu", {})
    out.result(v, f"{v.get('package')} (QMP of QEMU {q.get('major')}.{q.get('minor')}.{q.get('micro')})")
    return EXIT_OK


async def cmd_list(c: Client, a: argparse.Namespace, out: Output) -> int:
    exports = await c.execute("query-block-exports")
    if out.as_json:
        out.result(exports)
        return EXIT_OK
    if not exports:
        print("no exports")
        return EXIT_OK
    extra = [k for k in ("mountpoint", "writable", "passthrough") if any(k in e for e in exports)]
    header = ["ID", "TYPE", "NODE", *[k.upper() for k in extra], "STATE"]
    rows = []
    for e in exports:
        cells = [e.get("id", ""), e.get("type", ""), e.get("node-name", "")]
        for k in extra:
            v = e.get(k, "")
            cells.append(("yes" if v else "no") if isinstance(v, bool) else str(v))
        cells.append("shutting down" if e.get("shutting-down") else "active")
        rows.append(cells)
    print(table(rows, header))
    return EXIT_OK


async def cmd_nodes(c: Client, a: argparse.Namespace, out: Output) -> int:
    nodes = await c.execute("query-named-block-nodes", {"flat": True})
    if out.as_json:
        out.result(nodes)
        return EXIT_OK
    if not nodes:
        print("no block nodes")
        return EXIT_OK
    rows = []
    for n in nodes:
        image = n.get("image", {}) or {}
        rows.append([
            n.get("node-name", ""), n.get("drv", ""), "ro" if n.get("ro") else "rw",
            human_size(image.get("virtual-size")), n.get("file", ""),
        ])
    print(table(rows, ["NODE", "DRIVER", "MODE", "SIZE", "FILE"]))
    return EXIT_OK


async def cmd_add(c: Client, a: argparse.Namespace, out: Output) -> int:
    args: dict[str, Any] = {
        "type": "fuse", "id": a.id or a.node, "node-name": a.node,
        "mountpoint": os.path.abspath(a.mountpoint),
    }
    for flag in ("writable", "growable", "writethrough"):
        if getattr(a, flag):
            args[flag] = True
    if a.allow_other:
        args["allow-other"] = a.allow_other
    if a.passthrough:
        args["passthrough"] = a.passthrough
    result = await c.execute("block-export-add", args)
    out.result(result, f"exported {a.node} at {args['mountpoint']} (id {args['id']})")
    return EXIT_OK


async def cmd_del(c: Client, a: argparse.Namespace, out: Output) -> int:
    args = {"id": a.id, "mode": "hard" if a.hard else "safe"}
    result = await c.execute("block-export-del", args)
    if a.no_wait:
        out.result(result, f"removal of export {a.id} requested")
        return EXIT_OK
    # the id is free only once BLOCK_EXPORT_DELETED arrives
    deleted = await _wait_deleted(c, a.id, a.timeout)
    if deleted:
        out.result(result, f"export {a.id} deleted")
    else:
        out.result(result, f"removal of export {a.id} requested; it is still shutting down")
    return EXIT_OK


async def _wait_deleted(c: Client, export_id: str, timeout: float) -> bool:
    async def wait() -> bool:
        async for ev in c.events():
            if ev.get("event") == "BLOCK_EXPORT_DELETED" and ev.get("data", {}).get("id") == export_id:
                return True
        return False

    async def gone() -> bool:
        # the event may have come before we listened: ask the table too
        while True:
            exports = await c.execute("query-block-exports")
            if all(e.get("id") != export_id for e in exports):
                return True
            await asyncio.sleep(0.1)

    tasks = [asyncio.ensure_future(wait()), asyncio.ensure_future(gone())]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return any(t.result() for t in done if not t.exception())
    finally:
        for t in tasks:
            t.cancel()


async def cmd_blockdev_add(c: Client, a: argparse.Namespace, out: Output) -> int:
    args = blockdev_arguments(a.options)
    result = await c.execute("blockdev-add", args)
    name = args.get("node-name", "(auto-named)")
    out.result(result, f"added node {name}")
    return EXIT_OK


async def cmd_blockdev_del(c: Client, a: argparse.Namespace, out: Output) -> int:
    result = await c.execute("blockdev-del", {"node-name": a.node})
    out.result(result, f"deleted node {a.node}")
    return EXIT_OK


async def cmd_resize(c: Client, a: argparse.Namespace, out: Output) -> int:
    size = parse_size(a.size)
    result = await c.execute("block_resize", {"node-name": a.node, "size": size})
    out.result(result, f"resized node {a.node} to {human_size(size)}")
    return EXIT_OK


async def cmd_snapshot(c: Client, a: argparse.Namespace, out: Output) -> int:
    overlay_file = os.path.abspath(a.overlay_file)
    name = a.name or os.path.splitext(os.path.basename(overlay_file))[0]
    args = {"node-name": a.node, "snapshot-file": overlay_file, "snapshot-node-name": name,
            "format": a.format, "mode": "existing" if a.existing else "absolute-paths"}
    result = await c.execute("blockdev-snapshot-sync", args)
    out.result(result, f"node {a.node} now under overlay {name} ({overlay_file})")
    return EXIT_OK


# --- block jobs ---------------------------------------------------------------------------------
def parse_speed(text: str) -> int:
    """A rate in bytes per second: 1M, 512K/s, 0 (unlimited)."""
    return parse_size(text[:-2] if text.lower().endswith("/s") else text)


def _job_options(a: argparse.Namespace, args: dict[str, Any]) -> dict[str, Any]:
    """job-id (default: the node's name, as QEMU does for a device) and speed."""
    args["job-id"] = a.job_id or a.node
    if a.speed is not None:
        args["speed"] = parse_speed(a.speed)
    return args


async def _start_job(c: Client, a: argparse.Namespace, out: Output, command: str,
                     args: dict[str, Any], kind: str) -> int:
    job_id = args["job-id"]
    await c.execute(command, args)
    if not (a.wait or getattr(a, "complete", False)):  # --complete implies --wait
        out.result({"job-id": job_id}, f"started {kind} job {job_id}")
        return EXIT_OK
    try:
        outcome = await wait_job(c, job_id, complete=getattr(a, "complete", False),
                                 progress=not out.as_json and sys.stdout.isatty())
    except JobVanished as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if not outcome.ok:
        print(f"error: {outcome.error}", file=sys.stderr)
        return EXIT_ERROR
    if outcome.status == "ready":
        human = f"job {job_id} is ready (finish it with: exportctl job complete {job_id})"
    else:
        human = f"{kind} job {job_id} completed"
    out.result(outcome.as_dict(), human)
    return EXIT_OK


async def cmd_stream(c: Client, a: argparse.Namespace, out: Output) -> int:
    args = _job_options(a, {"device": a.node})
    if a.base_node:
        args["base-node"] = a.base_node
    if a.backing_file:
        args["backing-file"] = a.backing_file
    return await _start_job(c, a, out, "block-stream", args, "stream")


async def cmd_commit(c: Client, a: argparse.Namespace, out: Output) -> int:
    args = _job_options(a, {"device": a.node})
    for key, value in (("top-node", a.top_node), ("base-node", a.base_node),
                       ("backing-file", a.backing_file)):
        if value:
            args[key] = value
    return await _start_job(c, a, out, "block-commit", args, "commit")


async def cmd_mirror(c: Client, a: argparse.Namespace, out: Output) -> int:
    if (a.target is None) == (a.target_file is None):
        raise UsageError("mirror needs either TARGET (a node) or --target-file FILE")
    if a.target is not None and (a.format or a.existing):
        raise UsageError("--format and --existing go with --target-file")
    args = _job_options(a, {"device": a.node, "sync": a.sync})
    for key, value in (("granularity", a.granularity), ("buf-size", a.buf_size)):
        if value is not None:
            args[key] = parse_size(value)
    if a.copy_mode:
        args["copy-mode"] = a.copy_mode
    if a.target is not None:
        args["target"] = a.target
        return await _start_job(c, a, out, "blockdev-mirror", args, "mirror")
    # drive-mirror creates the file (with the source's format unless told),
    # and opens it as a new node: one step instead of create + blockdev-add
    args["target"] = os.path.abspath(a.target_file)
    args["mode"] = "existing" if a.existing else "absolute-paths"
    if a.format:
        args["format"] = a.format
    return await _start_job(c, a, out, "drive-mirror", args, "mirror")


async def cmd_jobs(c: Client, a: argparse.Namespace, out: Output) -> int:
    jobs, block_jobs = await asyncio.gather(c.execute("query-jobs"), c.execute("query-block-jobs"))
    if out.as_json:
        out.result({"jobs": jobs, "block-jobs": block_jobs})
        return EXIT_OK
    merged = merge_jobs(jobs, block_jobs)
    if not merged:
        print("no jobs")
        return EXIT_OK
    print(table(job_rows(merged, human_size), JOB_HEADER))
    return EXIT_OK


JOB_VERBS = ("cancel", "complete", "pause", "resume", "dismiss", "finalize")


async def cmd_job(c: Client, a: argparse.Namespace, out: Output) -> int:
    if a.force and a.verb != "cancel":
        raise UsageError("--force goes with cancel only")
    if a.verb == "cancel" and await _is_block_job(c, a.id):
        # QEMU's job-cancel always forces; block-job-cancel without force
        # lets a READY mirror or active commit end with a consistent copy
        # (no pivot) and refuses a paused job.
        command, args = "block-job-cancel", {"device": a.id, "force": a.force}
    else:
        command, args = f"job-{a.verb}", {"id": a.id}
    result = await c.execute(command, args)
    done = {"cancel": "cancel of", "complete": "completion of", "pause": "pause of",
            "resume": "resumption of", "dismiss": "dismissal of", "finalize": "finalization of"}
    out.result(result, f"{done[a.verb]} job {a.id} requested")
    return EXIT_OK


async def _is_block_job(c: Client, job_id: str) -> bool:
    return any(j.get("device") == job_id for j in await c.execute("query-block-jobs"))


BITMAP_VERBS = ("list", "add", "remove", "clear", "enable", "disable", "merge")


async def cmd_bitmap(c: Client, a: argparse.Namespace, out: Output) -> int:
    if a.verb == "list":
        return await _list_bitmaps(c, a, out)
    if a.node is None or a.name is None:
        raise UsageError(f"bitmap {a.verb} needs NODE and NAME")
    if a.sources and a.verb != "merge":
        raise UsageError(f"bitmap {a.verb} takes no SOURCE")
    if (a.granularity or a.persistent or a.disabled) and a.verb != "add":
        raise UsageError("--granularity, --persistent and --disabled go with add only")
    args: dict[str, Any] = {"node": a.node, "name": a.name}
    if a.verb == "add":
        if a.granularity:
            args["granularity"] = parse_size(a.granularity)
        if a.persistent:
            args["persistent"] = True
        if a.disabled:
            args["disabled"] = True
    elif a.verb == "merge":
        if not a.sources:
            raise UsageError("bitmap merge needs at least one SOURCE")
        args = {"node": a.node, "target": a.name, "bitmaps": [
            {"node": src.split(":", 1)[0], "name": src.split(":", 1)[1]} if ":" in src else src
            for src in a.sources]}
    result = await c.execute(f"block-dirty-bitmap-{a.verb}", args)
    done = {"add": "added", "remove": "removed", "clear": "cleared", "enable": "enabled", "disable": "disabled",
            "merge": "merged into"}
    out.result(result, f"{done[a.verb]} bitmap {a.name} on {a.node}")
    return EXIT_OK


async def _list_bitmaps(c: Client, a: argparse.Namespace, out: Output) -> int:
    nodes = await c.execute("query-named-block-nodes", {"flat": True})
    if a.node is not None and not any(n.get("node-name") == a.node for n in nodes):
        raise QMPError("GenericError", f"Cannot find device='{a.node}' nor node-name='{a.node}'")
    found = [{"node": n["node-name"], **bm} for n in nodes
             if a.node in (None, n.get("node-name")) for bm in n.get("dirty-bitmaps", [])]
    if out.as_json:
        out.result(found)
        return EXIT_OK
    if not found:
        print("no dirty bitmaps")
        return EXIT_OK
    rows = [[b["node"], b.get("name", ""), human_size(b["granularity"]), human_size(b["count"]),
             "recording" if b["recording"] else "disabled",
             ",".join(f for f in ("persistent", "busy", "inconsistent") if b.get(f)) or "-"] for b in found]
    print(table(rows, ["NODE", "BITMAP", "GRANULARITY", "DIRTY", "STATE", "FLAGS"]))
    return EXIT_OK


async def cmd_events(c: Client, a: argparse.Namespace, out: Output) -> int:
    async def follow() -> int:
        count = 0
        async for ev in c.events():
            print(json.dumps(ev) if out.as_json else format_event(ev), flush=True)
            count += 1
            if not a.follow and count >= a.count:
                return EXIT_OK
        return EXIT_OK

    try:
        return await asyncio.wait_for(follow(), a.timeout)
    except TimeoutError:
        return EXIT_OK  # no (more) events in time: not an error of the daemon


async def cmd_quit(c: Client, a: argparse.Namespace, out: Output) -> int:
    result = await c.execute("quit")
    out.result(result, "exportd is shutting down")
    return EXIT_OK


async def cmd_qmp(c: Client, a: argparse.Namespace, out: Output) -> int:
    words = list(a.words)
    if words[0].lstrip().startswith("{"):
        if len(words) != 1:
            raise UsageError("give either one JSON object or CMD [key=value ...]")
        try:
            msg = json.loads(words[0])
        except ValueError as e:
            raise UsageError(f"invalid JSON: {e}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
            raise UsageError('the JSON form is {"execute": CMD, "arguments": {...}}')
        command, args = msg["execute"], msg.get("arguments") or {}
    else:
        command, args = words[0], keyval_arguments(words[0], words[1:])
    result = await c.execute(command, args)
    if out.as_json:
        out.result(result)
    else:
        print(json.dumps(result, indent=2))
    return EXIT_OK


def cmd_create(a: argparse.Namespace, out: Output) -> int:
    try:
        from exportd.block.mkimage import create_image
    except ModuleNotFoundError as e:
        if e.name not in ("exportd.block.mkimage", "exportd.block"):
            raise
        print("error: image creation is not available in this build (exportd.block.mkimage is missing)",
              file=sys.stderr)
        return EXIT_ERROR
    cluster = parse_size(a.cluster_size) if a.cluster_size else None
    if a.backing_format and not a.backing:
        raise UsageError("--backing-format needs --backing")
    if a.format is None:
        a.format = format_from_name(a.file, a.backing)
    if a.size is not None:
        size = parse_size(a.size)
    elif a.backing:
        size = backing_size(a.file, a.backing)
    else:
        raise UsageError("give a SIZE (or --backing: the size is then the backing image's)")
    try:
        result = create_image(a.file, size, a.format, cluster, a.backing, a.backing_format, a.preallocation)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    except (OSError, ValueError, QMPError) as e:
        print(f"error: {_error_text(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:
        desc = getattr(e, "desc", None)
        if desc is None:
            raise
        print(f"error: {desc}", file=sys.stderr)
        return EXIT_ERROR
    info = {"filename": a.file, "format": a.format, "size": size}
    out.result(info, f"created {a.file} ({a.format}, {human_size(size)})")
    return EXIT_OK


RAW_SUFFIXES = ("", ".raw", ".img", ".bin", ".iso")


def format_from_name(file: str, backing: str | None) -> str:
    """qcow2 for a .qcow2 name or an image with a backing file; raw for a
    plain name (.raw, .img, none...); any other (d.vmdk) must say --format."""
    suffix = os.path.splitext(file)[1].lower()
    if suffix == ".qcow2" or (backing and suffix in RAW_SUFFIXES):
        return "qcow2"  # only qcow2 has a backing file
    if suffix in RAW_SUFFIXES:
        return "raw"
    raise UsageError(f"cannot tell the format of '{file}' from its name: give --format raw or --format qcow2")


def backing_size(file: str, backing: str) -> int:
    """The virtual size of the backing image (its path relative to FILE's
    directory, as qemu-img resolves it): a qcow2 header's, or a raw file's."""
    path = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(os.path.abspath(file)), backing)
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if head[:4] == b"QFI\xfb":
                return int.from_bytes(head[24:32], "big")
            return os.fstat(f.fileno()).st_size
    except OSError as e:
        raise UsageError(f"cannot read the backing image {path}: {e.strerror}") from None


def _error_text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return getattr(e, "desc", None) or str(e)


COMMANDS = {
    "version": cmd_version, "list": cmd_list, "nodes": cmd_nodes, "add": cmd_add, "del": cmd_del,
    "blockdev-add": cmd_blockdev_add, "blockdev-del": cmd_blockdev_del, "resize": cmd_resize,
    "snapshot": cmd_snapshot, "events": cmd_events,
    "stream": cmd_stream, "commit": cmd_commit, "mirror": cmd_mirror, "jobs": cmd_jobs, "job": cmd_job,
    "quit": cmd_quit, "qmp": cmd_qmp, "bitmap": cmd_bitmap,
}


def _global_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes, before or after the command's name
    (`exportctl --json list` and `exportctl list --json`). Subcommands get
    them without defaults, so that one given first is not overwritten."""
    def d(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    p.add_argument("-s", "--socket", default=d(None),
                   help="the daemon's QMP socket (default: $EXPORTD_SOCKET, "
                        "$XDG_RUNTIME_DIR/exportd.sock, or /run/exportd.sock)")
    p.add_argument("--json", action="store_true", default=d(False),
                   help="machine-readable output; errors as {\"error\": {\"class\", \"desc\"}}")
    p.add_argument("--connect-timeout", type=float, default=d(30.0), metavar="SECONDS",
                   help="how long to wait for the daemon's socket (default 30)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exportctl", description="Control an exportd daemon over QMP.")
    _global_options(p, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    command("version", "the daemon's version")
    command("list", "exports, as a table")
    command("nodes", "block nodes, as a table")
    s = command("add", "export a block node through FUSE")
    s.add_argument("node", help="the node-name to export")
    s.add_argument("mountpoint", help="a regular file to mount the export over")
    s.add_argument("--id", help="export id (default: the node name)")
    s.add_argument("--writable", action="store_true", help="allow writes (default: read-only)")
    s.add_argument("--growable", action="store_true", help="writes past the end grow the node")
    s.add_argument("--writethrough", action="store_true", help="every write is flushed before it completes")
    s.add_argument("--allow-other", choices=("on", "off", "auto"),
                   help="let other users open the file (auto: if /etc/fuse.conf allows it)")
    s.add_argument("--passthrough", choices=("on", "off", "auto"),
                   help="let the kernel serve reads and writes of a raw file itself (default auto)")
    s = command("del", "remove an export")
    s.add_argument("id", help="the export's id")
    s.add_argument("--hard", action="store_true", help="remove even while in use")
    s.add_argument("--no-wait", action="store_true", help="do not wait for BLOCK_EXPORT_DELETED")
    s.add_argument("--timeout", type=float, default=30.0, help="how long to wait for the deletion")
    s = command("blockdev-add", "add a block node (keyval, key=value words, or JSON)")
    s.add_argument("options", nargs="+", metavar="OPTIONS",
                   help="driver=qcow2,node-name=d,file.driver=file,file.filename=d.qcow2 (relative file "
                        "names are resolved here), or JSON")
    s = command("blockdev-del", "delete a block node")
    s.add_argument("node", help="the node-name")
    s = command("resize", "grow or shrink a block node (block_resize)")
    s.add_argument("node", help="the node-name")
    s.add_argument("size", help="the new size: 512, 64K, 10G, 1.5GiB ...")
    s = command("snapshot", "put a new overlay image on top of a node (blockdev-snapshot-sync)")
    s.add_argument("node", help="the node to snapshot")
    s.add_argument("overlay_file", metavar="OVERLAY-FILE", help="created, backed by the node's file")
    s.add_argument("--name", help="the overlay's node-name (default: the file name without extension)")
    s.add_argument("--format", default="qcow2", help="the overlay's format (default qcow2)")
    s.add_argument("--existing", action="store_true", help="use OVERLAY-FILE as it is (mode existing)")
    s = command("stream", "copy a node's backing chain into it (block-stream)")
    s.add_argument("node", help="the node that receives the data")
    s.add_argument("--base-node", help="stop at this backing node (default: the whole chain)")
    s.add_argument("--backing-file", help="the backing file name written into NODE's image")
    _job_arguments(s, completes=False)
    s = command("commit", "merge layers of a chain into a lower one (block-commit)")
    s.add_argument("node", help="the chain's active (top) node")
    s.add_argument("--top-node", help="the top layer to commit (default: NODE, an active commit)")
    s.add_argument("--base-node", help="the layer to commit into (default: the bottom of the chain)")
    s.add_argument("--backing-file", help="the backing file name written into the layer above")
    _job_arguments(s, completes=True)
    s = command("mirror", "copy a node to a target and keep it in sync (blockdev-mirror)")
    s.add_argument("node", help="the source node")
    s.add_argument("target", nargs="?", help="the target node's name")
    s.add_argument("--target-file", help="instead of TARGET: create this image (drive-mirror)")
    s.add_argument("--format", help="with --target-file: its format (default: the source's)")
    s.add_argument("--existing", action="store_true", help="with --target-file: use the file as it is")
    s.add_argument("--sync", choices=("full", "top", "none"), default="full",
                   help="what to copy: the whole chain (default), the top layer, or new writes only")
    s.add_argument("--granularity", help="the dirty bitmap's granularity (512 to 64M, a power of 2)")
    s.add_argument("--buf-size", help="the copy buffer's size")
    s.add_argument("--copy-mode", choices=("background", "write-blocking"),
                   help="write-blocking: guest writes also go to the target before they complete")
    _job_arguments(s, completes=True)
    command("jobs", "running jobs, as a table (query-jobs + query-block-jobs)")
    s = command("job", "act on a job: cancel, complete, pause, resume, dismiss, finalize")
    s.add_argument("verb", choices=JOB_VERBS, metavar="ACTION", help=", ".join(JOB_VERBS))
    s.add_argument("id", metavar="ID", help="the job's id")
    s.add_argument("--force", action="store_true",
                   help="cancel: at once, also a paused job or a READY one (no consistent copy)")
    s = command("bitmap", "dirty bitmaps: list, add, remove, clear, enable, disable, merge")
    s.add_argument("verb", choices=BITMAP_VERBS, metavar="ACTION", help=", ".join(BITMAP_VERBS))
    s.add_argument("node", nargs="?", help="the node (list: all nodes without it)")
    s.add_argument("name", nargs="?", help="the bitmap (merge: the target)")
    s.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="merge: bitmaps to merge into NAME (NAME on NODE, or OTHER-NODE:NAME)")
    s.add_argument("--granularity", help="add: bytes per bit, a power of 2 from 512 (default: the node's cluster "
                   "size, 4K-64K)")
    s.add_argument("--persistent", action="store_true", help="add: store it in the image (qcow2)")
    s.add_argument("--disabled", action="store_true", help="add: create it not recording")
    s = command("events", "print events (the next one, or all with --follow)")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing until the daemon exits")
    s.add_argument("--count", type=int, default=1, help="without --follow: how many events to wait for")
    s.add_argument("--timeout", type=float, default=None,
                   help="stop after this many seconds (exit status 0, also when no event came)")
    command("quit", "shut the daemon down")
    s = command("qmp", "any QMP command: qmp CMD [key=value ...] or qmp '{json}'")
    s.add_argument("words", nargs="+", metavar="CMD|JSON", help="the command and its arguments")
    s = command("create", "create an image file (no daemon needed)")
    s.add_argument("file", help="the image file to create")
    s.add_argument("size", nargs="?", help="512, 64K, 10G ... (default with --backing: the backing image's)")
    s.add_argument("--format", "-f", default=None, choices=("raw", "qcow2"),
                   help="default: qcow2 with --backing or a FILE ending in .qcow2, raw for .raw/.img/no "
                        "extension; other names must say")
    s.add_argument("--cluster-size", help="qcow2: the cluster size (512 to 2M, default 64K)")
    s.add_argument("--backing", "-b", help="qcow2: the backing image (relative to FILE's directory)")
    s.add_argument("--backing-format", "-F", help="the backing image's format (raw or qcow2)")
    s.add_argument("--preallocation", default="off", choices=("off", "metadata", "falloc", "full"),
                   help="what to allocate now (default off)")
    return p


def _job_arguments(s: argparse.ArgumentParser, completes: bool) -> None:
    s.add_argument("--job-id", help="the job's id (default: the node's name)")
    s.add_argument("--speed", help="a rate limit in bytes per second: 10M, 512K/s (default: none)")
    s.add_argument("--wait", action="store_true",
                   help="follow the job until it ends; exit status 1 with its error if it fails")
    if completes:
        s.add_argument("--complete", action="store_true",
                       help="wait, and complete the job once it is READY (pivot to the new node)")


async def _run(a: argparse.Namespace, out: Output) -> int:
    path = a.socket or default_socket()
    async with Client() as c:
        await c.connect(path, timeout=a.connect_timeout)
        return await COMMANDS[a.command](c, a, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    out = Output(a.json)
    try:
        if a.command == "create":
            return cmd_create(a, out)
        return asyncio.run(_run(a, out))
    except UsageError as e:
        return out.error("UsageError", str(e), f"exportctl: {e}", EXIT_USAGE)
    except QMPError as e:
        return out.error(e.cls, e.desc, f"error: {e.desc}", EXIT_ERROR)
    except ConnectError as e:
        return out.error("ConnectError", str(e), f"exportctl: {e}", EXIT_CONNECT)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader (e.g. `| head`) went away: not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
