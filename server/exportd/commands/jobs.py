"""QMP commands for jobs: blockdev-create, query-jobs, job-dismiss,
job-cancel, job-finalize (the job machinery is exportd.jobs).

blockdev-create runs as QEMU runs it: the reply comes once the job is
running; the image is written in the background (file I/O in a worker
thread, or through the node's async API), and success or failure shows in
JOB_STATUS_CHANGE events and in query-jobs until job-dismiss.
"""

from __future__ import annotations

import os
from typing import Any

from exportd.aio.threads import in_own_thread
from exportd.block.create import Qcow2Layout, create_image, qcow2_layout
from exportd.block.node import BlockNode, NodeUser, Perm, Prealloc
from exportd.commands import command
from exportd.errors import BlockError
from exportd.jobs import Job, registry_of

# exportd.block.create words its hints for qemu-img's `-o compat=`; in
# blockdev-create the option is `version`, and QEMU's texts say so.
_HINTS = {"(use compat=1.1 or greater)": "(use version=v3 or greater)"}


def _qmp_text(e: BlockError) -> BlockError:
    desc = e.desc
    for old, new in _HINTS.items():
        desc = desc.replace(old, new)
    return e if desc == e.desc else BlockError(desc)


@command("blockdev-create")
async def blockdev_create(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    opts = args["options"]
    if opts["driver"] in ("file", "raw"):  # raw: an exportd alias of file
        prepare, work = _file_steps(opts)
    elif opts["driver"] == "qcow2":
        prepare, work = _Qcow2Create(daemon, opts).steps()
    else:
        raise BlockError(f"Driver '{opts['driver']}' does not support blockdev-create")
    await registry_of(daemon).start(args["job-id"], "create", prepare=prepare, work=work)
    return {}


def _file_steps(opts: dict[str, Any]):
    filename, size = opts["filename"], opts["size"]
    prealloc = opts.get("preallocation", "off")
    # nocow and extent-size-hint are hints; exportd does not act on them

    async def prepare(job: Job) -> None:
        if prealloc == "metadata":
            raise BlockError(f"Unsupported preallocation mode: {prealloc}")

    async def work(job: Job) -> None:
        # plain file I/O (open, lock, truncate, fill, fsync): off the loop
        await in_own_thread(create_image, filename, size, "raw", preallocation=prealloc)

    return prepare, work


class _Qcow2Create:
    """blockdev-create driver=qcow2: format the node `file` names (or opens)."""

    def __init__(self, daemon: Any, opts: dict[str, Any]) -> None:
        self.graph = daemon.graph
        self.opts = opts
        self.node: BlockNode | None = None
        self.temporary = False  # `file` was a dict: opened for this job only
        self.user: NodeUser | None = None
        self.layout: Qcow2Layout | None = None

    def steps(self):
        return self.prepare, self.work

    def _kwargs(self) -> dict[str, Any]:
        o = self.opts
        return {
            "cluster_size": o.get("cluster-size"),
            "version": o.get("version", "v3"),
            "backing_file": o.get("backing-file"),
            "backing_fmt": o.get("backing-fmt"),
            "preallocation": o.get("preallocation", "off"),
            "lazy_refcounts": o.get("lazy-refcounts", False),
            "refcount_bits": o.get("refcount-bits", 16),
            "compression_type": o.get("compression-type", "zlib"),
        }

    async def prepare(self, job: Job) -> None:
        o = self.opts
        if "data-file" in o or o.get("data-file-raw"):
            raise BlockError("External data files are not supported by exportd")
        if o.get("extended-l2"):
            raise BlockError("Extended L2 entries are not supported by exportd")
        ref = o["file"]
        # QEMU's order: open the node, check the options, then take permissions
        if isinstance(ref, str):
            self.node = self.graph.find(ref)
            if self.node is None:  # QEMU looks the name up as a device, then as a node
                raise BlockError(f"Cannot find device='{ref}' nor node-name='{ref}'")
        else:
            # a nested definition: an implicit node (#blockNNN) for this job's life
            self.node = await self.graph._open(dict(ref))
            self.temporary = True
        try:
            await self._validate()
            self.user = self.node.attach(job, Perm.WRITE | Perm.RESIZE, Perm.ALL, "root")
        except BaseException:
            await self._release()
            raise

    async def _layout(self, prealloc: str) -> Qcow2Layout:
        """Check the options and compute the image's metadata in a worker thread
        (a backing file without a format is probed: a file read; preallocated
        metadata of a large image is a large computation)."""
        assert self.node is not None
        kw = self._kwargs()
        compat = {"v2": "0.10", "v3": "1.1"}[kw["version"]]
        base = os.path.dirname(self.node.filename()) or "."
        try:
            return await in_own_thread(
                qcow2_layout, self.opts["size"], kw["cluster_size"], kw["backing_file"],
                kw["backing_fmt"], prealloc, kw["refcount_bits"], compat,
                kw["lazy_refcounts"], kw["compression_type"], base_dir=base)
        except BlockError as e:
            raise _qmp_text(e) from None

    async def _validate(self) -> None:
        """Inside the command (which holds the daemon's command lock): the quick
        checks only. Without preallocation that is the whole layout; with it, the
        layout without preallocation checks the same options (and with a backing
        file the preallocation is refused before any heavy work)."""
        prealloc = self.opts.get("preallocation", "off")
        quick = prealloc if self.opts.get("backing-file") is not None else "off"
        layout = await self._layout(quick)
        self.layout = layout if quick == prealloc else None

    async def work(self, job: Job) -> None:
        """What create_qcow2_on_node does, with the layout computed off the loop."""
        assert self.node is not None
        node = self.node
        prealloc = self.opts.get("preallocation", "off")
        mode = Prealloc(prealloc) if prealloc in ("falloc", "full") else Prealloc.OFF
        try:
            lay = self.layout or await self._layout(prealloc)
            await node.truncate(0)
            await node.truncate(lay.data_start)
            await node.truncate(lay.end, prealloc=mode)
            for off, data in lay.writes:
                await node.write(off, data)
            await node.flush()
        finally:
            self.layout = None
            await self._release()

    async def _release(self) -> None:
        node, self.node = self.node, None
        if node is None:
            return
        if self.user is not None:
            node.detach(self.user)
            self.user = None
        if self.temporary and node.refcount == 0 and not node.monitor_owned:
            await self.graph._destroy(node)


@command("query-jobs")
async def query_jobs(daemon: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
    return registry_of(daemon).query()


@command("job-dismiss")
async def job_dismiss(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    registry_of(daemon).dismiss(args["id"])
    return {}


@command("job-cancel")
async def job_cancel(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    registry_of(daemon).cancel(args["id"])
    return {}


@command("job-finalize")
async def job_finalize(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    registry_of(daemon).finalize(args["id"])
    return {}
