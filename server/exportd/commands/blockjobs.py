"""QMP commands of the block jobs: block-stream, block-commit,
blockdev-mirror, drive-mirror, query-block-jobs, the block-job-* verbs and
job-complete / job-pause / job-resume (the job machinery is exportd.jobs,
the jobs exportd.block.jobs). Checks and texts follow QEMU's blockdev.c:
arguments and nodes first, then the job id, then the graph changes, so a
refused command changes nothing."""

from __future__ import annotations

from typing import Any

from exportd.block.chain import backing_chain, chain_contains, overlay_of
from exportd.block.graph import can_replace, check_not_busy
from exportd.block.jobs.base import BlockJob, block_job, check_speed
from exportd.block.jobs.commit import CommitJob
from exportd.block.jobs.mirror import ActiveCommitJob, MirrorJob, check_granularity
from exportd.block.jobs.stream import StreamJob
from exportd.block.node import BlockNode
from exportd.commands import command
from exportd.errors import BlockError, DeviceNotFound
from exportd.jobs import registry_of


def _node(daemon: Any, name: str, *, as_device: bool = False) -> BlockNode:
    """A node by name, with QEMU's bdrv_lookup_bs text (device= or node-name=)."""
    node = daemon.graph.find(name)
    if node is None:
        raise BlockError(f"Cannot find device='{name if as_device else ''}' nor node-name='{name}'")
    return node


def _by_filename(top: BlockNode, filename: str) -> BlockNode | None:
    """A backing image of `top` by its file name (QEMU's bdrv_find_backing_image)."""
    for node in backing_chain(top)[1:]:
        if node.filename() == filename:
            return node
    return None


def _job_id(daemon: Any, args: dict[str, Any]) -> str:
    # a node has no device name for QEMU to default to: its id is then ''
    job_id = args.get("job-id", "")
    registry_of(daemon).check_new_id(job_id)
    return job_id


def _job_options(args: dict[str, Any]) -> dict[str, Any]:
    return {"auto_finalize": args.get("auto-finalize", True), "auto_dismiss": args.get("auto-dismiss", True)}


async def _start(job: BlockJob, setup: Any, speed: int) -> None:
    """Register the job (announced as created), check its speed as QEMU
    does then, let it change the graph and start its work; a refused
    command leaves no job behind."""
    registry_of(job.daemon).add(job)
    try:
        check_speed(speed)
        job.speed = job.rate.speed = speed
        await setup
    except BaseException:
        setup.close()
        registry_of(job.daemon)._forget(job)
        raise
    job.start()


def _root_node(daemon: Any, name: str) -> BlockNode:
    """QEMU's qmp_get_root_bs: a node whose only parents are exports or
    a job's writers (BlockBackends), not nodes nor a job's own hold."""
    node = _node(daemon, name, as_device=True)
    if any(isinstance(e.parent, BlockNode) or isinstance(getattr(e.parent, "op_blocker", None), str)
           for e in node.users):
        raise BlockError("Need a root block node")
    return node


# --- block-stream ----------------------------------------------------------------------
@command("block-stream")
async def block_stream(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    base_name, base_node_name, bottom_name = args.get("base"), args.get("base-node"), args.get("bottom")
    if base_name is not None and base_node_name is not None:
        raise BlockError("'base' and 'base-node' cannot be specified at the same time")
    if base_name is not None and bottom_name is not None:
        raise BlockError("'base' and 'bottom' cannot be specified at the same time")
    if bottom_name is not None and base_node_name is not None:
        raise BlockError("'bottom' and 'base-node' cannot be specified at the same time")
    device = args["device"]
    top = _node(daemon, device, as_device=True)
    base: BlockNode | None = None
    if base_name is not None:
        base = _by_filename(top, base_name)
        if base is None:
            raise BlockError(f"Can't find '{base_name}' in the backing chain")
    if base_node_name is not None:
        base = _node(daemon, base_node_name)
        if base is top or not chain_contains(top, base):
            raise BlockError(f"Node '{base_node_name}' is not a backing image of '{device}'")
    if bottom_name is not None:
        bottom = _node(daemon, bottom_name)
        if not chain_contains(top, bottom):
            raise BlockError(f"Node '{bottom_name}' is not in a chain starting from '{device}'")
        base = bottom.child("backing")
    for node in backing_chain(top, base):
        check_not_busy(node, backing=False)
    backing_file = args.get("backing-file")
    # QEMU looks at base / base-node only: with `bottom` a backing file is refused too
    if (base is None or bottom_name is not None) and backing_file is not None:
        raise BlockError("backing file specified, but streaming the entire chain")
    opts = _job_options(args)
    job = StreamJob(daemon, _job_id(daemon, args), top, base, backing_file, on_error=args.get("on-error", "report"),
                    **opts)
    await _start(job, job.setup(args.get("filter-node-name")), args.get("speed", 0))
    return {}


# --- block-commit ----------------------------------------------------------------------
@command("block-commit")
async def block_commit(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    device = args["device"]
    if daemon.graph.find(device) is None:
        raise DeviceNotFound(f"Device '{device}' not found")
    active = _root_node(daemon, device)
    check_not_busy(active, backing=False)
    top = active
    if args.get("top-node") is not None and args.get("top") is not None:
        raise BlockError("'top-node' and 'top' are mutually exclusive")
    if args.get("top-node") is not None:
        top = _node(daemon, args["top-node"])
        if not chain_contains(active, top):
            raise BlockError(f"'{args['top-node']}' is not in this backing file chain")
    elif args.get("top") is not None:
        found = active if active.filename() == args["top"] else _by_filename(active, args["top"])
        if found is None:
            raise BlockError(f"Top image file {args['top']} not found")
        top = found
    if args.get("base-node") is not None and args.get("base") is not None:
        raise BlockError("'base-node' and 'base' are mutually exclusive")
    base: BlockNode | None
    if args.get("base-node") is not None:
        base = _node(daemon, args["base-node"])
        if not chain_contains(top, base):
            raise BlockError(f"'{args['base-node']}' is not in this backing file chain")
    elif args.get("base") is not None:
        base = _by_filename(top, args["base"])
        if base is None:
            raise BlockError(f"Can't find '{args['base']}' in the backing chain")
    else:
        base = backing_chain(top)[-1]
    for node in backing_chain(top, base):
        check_not_busy(node, backing=False)
    if base is top:
        raise BlockError("cannot commit an image into itself")
    opts = _job_options(args)
    backing_file = args.get("backing-file")
    if top is active:
        if backing_file is not None:
            raise BlockError("'backing-file' specified, but 'top' is the active layer")
        job: BlockJob = ActiveCommitJob(daemon, _job_id(daemon, args), active, base, base=base,
                                        on_source_error=args.get("on-error", "report"),
                                        on_target_error=args.get("on-error", "report"), **opts)
        await _start(job, job.setup(args.get("filter-node-name"), "commit_top"), args.get("speed", 0))  # type: ignore[attr-defined]
        return {}
    overlay = overlay_of(active, top)
    job = CommitJob(daemon, _job_id(daemon, args), top, base, overlay, backing_file,
                    on_error=args.get("on-error", "report"), **opts)
    await _start(job, job.setup(), args.get("speed", 0))  # type: ignore[attr-defined]
    return {}


# --- mirror ------------------------------------------------------------------------------
def _check_sync(args: dict[str, Any]) -> None:
    sync = args["sync"]
    if sync in ("incremental", "bitmap"):
        raise BlockError(f"Sync mode '{sync}' not supported")


def _check_buf_size(args: dict[str, Any]) -> None:
    if args.get("buf-size", 0) < 0:
        raise BlockError("Invalid parameter 'buf-size'")


def _replaces_node(daemon: Any, args: dict[str, Any], source: BlockNode) -> BlockNode | None:
    """The node `replaces` names, checked as QEMU's check_to_replace_node
    and blockdev_mirror_common do, in their order."""
    name = args.get("replaces")
    if name is None:
        return None
    node = daemon.graph.find(name)
    if node is None:
        raise BlockError(f"Failed to find node with node-name='{name}'")
    check_not_busy(node)
    if not can_replace(source, node):
        raise BlockError(f"Cannot replace '{name}' by a node mirrored from '{source.node_name}', because it cannot "
                         "be guaranteed that doing so would not lead to an abrupt change of visible data")
    if node.getlength() != source.getlength():
        raise BlockError("cannot replace image with a mirror image of different size")
    return node


def _mirror_kwargs(args: dict[str, Any], replaces: BlockNode | None) -> dict[str, Any]:
    return {"sync": args["sync"], "granularity": args.get("granularity", 0),
            "buf_size": args.get("buf-size", 0) or 16 << 20, "copy_mode": args.get("copy-mode", "background"),
            "replaces": replaces, "on_source_error": args.get("on-source-error", "report"),
            "on_target_error": args.get("on-target-error", "report"), **_job_options(args)}


@command("blockdev-mirror")
async def blockdev_mirror(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    # QEMU's order: qmp_blockdev_mirror, blockdev_mirror_common, mirror_start(_job)
    source = _root_node(daemon, args["device"])
    target = _node(daemon, args["target"], as_device=True)
    check_granularity(args.get("granularity", 0))
    check_not_busy(source)
    check_not_busy(target)
    replaces = _replaces_node(daemon, args, source)
    _check_sync(args)
    _check_buf_size(args)
    if target is source:
        raise BlockError("Can't mirror node into itself")
    job = MirrorJob(daemon, _job_id(daemon, args), source, target, **_mirror_kwargs(args, replaces))
    await _start(job, job.setup(args.get("filter-node-name")), args.get("speed", 0))
    return {}


@command("drive-mirror")
async def drive_mirror(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    from exportd.aio.threads import in_own_thread
    from exportd.block.mkimage import create_image

    graph = daemon.graph
    source = _root_node(daemon, args["device"])
    check_granularity(args.get("granularity", 0))
    _check_sync(args)
    _check_buf_size(args)
    check_not_busy(source)
    if args.get("replaces") is not None and args.get("node-name") is None:
        raise BlockError("a node-name must be provided when replacing a named node of the graph")
    sync, mode = args["sync"], args.get("mode", "absolute-paths")
    fmt = args.get("format") or (source.driver if mode != "existing" else None)
    backing = {"full": None, "top": source.child("backing"), "none": source}[sync]
    job_id = _job_id(daemon, args)
    if args.get("node-name") is not None and args["node-name"] in graph:
        raise BlockError(f"Duplicate nodes with node-name='{args['node-name']}'")
    if mode != "existing":
        await in_own_thread(create_image, args["target"], source.getlength(), "raw" if fmt == "file" else fmt,
                            backing=backing.filename() if backing is not None else None,
                            backing_fmt=backing.driver if backing is not None else None)
    if fmt is None:
        from exportd.block.probe import probe_format

        fmt = await in_own_thread(probe_format, args["target"])
    options: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": args["target"]}}
    if fmt == "file":
        options = {"driver": "file", "filename": args["target"]}
    elif mode != "existing" and fmt != "raw":
        options["backing"] = None  # the backing node is set at the pivot, as QEMU
    if args.get("node-name") is not None:
        options["node-name"] = args["node-name"]
    # the target opens with the source's discard mode (QEMU: its open flags)
    options["discard"] = source.options.get("discard", "ignore")
    target = await graph._open(options)  # owned by its users: gone with the job if never pivoted
    try:
        kwargs = _mirror_kwargs(args, _replaces_node(daemon, args, source))
        job = MirrorJob(daemon, job_id, source, target,
                        target_backing=backing if mode != "existing" else None,
                        zero_target=mode == "existing", unmap=args.get("unmap", True), **kwargs)
        await _start(job, job.setup(None), args.get("speed", 0))
    except BaseException:
        if target.refcount == 0:
            await graph._destroy(target)
        raise
    return {}


# --- queries and verbs ---------------------------------------------------------------------
@command("query-block-jobs")
async def query_block_jobs(daemon: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [job.block_info() for job in reversed(list(registry_of(daemon))) if isinstance(job, BlockJob)]


@command("block-job-set-speed")
async def block_job_set_speed(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    block_job(daemon, args["device"]).set_speed(args["speed"])
    return {}


@command("block-job-cancel")
async def block_job_cancel(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    job = block_job(daemon, args["device"])
    force = args.get("force", False)
    if job.user_paused and not force:
        raise BlockError(f"The block job for device '{args['device']}' is currently paused")
    job.user_cancel(force)
    return {}


@command("block-job-pause")
async def block_job_pause(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    block_job(daemon, args["device"]).user_pause()
    return {}


@command("block-job-resume")
async def block_job_resume(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    block_job(daemon, args["device"]).user_resume()
    return {}


@command("block-job-complete")
async def block_job_complete(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    block_job(daemon, args["device"]).user_complete()
    return {}


@command("block-job-finalize")
async def block_job_finalize(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    await block_job(daemon, args["id"]).user_finalize()
    return {}


@command("block-job-dismiss")
async def block_job_dismiss(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    block_job(daemon, args["id"]).user_dismiss()
    return {}


@command("job-complete")
async def job_complete(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    registry_of(daemon).get(args["id"]).user_complete()
    return {}


@command("job-pause")
async def job_pause(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    registry_of(daemon).get(args["id"]).user_pause()
    return {}


@command("job-resume")
async def job_resume(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    registry_of(daemon).get(args["id"]).user_resume()
    return {}
