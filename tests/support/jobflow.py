"""Play a QMP flow of commands and waits for events against a daemon
(exportd or qemu-storage-daemon) and record what came back, so the
differential tests of the block jobs can compare the two."""

from __future__ import annotations

import asyncio
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient

Step = tuple[Any, ...]  # ("cmd", name, args) | ("wait", EVENT, {data subset}) | ("sleep", s) | ("call", fn)


def cmd(name: str, **args: Any) -> Step:
    return ("cmd", name, {k.replace("_", "-"): v for k, v in args.items()})


def wait(event: str, **match: Any) -> Step:
    return ("wait", event, match)


async def play(socket_path: str, steps: list[Step], timeout: float = 30) -> tuple[list[Any], list[tuple[str, Any]]]:
    """(replies of the commands, every event seen in order as (name, data))."""
    client = QMPClient("flow")
    await client.connect(socket_path)
    events: list[tuple[str, Any]] = []
    replies: list[Any] = []
    try:
        listener = EventListener()
        with client.listen(listener):
            async def next_matching(name: str, match: dict[str, Any]) -> None:
                # events already queued by the listener count too
                while True:
                    ev = await listener.get()
                    events.append((ev["event"], ev.get("data", {})))
                    data = ev.get("data", {})
                    if ev["event"] == name and all(data.get(k) == v for k, v in match.items()):
                        return

            for step in steps:
                if step[0] == "cmd":
                    try:
                        replies.append({"return": await client.execute(step[1], step[2])})
                    except ExecuteError as e:
                        replies.append({"error": [e.error.error.class_, e.error.error.desc]})
                elif step[0] == "wait":
                    try:
                        await asyncio.wait_for(next_matching(step[1], step[2]), timeout)
                    except TimeoutError:
                        # a wait both daemons miss would otherwise compare equal and hide a broken flow
                        raise AssertionError(f"{socket_path}: no {step[1]} {step[2]} within {timeout:g} s; "
                                             f"the last events: {events[-8:]}") from None
                elif step[0] == "sleep":
                    await asyncio.sleep(step[1])
                elif step[0] == "call":  # a change outside QMP (a full disk freed...)
                    step[1]()
            await asyncio.sleep(0.2)
            while not listener.empty():
                ev = await listener.get()
                events.append((ev["event"], ev.get("data", {})))
    finally:
        await client.disconnect()
    return replies, events


def job_events(events: list[tuple[str, Any]], *, keep_numbers: bool = False) -> list[tuple[str, Any]]:
    """The job events, without the fields whose values depend on timing
    (progress figures) unless `keep_numbers`; repeats of one BLOCK_JOB_ERROR
    count as one (QEMU sends one per failed request, and how many were in
    flight is its business)."""
    out: list[tuple[str, Any]] = []
    for name, data in events:
        if name.startswith("BLOCK_JOB") or name == "JOB_STATUS_CHANGE":
            d = dict(data)
            if not keep_numbers:
                d.pop("len", None)
                d.pop("offset", None)
            if name == "BLOCK_JOB_ERROR" and out and out[-1] == (name, d):
                continue
            out.append((name, d))
    return out
