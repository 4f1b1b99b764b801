"""What every block job (stream, commit, mirror) shares: its hold on nodes
(edges, so permissions and replace_node apply to it as to any parent), the
rate limit, the I/O error policy, BlockJobInfo and the BLOCK_JOB_* events."""

from __future__ import annotations

import errno
import os
import time
from typing import Any

from exportd.block.node import BlockNode, Edge, Perm
from exportd.errors import QMPError
from exportd.jobs import Job, registry_of

SLICE = 0.1  # QEMU's rate limit slice (100 ms)


class RateLimit:
    """Bytes per second in 100 ms slices, as QEMU's ratelimit: work is done
    in pieces, and after each piece the job sleeps for `delay()`. A piece
    bigger than a slice's quota stretches its slice; once the stretched
    slice is over, nothing is owed any more (so delay() reaches zero)."""

    def __init__(self, speed: int) -> None:
        self.speed = speed
        self._slice_start = 0.0
        self._slice_end = 0.0
        self._dispatched = 0

    def _new_slice_if_over(self, now: float) -> None:
        if now > self._slice_end:
            self._slice_start, self._slice_end, self._dispatched = now, now + SLICE, 0

    def account(self, n: int) -> None:
        if self.speed:
            self._new_slice_if_over(time.monotonic())
            self._dispatched += n

    def delay(self) -> float:
        if not self.speed:
            return 0.0
        now = time.monotonic()
        self._new_slice_if_over(now)
        quota = self.speed * SLICE
        if self._dispatched < quota:
            return 0.0
        # the slice lasts as many slices as the work done is worth
        self._slice_end = self._slice_start + self._dispatched / quota * SLICE
        return max(0.0, self._slice_end - now)


def check_speed(speed: int) -> None:
    if speed < 0:
        raise QMPError("Parameter 'speed' expects a non-negative value")


class BlockJob(Job):
    """A job on block nodes. Subclasses implement run() and the finalize hooks."""

    graph_node_type = "block-job"

    def __init__(self, daemon: Any, job_id: str, *, speed: int = 0, auto_finalize: bool = True,
                 auto_dismiss: bool = True, on_error: str = "report") -> None:
        super().__init__(registry_of(daemon), job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        check_speed(speed)
        self.daemon = daemon
        self.graph = daemon.graph
        self.speed = speed
        self.rate = RateLimit(speed)
        self.on_error = on_error
        self.io_status = "ok"
        self.edges: list[Edge] = []

    def graph_node_name(self) -> str:
        return self.id

    @property
    def op_blocker(self) -> str:
        """Why the nodes the job holds itself refuse other operations (QEMU's text)."""
        return f"block device is in use by block job: {self.type}"

    # --- nodes --------------------------------------------------------------------------------
    def hold(self, node: BlockNode, role: str, perm: Perm, shared: Perm, *, backend: bool = False) -> Edge:
        """An edge from the job to `node` (BlockError on a permission conflict).
        The job's own edges block other operations on the node; a `backend`
        edge (the job writes through it, as QEMU's job BlockBackends) does
        not, but keeps blockdev-del away like an export."""
        # a BlockBackend's edge is its 'root' child, as QEMU names it
        edge = node.attach(JobBackend(self), perm, shared, "root") if backend else node.attach(self, perm, shared, role)
        self.edges.append(edge)
        return edge

    def hold_filter(self, filt: BlockNode, *, backend: bool = False) -> Edge:
        """The job's own edge on its filter node (QEMU's 'main node' child, or
        for a stream its BlockBackend's 'root'): it reads through it and lets
        nobody resize what it works on."""
        if backend:
            return filt.attach(JobBackend(self), Perm.CONSISTENT_READ, Perm.ALL & ~Perm.RESIZE, "root")
        return filt.attach(self, Perm.CONSISTENT_READ, Perm.ALL & ~Perm.RESIZE, "main node")

    async def let_go(self, edge: Edge) -> None:
        if edge in self.edges:
            self.edges.remove(edge)
            await self.graph.release(edge)

    async def let_go_all(self) -> None:
        for edge in list(self.edges):
            await self.let_go(edge)

    # --- rate limit ------------------------------------------------------------------------------
    def set_speed(self, speed: int) -> None:
        self.check_verb("set-speed")
        check_speed(speed)
        self.speed = self.rate.speed = speed
        self.enter()

    async def processed(self, n: int) -> None:
        """`n` bytes copied: progress, then the rate limit's sleep (or a pause point)."""
        self.current_progress += n
        self.rate.account(n)
        delay = self.rate.delay()
        if not delay:
            await self.pause_point()
        while delay and not self.is_cancelled():
            await self.sleep(delay)  # woken early by a verb: the speed may have changed
            delay = self.rate.delay()

    async def copy_range(self, src: BlockNode, dst: BlockNode, offset: int, n: int, zero: bool, *,
                         as_read: bool = False) -> None:
        """Copy [offset, offset + n) from `src` to `dst` (zeroes as write-zeroes),
        retried or skipped as the error policy says (commit and stream).
        `as_read`: any failure is the read's (a stream's copy-on-read, for
        QEMU a read that failed), else only the read's own."""
        while True:
            read_done = zero
            try:
                if zero:
                    await dst.write_zeroes(offset, n)
                else:
                    data = await src.read(offset, n)
                    read_done = True
                    await dst.write(offset, data)
                return
            except OSError as e:
                if not await self.io_error(e, is_read=as_read or not read_done):
                    return

    # --- I/O errors ---------------------------------------------------------------------------------
    async def io_error(self, exc: OSError, *, is_read: bool, policy: str | None = None) -> bool:
        """QEMU's block_job_error_action: report fails the job (re-raises),
        ignore goes on (returns False: skip), stop (or enospc on ENOSPC)
        pauses the job until resumed, then returns True: retry."""
        policy = policy or self.on_error
        action = policy
        if policy in ("auto", "report") or (policy == "enospc" and exc.errno != errno.ENOSPC):
            action = "report"
        elif policy == "enospc":
            action = "stop"
        self.emit("BLOCK_JOB_ERROR", {"device": self.id, "operation": "read" if is_read else "write",
                                      "action": action})
        if action == "report":
            if exc.errno:  # QEMU's job error is strerror(), not a driver's own words
                raise OSError(exc.errno, os.strerror(exc.errno)) from exc
            raise exc
        if action == "ignore":
            return False
        self.io_status = "nospace" if exc.errno == errno.ENOSPC else "failed"
        self.user_paused = True
        self.pause_count += 1
        await self.pause_point()
        self.io_status = "ok"
        return True

    # --- queries and events -------------------------------------------------------------------------
    def emit(self, name: str, data: dict[str, Any]) -> None:
        self.registry.emit(name, data)

    def _event_data(self) -> dict[str, Any]:
        return {"type": self.type, "device": self.id, "len": self.total_progress,
                "offset": self.current_progress, "speed": self.speed}

    def block_info(self) -> dict[str, Any]:
        """A BlockJobInfo (query-block-jobs)."""
        info: dict[str, Any] = {
            "type": self.type, "device": self.id, "len": self.total_progress,
            "offset": self.current_progress, "busy": self.busy, "paused": self.pause_count > 0,
            "speed": self.speed, "io-status": self.io_status, "ready": self.is_ready(),
            "status": str(self.status), "auto-finalize": self.auto_finalize, "auto-dismiss": self.auto_dismiss,
        }
        if self.error is not None:
            info["error"] = self.error
        return info

    def event_ready(self) -> None:
        self.emit("BLOCK_JOB_READY", self._event_data())

    def event_pending(self) -> None:
        self.emit("BLOCK_JOB_PENDING", {"type": self.type, "id": self.id})

    def event_finished(self) -> None:
        if self.is_cancelled():
            self.emit("BLOCK_JOB_CANCELLED", self._event_data())
        else:
            data = self._event_data()
            if self.error is not None:
                data["error"] = self.error
            self.emit("BLOCK_JOB_COMPLETED", data)


class JobBackend:
    """The parent of a job's edge to a node it writes (QEMU's job BlockBackend)."""

    graph_node_type = "block-backend"

    def __init__(self, job: BlockJob) -> None:
        self.job = job

    def describe(self) -> str:
        return "an unnamed block device"  # as QEMU names a job's BlockBackend

    def graph_node_name(self) -> str:
        return ""


def block_job(daemon: Any, job_id: str) -> BlockJob:
    """The block job `job_id` for the block-job-* commands."""
    from exportd.errors import DeviceNotActive

    for job in registry_of(daemon):
        if job.id == job_id and isinstance(job, BlockJob):
            return job
    raise DeviceNotActive(f"Block job '{job_id}' not found")
