"""Background jobs as QEMU's job layer has them (qapi/job.json, job.c).

A job moves through JobStatus states and announces each change with a
JOB_STATUS_CHANGE event:

    created -> running [-> paused -> running] [-> ready [-> standby -> ready]]
      success:  -> waiting -> pending [job-finalize] -> concluded [job-dismiss] -> null
      failure or cancel:  -> aborting -> concluded [job-dismiss] -> null

A driver (a Job subclass) implements `run()`, the work, which calls
`await self.pause_point()` between pieces of work and stops when
`self.should_stop()`; a job that can reach READY calls `self.set_ready()`
and implements `do_complete()`. After run() returns, `prepare()` (may fail),
then `commit()` or `abort()`, then `clean()` change the graph, as QEMU's
JobDriver callbacks do. Block jobs (exportd.block.jobs) add their events
through the `event_*` hooks.

Jobs complete in transactions (QEMU's JobTxn): a job alone is a
transaction of one; the backup jobs of a `transaction` with completion-mode
grouped share one. A job that succeeds waits (`waiting`) until every job of
its transaction has completed; then all go to pending, and are finalized
together (automatically unless one of them has auto-finalize=false, else
by one job-finalize). When one fails or is cancelled, the others are
force-cancelled; once all have stopped, each is finalized (abort, clean,
BLOCK_JOB_COMPLETED with its error or BLOCK_JOB_CANCELLED). QEMU keeps a
transaction's jobs newest first and walks them in that order; so does
JobTxn.

Cancel is QEMU's: force-cancel (job-cancel, block-job-cancel force=true)
stops the work at its next pause point and the job aborts with
"Operation canceled"; a soft cancel (block-job-cancel) of a READY mirror
finishes it without its graph change, as a success.

The registry belongs to one daemon; `registry_of(daemon)` creates it on first
use (daemon.py does not know about jobs).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import re
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from exportd.aio.threads import set_background
from exportd.errors import QMPError

log = logging.getLogger(__name__)


class JobStatus(enum.StrEnum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


S = JobStatus
_ACTIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})
# Which states accept which verb (job.c's verb table).
VERB_STATES: dict[str, frozenset[JobStatus]] = {
    "cancel": _ACTIVE | {S.WAITING, S.PENDING, S.ABORTING},
    "pause": _ACTIVE,
    "resume": _ACTIVE,
    "set-speed": _ACTIVE,
    "complete": frozenset({S.READY, S.STANDBY}),  # a paused READY job too (QEMU since 6.1)
    "finalize": frozenset({S.PENDING}),
    "dismiss": frozenset({S.CONCLUDED}),
}

_COMPLETED = frozenset({S.WAITING, S.PENDING, S.ABORTING, S.CONCLUDED, S.NULL})

# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")

# blockdev-create's steps: `prepare` runs inside the command (quick checks,
# so a failure shows in query-jobs by the time the client has the reply),
# `work` in the job's task.
Step = Callable[["Job"], Awaitable[None]]


class Job:
    job_type: ClassVar[str] = ""
    can_complete: ClassVar[bool] = False  # has a READY state and job-complete

    def __init__(self, registry: JobRegistry, job_id: str, *, auto_finalize: bool = True,
                 auto_dismiss: bool = True) -> None:
        self.registry = registry
        self.id = job_id
        self.type = self.job_type
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.status = JobStatus.UNDEFINED
        self.current_progress = 0
        self.total_progress = 0
        self.error: str | None = None
        self.cancelled = False  # a cancel was asked for (soft or forced)
        self.force_cancel = False
        self.user_paused = False
        self.pause_count = 0
        self.busy = False  # the work is running (not sleeping, not paused)
        self.done_running = False  # run() returned: QEMU's deferred_to_main_loop
        self.task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()  # set when concluded
        self._wake = asyncio.Event()  # job_enter(): ends a sleep or pause early
        self._finalizing = False
        self._abort_task: asyncio.Task[None] | None = None
        self.started = False  # QEMU's job_started: a job never started announces no end
        self.txn = JobTxn()  # alone until a grouped transaction takes it (JobTxn.add)
        self.txn.jobs.append(self)

    # --- what a driver implements -------------------------------------------------
    async def run(self) -> None:
        """The work; raises to fail the job."""

    def do_complete(self) -> None:
        """job-complete on a READY job: make run() finish with the pivot."""

    def do_cancel(self, force: bool) -> bool:
        """A cancel request reaches the driver; returns whether it is a
        forced one (QEMU's JobDriver.cancel: a mirror treats a soft cancel
        before READY as forced)."""
        return True

    async def prepare(self) -> None:
        """After a successful run: the graph change that may still fail."""

    async def commit(self) -> None:
        """After a successful prepare."""

    async def abort(self) -> None:
        """After a failed or cancelled run, or a failed prepare."""

    async def clean(self) -> None:
        """Always, last."""

    # --- event hooks (block jobs announce more) -------------------------------------
    def event_ready(self) -> None: ...
    def event_pending(self) -> None: ...
    def event_finished(self) -> None:
        """After commit/abort: BLOCK_JOB_COMPLETED or _CANCELLED."""

    # --- queries ----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """A JobInfo (query-jobs)."""
        info: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "status": str(self.status),
            "current-progress": self.current_progress,
            "total-progress": self.total_progress,
        }
        if self.error is not None:
            info["error"] = self.error
        return info

    def describe(self) -> str:
        """How block-layer permission errors name this job as a node user."""
        return f"{self.type} job '{self.id}'"

    def is_cancelled(self) -> bool:
        """A forced cancel: the work must stop (QEMU's job_is_cancelled)."""
        return self.cancelled and self.force_cancel

    def is_ready(self) -> bool:
        return self.status in (S.READY, S.STANDBY)

    def is_completed(self) -> bool:
        """The work is over, successfully or not (QEMU's job_is_completed)."""
        return self.status in _COMPLETED

    def should_stop(self) -> bool:
        """run() leaves its loop: forced cancel, or a soft cancel once READY."""
        return self.is_cancelled() or (self.cancelled and self.is_ready())

    def check_verb(self, verb: str) -> None:
        if self.status not in VERB_STATES[verb]:
            raise QMPError(f"Job '{self.id}' in state '{self.status}' cannot accept command verb '{verb}'")

    # --- the work's side ----------------------------------------------------------------
    def _transition(self, status: JobStatus) -> None:
        if status == self.status:
            return  # QEMU announces changes only
        self.status = status
        self.registry.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": str(status)})

    def set_ready(self) -> None:
        """run() reached the READY state (QEMU's job_transition_to_ready)."""
        if self.status == S.RUNNING:
            self._transition(S.READY)
            self.event_ready()

    def enter(self) -> None:
        """Wake the work from a sleep or a pause."""
        self._wake.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep for up to `seconds`, or until enter() (a cancel, resume,
        complete or speed change), as QEMU's job_sleep_ns; a pause point follows."""
        if not self.should_stop() and self.pause_count <= 0:
            self._wake.clear()
            self.busy = False
            try:
                if seconds > 0:
                    try:
                        await asyncio.wait_for(self._wake.wait(), seconds)
                    except TimeoutError:
                        pass
                else:
                    await self._wake.wait()
            finally:
                self.busy = True
        await self.pause_point()

    async def pause_point(self) -> None:
        """Where the work may be paused (QEMU's job_pause_point)."""
        await asyncio.sleep(0)  # let the loop serve others between pieces of work
        if self.pause_count <= 0 or self.is_cancelled():
            return
        resume_to = self.status
        self._transition(S.STANDBY if resume_to == S.READY else S.PAUSED)
        self.busy = False
        try:
            while self.pause_count > 0 and not self.is_cancelled():
                self._wake.clear()
                await self._wake.wait()
        finally:
            self.busy = True
        self._transition(resume_to)

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message

    # --- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        """QEMU's job_start: running, with the work in a task of its own."""
        self.started = True
        self._transition(S.RUNNING)
        self.busy = True
        self.task = asyncio.get_running_loop().create_task(self._main(), name=f"job {self.id}")

    async def _main(self) -> None:
        set_background()  # the job's I/O leaves the loop to the requests clients wait on
        try:
            await self.run()
        except asyncio.CancelledError:
            # the loop is going away (daemon shutdown): nothing more to report
            self.fail(os.strerror(errno.ECANCELED))
            self.status = S.CONCLUDED
            self.finished.set()
            raise
        except Exception as e:
            self.fail(error_text(e))
        self.busy = False
        self.done_running = True
        await self._completed()

    async def _completed(self) -> None:
        """QEMU's job_completed: waiting until the whole transaction is,
        then pending; aborting else, which aborts the transaction."""
        if self._update_rc():
            await self.txn.abort(self)
            return
        self.current_progress = max(self.current_progress, 0)
        self._transition(S.WAITING)
        await self.txn.completed_successfully(self)

    def _update_rc(self) -> bool:
        """QEMU's job_update_rc: a forced cancel is a failure with
        'Operation canceled'; a failed job is aborting. Whether it failed."""
        if self.error is None and self.is_cancelled():
            self.error = os.strerror(errno.ECANCELED)  # "Operation canceled", as QEMU
        if self.error is not None:
            self._transition(S.ABORTING)
        return self.error is not None

    def _to_pending(self) -> None:
        self._transition(S.PENDING)
        if not self.auto_finalize:
            self.event_pending()  # job-finalize continues

    async def _prepare(self) -> bool:
        """QEMU's job_prepare: the driver's prepare of a job that has not
        failed; whether the job has failed (now or before)."""
        self._finalizing = True
        if self.error is None:
            try:
                await self.prepare()
            except Exception as e:
                self.fail(error_text(e))
        return self._update_rc()

    async def _finalize_single(self) -> None:
        """QEMU's job_finalize_single: commit or abort, clean, the event,
        out of the transaction, concluded (and dismissed)."""
        self._update_rc()  # a job cancelled by its transaction after it succeeded aborts
        try:
            if self.error is None:
                await self.commit()
            else:
                await self.abort()
        except Exception as e:
            log.exception("job %s: %s failed", self.id, "commit" if self.error is None else "abort")
            self.fail(error_text(e))
        try:
            await self.clean()
        except Exception:
            log.exception("job %s: clean-up failed", self.id)
        if self.started:
            self.event_finished()
        self.txn.remove(self)
        self._transition(S.CONCLUDED)
        self.finished.set()
        if self.auto_dismiss or not self.started:
            self.registry._forget(self)

    def _cancel_async(self, force: bool) -> None:
        """QEMU's job_cancel_async: the request, without waking the work."""
        force = self.do_cancel(force)
        if self.user_paused:  # a cancelled job must be able to run to its end
            self.user_paused = False
            self.pause_count -= 1
        if force or not self.done_running:
            self.cancelled = True
            self.force_cancel |= force

    # --- verbs (QMP) --------------------------------------------------------------------------
    def user_cancel(self, force: bool) -> None:
        self.check_verb("cancel")
        self._cancel_async(force)
        if not self.done_running:
            self.enter()
        elif (self.is_cancelled() and self.status in (S.WAITING, S.PENDING) and not self._finalizing
              and not self.txn.aborting):
            # done with its work, waiting for its transaction or for
            # job-finalize: the transaction aborts (QEMU's job_cancel)
            if len(self.txn.jobs) == 1:
                self._update_rc()  # alone: aborting before the reply, as QEMU
            self._abort_task = asyncio.get_running_loop().create_task(self.txn.abort(self))

    def user_pause(self) -> None:
        self.check_verb("pause")
        if self.user_paused:
            raise QMPError("Job is already paused")
        self.user_paused = True
        self.pause_count += 1
        self.enter()  # a sleeping job pauses at once

    def user_resume(self) -> None:
        if not self.user_paused or self.pause_count <= 0:
            raise QMPError("Can't resume a job that was not paused")
        self.check_verb("resume")
        self.user_paused = False
        self.pause_count -= 1
        if self.pause_count == 0:
            self.enter()

    def user_complete(self) -> None:
        self.check_verb("complete")
        if self.cancelled or not self.can_complete:
            raise QMPError(f"The active block job '{self.id}' cannot be completed")
        self.do_complete()
        self.enter()

    async def user_finalize(self) -> None:
        """job-finalize of one job finalizes its whole transaction."""
        self.check_verb("finalize")
        await self.txn.finalize(self)

    def user_dismiss(self) -> None:
        self.check_verb("dismiss")
        self.registry._forget(self)


class CreateJob(Job):
    """blockdev-create: `prepare` inside the command, `work` in the task.
    Its work is not interrupted by a cancel (a half-written image is worse
    than a finished one); the job then concludes with 'Operation canceled'."""

    job_type = "create"

    def __init__(self, registry: JobRegistry, job_id: str, prepare: Step | None, work: Step | None) -> None:
        super().__init__(registry, job_id, auto_finalize=True, auto_dismiss=False)
        self._prepare_step = prepare
        self._work_step = work

    async def run(self) -> None:
        if self._work_step is not None:
            await self._work_step(self)
        self.current_progress = self.total_progress

    async def start_with_prepare(self) -> None:
        self.started = True
        self._transition(S.RUNNING)
        self.total_progress = 1  # create jobs count one unit, as QEMU's
        try:
            if self._prepare_step is not None:
                await self._prepare_step(self)
        except Exception as e:
            self.fail(error_text(e))
            self.done_running = True
            self.current_progress = self.total_progress
            await self._completed()
            return
        except asyncio.CancelledError:
            self.fail(os.strerror(errno.ECANCELED))
            self.status = S.CONCLUDED
            self.finished.set()
            raise
        self.busy = True
        self.task = asyncio.get_running_loop().create_task(self._main(), name=f"job {self.id}")

    async def abort(self) -> None:
        self.current_progress = self.total_progress


class JobTxn:
    """QEMU's JobTxn: jobs that complete together, newest first (QEMU's
    job_txn_add_job inserts at the head of its list, and every walk of the
    transaction goes in that order)."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.aborting = False

    def add(self, job: Job) -> None:
        """Take `job` (not started yet) from its own transaction into this one."""
        assert job.status in (S.UNDEFINED, S.CREATED) and job.txn.jobs == [job]
        job.txn.jobs.clear()
        job.txn = self
        self.jobs.insert(0, job)

    def remove(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)

    async def completed_successfully(self, job: Job) -> None:
        """QEMU's job_completed_txn_success: `job` is waiting; when no job
        of the transaction still runs, all go to pending, and are
        finalized unless one of them waits for job-finalize."""
        if any(not other.is_completed() for other in self.jobs):
            return
        for other in list(self.jobs):
            other._to_pending()
        if all(other.auto_finalize for other in self.jobs):
            await self.finalize(job)

    async def finalize(self, job: Job) -> None:
        """QEMU's job_do_finalize: every job's prepare; if one fails, the
        transaction aborts, else every job is finalized."""
        for other in list(self.jobs):
            if await other._prepare():
                await self.abort(job)
                return
        for other in list(self.jobs):
            await other._finalize_single()

    async def abort(self, job: Job) -> None:
        """QEMU's job_completed_txn_abort: `job` failed or was cancelled;
        every other job is force-cancelled, then each is finalized in
        turn, once it has stopped. A job that was running stops before the
        first is finalized (QEMU's finalization drains the nodes, which
        kicks it to its next pause point, and its aborting comes first); a
        paused one is woken only at its turn (QEMU's job_finish_sync)."""
        if self.aborting:
            return  # cancelled by another job of the transaction, which does the rest
        self.aborting = True
        running = []
        for other in list(self.jobs):
            if other is job:
                continue
            paused = other.status in (S.PAUSED, S.STANDBY)
            other._cancel_async(True)
            if other.is_completed():
                continue
            if other.task is None:  # never started: completes at once (QEMU's job_cancel)
                other._update_rc()
                continue
            if not paused:
                other.enter()
                running.append(other.task)
        if running:
            await asyncio.wait(running)  # each stops at its next pause point, aborting
        while self.jobs:
            first = self.jobs[0]
            if not first.is_completed() and first.task is not None:
                first.enter()
                await asyncio.wait([first.task])
            await first._finalize_single()


class JobRegistry:
    def __init__(self, emit: Callable[[str, dict[str, Any]], None]) -> None:
        self.emit = emit
        self._jobs: dict[str, Job] = {}  # creation order

    def query(self) -> list[dict[str, Any]]:
        """query-jobs: newest first, as QEMU lists them."""
        return [job.info() for job in reversed(self._jobs.values())]

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise QMPError("Job not found")
        return job

    def __iter__(self):
        return iter(list(self._jobs.values()))

    def check_new_id(self, job_id: str) -> None:
        if not _ID_RE.match(job_id):
            raise QMPError(f"Invalid job ID '{job_id}'")
        if job_id in self._jobs:
            raise QMPError(f"Job ID '{job_id}' already in use")

    def add(self, job: Job) -> None:
        """Register a new job (its id checked) and announce it as created."""
        self.check_new_id(job.id)
        self._jobs[job.id] = job
        job._transition(S.CREATED)

    def _forget(self, job: Job) -> None:
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]
        job._transition(S.NULL)

    async def start(self, job_id: str, job_type: str, *, prepare: Step | None = None,
                    work: Step | None = None) -> Job:
        """blockdev-create's job: errors for a bad or taken id are the
        command's; `prepare` runs before returning, `work` in the background."""
        assert job_type == CreateJob.job_type
        job = CreateJob(self, job_id, prepare, work)
        self.add(job)
        await job.start_with_prepare()
        return job

    # QMP verbs by job id (the job-* commands)
    def cancel(self, job_id: str) -> None:
        self.get(job_id).user_cancel(force=True)  # job-cancel always forces, as QEMU's

    async def finalize(self, job_id: str) -> None:
        await self.get(job_id).user_finalize()

    def dismiss(self, job_id: str) -> None:
        self.get(job_id).user_dismiss()


def error_text(exc: BaseException) -> str:
    """The user-facing text of a job's failure."""
    if isinstance(exc, QMPError):
        return exc.desc
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.strerror or os.strerror(exc.errno)
    log.exception("job failed unexpectedly", exc_info=exc)
    return str(exc) or type(exc).__name__


async def finish_all(daemon: Any, timeout: float = 60.0) -> None:
    """At shutdown, before the block nodes close: force-cancel every
    unfinished job and wait for it, as qemu-storage-daemon's
    job_cancel_sync_all() (a create job's I/O is not interrupted, so an image
    is never left half written). Never raises."""
    reg = _REGISTRIES.get(daemon)
    if reg is None:
        return
    waits = []
    for job in reg:
        if job.finished.is_set():
            continue
        if job.status in VERB_STATES["cancel"]:
            try:
                job.user_cancel(force=True)
            except Exception:
                log.exception("cancelling job %s at shutdown failed", job.id)
        waits.append(asyncio.ensure_future(job.finished.wait()))
    if not waits:
        return
    try:
        _, pending = await asyncio.wait(waits, timeout=timeout)
        if pending:
            log.warning("%d job(s) still running after %.0f s at shutdown", len(pending), timeout)
            for w in pending:
                w.cancel()
    except Exception:
        log.exception("waiting for the jobs at shutdown failed")


_REGISTRIES: weakref.WeakKeyDictionary[Any, JobRegistry] = weakref.WeakKeyDictionary()


def registry_of(daemon: Any) -> JobRegistry:
    """The daemon's job registry, created on first use."""
    reg = _REGISTRIES.get(daemon)
    if reg is None:
        reg = JobRegistry(daemon.emit_event)
        _REGISTRIES[daemon] = reg
    return reg
