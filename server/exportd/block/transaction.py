"""All-or-nothing runs of graph changes (QEMU's qmp_transaction and its
BlkActionOps), shared by the QMP `transaction` command and the single
commands that are one action (blockdev-snapshot, blockdev-snapshot-sync).

An Action is prepared, then committed or aborted, then cleaned:

- prepare(): do the change so that later actions of the same run see it
  (a snapshot's overlay is already on top), but keep what abort() needs to
  undo it. On failure raise QMPError; abort() and clean() still run for
  this action, so prepare() records each step as it completes.
- commit(): make it final; cannot fail.
- abort(): undo what prepare() recorded; cannot fail (logs instead).
- clean(): drop what the run held either way (a snapshot-sync overlay that
  no one took over goes here).

run() prepares every action in order; when one fails, every prepared action
and the failing one are aborted newest first, and the failing action's error
is raised. Then all are cleaned oldest first. With completion-mode
grouped, the actions that make jobs (the backups) put them into one JobTxn
(exportd.jobs): they complete, finalize or are cancelled together; any
other action refuses that mode with QEMU's text. A new kind of action (dirty
bitmaps, backup jobs) is one more Action subclass and one entry in the
command's table (exportd.commands.transaction.ACTIONS).
"""

from __future__ import annotations

import logging
from typing import ClassVar

from exportd.errors import QMPError
from exportd.jobs import JobTxn

log = logging.getLogger(__name__)


class Action:
    kind: ClassVar[str]  # the QMP TransactionActionKind, for error texts
    # whether the action takes part in completion-mode "grouped" (QEMU: only
    # the backup jobs); the others refuse it at the start of prepare()
    supports_grouped: ClassVar[bool] = False
    # with completion-mode grouped: the transaction the jobs this action
    # makes join (QEMU's JobTxn, made by qmp_transaction), else None
    job_txn: JobTxn | None = None

    async def prepare(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:  # noqa: B027 (optional step)
        pass

    async def abort(self) -> None:  # noqa: B027 (optional step)
        pass

    async def clean(self) -> None:  # noqa: B027 (optional step)
        pass


class AbortAction(Action):
    """QEMU's test action: fails, so the whole run is rolled back."""

    kind = "abort"
    supports_grouped = True  # it does not look at the mode: it fails anyway

    async def prepare(self) -> None:
        raise QMPError("Transaction aborted using Abort action")


async def run(actions: list[Action], *, completion_mode: str = "individual") -> None:
    """Prepare all, then commit all; or abort what was prepared and raise.
    With completion-mode grouped the jobs the actions make complete as one
    (one JobTxn for the run)."""
    started: list[Action] = []
    job_txn = JobTxn() if completion_mode == "grouped" else None
    try:
        try:
            for action in actions:
                started.append(action)
                if completion_mode != "individual" and not action.supports_grouped:
                    raise QMPError(f"Action '{action.kind}' does not support Transaction property "
                                   f"completion-mode = {completion_mode}")
                action.job_txn = job_txn
                await action.prepare()
        except BaseException:
            for action in reversed(started):
                try:
                    await action.abort()
                except Exception:
                    log.exception("aborting transaction action %s failed", action.kind)
            raise
        for action in started:
            action.commit()
    finally:
        for action in started:
            try:
                await action.clean()
            except Exception:
                log.exception("cleaning up transaction action %s failed", action.kind)
