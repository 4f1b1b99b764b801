"""Grouped transactions where exportd cannot be compared with
qemu-storage-daemon 7.2: two backups prepared before an action that fails
hang QEMU (its rollback cancels the first job's transaction and then waits
for the second, which was never started, to complete). exportd takes both
back, newest first, and leaves the graph as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.backup.differential import accepting, add, start_exportd
from tests.backup.test_vs_qemu import images
from tests.support.jobflow import cmd, job_events, play

GROUPED = {"completion-mode": "grouped"}


def backup(job: str, target: str) -> dict[str, Any]:
    return {"type": "blockdev-backup", "data": {"job-id": job, "device": "src", "target": target, "sync": "full"}}


async def test_two_backups_taken_back_when_a_later_action_fails(tmp_path: Path) -> None:
    d = tmp_path / "img"
    d.mkdir()
    images(d)
    proc, sock = start_exportd(tmp_path)
    try:
        await accepting(sock, proc, tmp_path / "exportd.log")
        replies, events = await play(str(sock), [
            add(d, "src"), add(d, "full"), add(d, "t"),
            cmd("query-named-block-nodes"),
            cmd("transaction", properties=GROUPED,
                actions=[backup("a", "full"), backup("b", "t"), {"type": "abort", "data": {}}]),
            ("wait", "JOB_STATUS_CHANGE", {"id": "a", "status": "null"}),
            cmd("query-jobs"),
            cmd("query-named-block-nodes"),
            # the ids are free again, and a grouped pair still works
            cmd("transaction", properties=GROUPED, actions=[backup("a", "full"), backup("b", "t")]),
            ("wait", "JOB_STATUS_CHANGE", {"id": "a", "status": "null"}),
            cmd("query-jobs"),
        ])
    finally:
        proc.terminate()
        proc.wait(30)
    assert replies[4] == {"error": ["GenericError", "Transaction aborted using Abort action"]}
    assert replies[5] == {"return": []}
    assert [n["node-name"] for n in replies[6]["return"]] == [n["node-name"] for n in replies[3]["return"]]
    assert replies[7] == {"return": {}} and replies[8] == {"return": []}
    seen = [(data["id"], data["status"]) for name, data in job_events(events) if name == "JOB_STATUS_CHANGE"]
    assert seen[:8] == [("a", "created"), ("b", "created"),
                        ("b", "aborting"), ("b", "concluded"), ("b", "null"),
                        ("a", "aborting"), ("a", "concluded"), ("a", "null")]
    ends = [(name, data["device"]) for name, data in job_events(events) if name.startswith("BLOCK_JOB_")]
    assert ends == [("BLOCK_JOB_COMPLETED", "b"), ("BLOCK_JOB_COMPLETED", "a")]  # only the pair that ran
    # the pair that ran: b waits for a or a for b, then both pending, b finalized first
    rest = seen[8:]
    assert rest[-6:] == [("b", "pending"), ("a", "pending"), ("b", "concluded"), ("b", "null"),
                         ("a", "concluded"), ("a", "null")], rest
    assert {s for s in rest[:-6] if s[1] == "waiting"} == {("a", "waiting"), ("b", "waiting")}, rest
