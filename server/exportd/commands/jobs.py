"""QMP commands for jobs: blockdev-create, query-jobs, job-dismiss,
job-cancel, job-finalize (the job machinery is exportd.jobs).

blockdev-create runs as QEMU runs it: the reply comes once the job is
running; the image is written in the background (file I/O in a worker
thread, or through the node's async API), and success or failure shows in
JOB_STATUS_CHANGE events and in query-jobs until job-dismiss. How a driver
creates its images is the driver's (`create_steps` on its class: file and
raw in exportd.block.file_create, qcow2 in exportd.block.qcow2.create).
"""

from __future__ import annotations

from typing import Any

from exportd.block import load_driver
from exportd.commands import command
from exportd.errors import BlockError
from exportd.jobs import registry_of


@command("blockdev-create")
async def blockdev_create(daemon: Any, args: dict[str, Any]) -> dict[str, Any]:
    opts = args["options"]
    # the driver declares how it creates images (QEMU's BlockDriver.bdrv_co_create)
    cls = await load_driver(opts["driver"])
    steps = cls.create_steps(daemon.graph, opts) if cls is not None else None
    if steps is None:
        raise BlockError(f"Driver '{opts['driver']}' does not support blockdev-create")
    prepare, work = steps
    await registry_of(daemon).start(args["job-id"], "create", prepare=prepare, work=work)
    return {}


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
    await registry_of(daemon).finalize(args["id"])
    return {}
