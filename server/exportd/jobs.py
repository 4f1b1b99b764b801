"""Background jobs as QEMU's job layer has them (qapi/job.json, job.c).

A job moves through JobStatus states and announces each change with a
JOB_STATUS_CHANGE event. exportd's jobs (blockdev-create) are created as
QEMU creates them: auto-finalize on, auto-dismiss off, so a finished job
stays `concluded` (with its `error`, if it failed) until `job-dismiss`.

    success:  created -> running -> waiting -> pending -> concluded
    failure:  created -> running -> aborting -> concluded
    dismiss:  concluded -> null (the job is gone, its id free again)

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
from typing import Any

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
# Which states accept which verb (job.c's JobVerbTable, for the verbs exportd has).
VERB_STATES: dict[str, frozenset[JobStatus]] = {
    "cancel": frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY, S.WAITING, S.PENDING}),
    "finalize": frozenset({S.PENDING}),
    "dismiss": frozenset({S.CONCLUDED}),
}

# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")

# Prepare step: checks that are quick (option validation, node lookup and
# permissions); run inside the command, so its failure is visible in
# query-jobs by the time the client has the reply, as with QEMU.
# Work step: the I/O, in a task of its own. Either may raise; the job
# then concludes with the message as its error.
Step = Callable[["Job"], Awaitable[None]]


class Job:
    def __init__(self, registry: JobRegistry, job_id: str, job_type: str) -> None:
        self.registry = registry
        self.id = job_id
        self.type = job_type
        self.status = JobStatus.UNDEFINED
        self.current_progress = 0
        self.total_progress = 0
        self.error: str | None = None
        self.cancelled = False
        self.task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()  # set when concluded

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
        return f"job '{self.id}'"

    def check_verb(self, verb: str) -> None:
        if self.status not in VERB_STATES[verb]:
            raise QMPError(f"Job '{self.id}' in state '{self.status}' cannot accept command verb '{verb}'")

    def _transition(self, status: JobStatus) -> None:
        self.status = status
        self.registry.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": str(status)})

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = error_text(exc)

    async def _run(self, prepare: Step | None, work: Step | None) -> None:
        """Prepare inline (the caller awaits it), then work in a task."""
        self._transition(JobStatus.RUNNING)
        self.total_progress = 1  # create jobs count one unit, as QEMU's
        try:
            if prepare is not None:
                await prepare(self)
        except Exception as e:
            self._fail(e)
            self._complete()
            return
        except asyncio.CancelledError:
            self.error = self.error or os.strerror(errno.ECANCELED)
            self._complete()  # never leave a job 'running' without a task
            raise
        self.task = asyncio.get_running_loop().create_task(self._work(work))

    async def _work(self, work: Step | None) -> None:
        try:
            if work is not None:
                await work(self)
        except Exception as e:
            self._fail(e)
        except asyncio.CancelledError:
            # the loop is going away (daemon shutdown): nothing more to report
            self.error = self.error or os.strerror(errno.ECANCELED)
            self.status = JobStatus.CONCLUDED
            self.finished.set()
            raise
        self._complete()

    def _complete(self) -> None:
        self.current_progress = self.total_progress
        if self.error is None and self.cancelled:
            self.error = os.strerror(errno.ECANCELED)  # "Operation canceled", as QEMU
        if self.error is None:
            self._transition(JobStatus.WAITING)
            self._transition(JobStatus.PENDING)  # auto-finalize: straight on
        else:
            self._transition(JobStatus.ABORTING)
        self._transition(JobStatus.CONCLUDED)
        self.finished.set()


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

    async def start(self, job_id: str, job_type: str, *, prepare: Step | None = None,
                    work: Step | None = None) -> Job:
        """Create the job (errors for a bad or taken id are the command's), then
        run `prepare` before returning and `work` in the background."""
        if not _ID_RE.match(job_id):
            raise QMPError(f"Invalid job ID '{job_id}'")
        if job_id in self._jobs:
            raise QMPError(f"Job ID '{job_id}' already in use")
        job = Job(self, job_id, job_type)
        self._jobs[job_id] = job
        job._transition(JobStatus.CREATED)
        await job._run(prepare, work)
        return job

    def cancel(self, job_id: str) -> None:
        """Best effort: the work is not interrupted (a half-written image is worse
        than a finished one); the job then concludes with 'Operation canceled'."""
        job = self.get(job_id)
        job.check_verb("cancel")
        job.cancelled = True

    def finalize(self, job_id: str) -> None:
        # every exportd job finalizes itself, so none is ever left pending
        self.get(job_id).check_verb("finalize")

    def dismiss(self, job_id: str) -> None:
        job = self.get(job_id)
        job.check_verb("dismiss")
        del self._jobs[job_id]
        job._transition(JobStatus.NULL)


def error_text(exc: BaseException) -> str:
    """The user-facing text of a job's failure."""
    if isinstance(exc, QMPError):
        return exc.desc
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.strerror or os.strerror(exc.errno)
    log.exception("job failed unexpectedly", exc_info=exc)
    return str(exc) or type(exc).__name__


async def finish_all(daemon: Any, timeout: float = 60.0) -> None:
    """At shutdown, before the block nodes close: cancel every unfinished job and
    wait for it (the work is not interrupted, so an image is never left half
    written), as qemu-storage-daemon's job_cancel_sync_all(). Never raises."""
    reg = _REGISTRIES.get(daemon)
    if reg is None:
        return
    tasks = []
    for job in reg:
        if job.task is not None and not job.task.done():
            job.cancelled = True
            tasks.append(job.task)
    if not tasks:
        return
    try:
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            log.warning("%d job(s) still running after %.0f s at shutdown", len(pending), timeout)
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
