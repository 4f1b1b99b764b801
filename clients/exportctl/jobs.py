"""exportctl's block jobs: the QMP arguments of stream/commit/mirror, waiting
for a job to conclude (with a progress bar on a terminal), and the jobs table.

QEMU's job life: created -> running (<-> paused) [-> ready, for mirror and
active commit, until job-complete] -> waiting -> pending -> concluded -> null
(null at once when auto-dismiss, the default). BLOCK_JOB_COMPLETED (with
"error" on failure) or BLOCK_JOB_CANCELLED comes before "concluded".
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from exportctl.client import Client, ConnectError, QMPError

POLL_S = 0.2  # progress bar refresh: one query-block-jobs per tick
CHECK_S = 2.0  # a job quiet this long is looked up in query-jobs


@dataclass
class JobOutcome:
    job_id: str
    status: str  # "completed", "ready" (left running), "failed", "cancelled"
    error: str | None = None
    offset: int | None = None
    length: int | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("completed", "ready")

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"job-id": self.job_id, "status": self.status}
        if self.error is not None:
            d["error"] = self.error
        if self.offset is not None:
            d["offset"], d["len"] = self.offset, self.length
        return d


async def wait_job(c: Client, job_id: str, *, complete: bool, progress: bool) -> JobOutcome:
    """Follow `job_id`'s events until it concludes (sending job-complete at
    READY when `complete`, else returning there). The job must have been
    started on this connection: its events are queued from the start."""
    bar = _progress_task(c, job_id) if progress else None
    try:
        return await _follow(c, job_id, complete)
    finally:
        if bar is not None:
            bar.cancel()
            with contextlib.suppress(BaseException):
                await bar


async def _follow(c: Client, job_id: str, complete: bool) -> JobOutcome:
    ended: dict[str, Any] | None = None  # BLOCK_JOB_COMPLETED / _CANCELLED data
    cancelled = False
    while True:
        try:
            ev = await c.next_event(CHECK_S)
        except ConnectError:
            raise ConnectError(f"the connection ended before job {job_id} concluded") from None
        if ev is None:
            await _check_listed(c, job_id)
            continue
        name, data = ev.get("event"), ev.get("data") or {}
        if name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and data.get("device") == job_id:
            ended, cancelled = data, name == "BLOCK_JOB_CANCELLED"
        elif name == "BLOCK_JOB_ERROR" and data.get("device") == job_id and data.get("action") == "stop":
            # only with on-error=stop (exportctl leaves the default, report)
            print(f"exportctl: job {job_id} stopped on an I/O error ({data.get('operation')})",
                  file=sys.stderr)
        elif name == "JOB_STATUS_CHANGE" and data.get("id") == job_id:
            status = data.get("status")
            if status == "ready":
                if not complete:
                    return JobOutcome(job_id, "ready")
                await c.execute("job-complete", {"id": job_id})
            elif status in ("concluded", "null"):
                return await _concluded(c, job_id, ended, cancelled)


async def _check_listed(c: Client, job_id: str) -> None:
    """A quiet job must still be listed: one that vanished without its
    events (a daemon's bug) would otherwise be waited for forever. Events
    precede the reply on the socket, so any the job sent are queued by now."""
    listed = any(j.get("id") == job_id for j in await c.execute("query-jobs"))
    if not listed and not c.has_events():
        raise JobVanished(f"job '{job_id}' ended without reporting how (no JOB_STATUS_CHANGE)")


class JobVanished(Exception):
    pass


async def _concluded(c: Client, job_id: str, ended: dict[str, Any] | None, cancelled: bool) -> JobOutcome:
    error = (ended or {}).get("error")
    # Still listed: the job is not auto-dismiss. Its error is there (non-block
    # jobs send no BLOCK_JOB_* event), and dismissing it frees the id.
    for job in await c.execute("query-jobs"):
        if job.get("id") == job_id and job.get("status") == "concluded":
            error = error or job.get("error")
            with contextlib.suppress(QMPError):
                await c.execute("job-dismiss", {"id": job_id})
    offset = ended.get("offset") if ended else None
    length = ended.get("len") if ended else None
    if cancelled:
        return JobOutcome(job_id, "cancelled", error or f"job '{job_id}' was cancelled", offset, length)
    if error:
        return JobOutcome(job_id, "failed", error, offset, length)
    return JobOutcome(job_id, "completed", None, offset, length)


# --- progress bar ---------------------------------------------------------------------------
def _progress_task(c: Client, job_id: str) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(_show_progress(c, job_id))


async def _block_job(c: Client, job_id: str) -> dict[str, Any] | None:
    try:
        jobs = await c.execute("query-block-jobs")
    except QMPError:
        return None
    return next((j for j in jobs if j.get("device") == job_id), None)


async def _show_progress(c: Client, job_id: str) -> None:
    async with _bar(job_id) as update:
        while True:
            job = await _block_job(c, job_id)
            if job is not None:
                update(job.get("offset", 0), job.get("len", 0), job.get("status", ""))
            await asyncio.sleep(POLL_S)


@contextlib.asynccontextmanager
async def _bar(job_id: str) -> AsyncIterator[Any]:
    try:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
    except ModuleNotFoundError:
        with _plain_bar(job_id) as update:
            yield update
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn(),
                  transient=True) as p:
        task = p.add_task(job_id, total=None)

        def update(done: int, total: int, status: str) -> None:
            p.update(task, completed=done, total=total or None, description=f"{job_id} ({status})")

        yield update


@contextlib.contextmanager
def _plain_bar(job_id: str) -> Any:
    """Without rich: one line redrawn in place."""
    width = 30

    def update(done: int, total: int, status: str) -> None:
        frac = done / total if total else 0.0
        filled = int(frac * width)
        line = f"\r{job_id} ({status}) [{'#' * filled}{' ' * (width - filled)}] {frac:4.0%} {done}/{total}"
        sys.stdout.write(line)
        sys.stdout.flush()

    try:
        yield update
    finally:
        sys.stdout.write("\r\x1b[K")
        sys.stdout.flush()


# --- the jobs table -------------------------------------------------------------------------
def merge_jobs(jobs: list[dict[str, Any]], block_jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per job: query-jobs' entry with the block job's fields over it."""
    by_id = {b.get("device"): b for b in block_jobs}
    rows: list[dict[str, Any]] = []
    for j in jobs:
        b = by_id.pop(j.get("id"), None)
        rows.append({**j, **({"block": b} if b else {})})
    for b in by_id.values():  # a block job that query-jobs did not list
        rows.append({"id": b.get("device"), "type": b.get("type"), "status": b.get("status"),
                     "current-progress": b.get("offset"), "total-progress": b.get("len"), "block": b})
    return rows


def job_rows(merged: list[dict[str, Any]], human_size: Any) -> list[list[str]]:
    rows = []
    for j in merged:
        b = j.get("block") or {}
        cur = b.get("offset", j.get("current-progress", 0)) or 0
        total = b.get("len", j.get("total-progress", 0)) or 0
        pct = f"{100 * cur / total:.0f}%" if total else "-"
        speed = b.get("speed")
        rows.append([
            str(j.get("id", "")), str(j.get("type", "")), str(b.get("status", j.get("status", ""))),
            f"{human_size(cur)}/{human_size(total)}", pct,
            (human_size(speed) + "/s") if speed else ("unlimited" if b else "-"),
            ("yes" if b.get("ready") else "no") if b else "-",
            str(j.get("error") or b.get("error") or "-"),
        ])
    return rows


JOB_HEADER = ["ID", "TYPE", "STATUS", "PROGRESS", "%", "SPEED", "READY", "ERROR"]
