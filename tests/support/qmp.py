"""QMP clients for tests, beside qemu.qmp's own QMPClient.

RawQMP      a QMP connection over a plain socket, for byte-level tests
            (the root conftest's `raw_qmp` fixture).
JobClient   a qemu.qmp client that records JOB_STATUS_CHANGE events
            (tests/jobs/conftest.py's `jobs_client` fixture).
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError

EVENT_TIMEOUT_S = 15.0


class RawQMP:
    """A QMP connection over a plain socket, for byte-level tests."""

    def __init__(self, path: str, timeout: float = 15.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events: list[dict[str, Any]] = []  # events that came while cmd() waited for its reply
        self.greeting = self.recv_msg()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def recv_line(self) -> bytes:
        """One server message with its CRLF; b"" when the server closed."""
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                rest, self.buf = self.buf, b""
                return rest
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def recv_msg(self) -> dict[str, Any]:
        line = self.recv_line()
        if not line:
            raise EOFError("the server closed the connection")
        return json.loads(line)

    def cmd(self, name: str, args: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name, **extra}
        if args is not None:
            msg["arguments"] = args
        self.send(json.dumps(msg))
        while True:
            reply = self.recv_msg()
            if "event" not in reply:
                return reply
            self.events.append(reply)

    def event(self, name: str) -> dict[str, Any]:
        """The next event called `name` (also one that came during a cmd())."""
        for i, ev in enumerate(self.events):
            if ev["event"] == name:
                return self.events.pop(i)
        while True:
            msg = self.recv_msg()
            if msg.get("event") == name:
                return msg
            if "event" in msg:
                self.events.append(msg)

    def negotiate(self) -> None:
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def close(self) -> None:
        self.sock.close()


class JobClient:
    """A qemu.qmp client plus every JOB_STATUS_CHANGE it has seen, in order."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.listener = EventListener(("JOB_STATUS_CHANGE",))
        client.register_listener(self.listener)
        self.seen: list[tuple[str, str]] = []  # (job id, status)
        self.mark = 0  # where the events of the last run_create start

    async def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        return await self.client.execute(name, args)

    async def error(self, name: str, args: dict[str, Any] | None = None) -> str:
        """The desc of the error reply `name` must give."""
        with pytest.raises(ExecuteError) as ei:
            await self.client.execute(name, args)
        assert ei.value.error.error.class_ == "GenericError"
        return ei.value.error.error.desc

    async def wait_status(self, job_id: str, status: str, since: int = 0) -> list[str]:
        """Wait for `job_id` to reach `status` (in events from index `since` on);
        its statuses seen from `since` on."""
        while (job_id, status) not in self.seen[since:]:
            ev = await asyncio.wait_for(self.listener.get(), EVENT_TIMEOUT_S)
            self.seen.append((ev["data"]["id"], ev["data"]["status"]))
        return [s for i, s in self.seen[since:] if i == job_id]

    async def run_create(self, job_id: str, options: dict[str, Any]) -> dict[str, Any]:
        """blockdev-create, wait until concluded, then the job's query-jobs entry."""
        self.mark = len(self.seen)
        assert await self.cmd("blockdev-create", {"job-id": job_id, "options": options}) == {}
        await self.wait_status(job_id, "concluded", self.mark)
        jobs = {j["id"]: j for j in await self.cmd("query-jobs")}
        return jobs[job_id]

    async def create_ok(self, job_id: str, options: dict[str, Any]) -> None:
        """A creation that must succeed; the job is dismissed afterwards."""
        info = await self.run_create(job_id, options)
        assert "error" not in info, info
        assert await self.cmd("job-dismiss", {"id": job_id}) == {}
        await self.wait_status(job_id, "null", self.mark)

    async def create_error(self, job_id: str, options: dict[str, Any]) -> str:
        """A creation whose job must fail: its error text (the job is dismissed)."""
        info = await self.run_create(job_id, options)
        statuses = await self.wait_status(job_id, "concluded", self.mark)
        assert statuses == ["created", "running", "aborting", "concluded"], statuses
        assert await self.cmd("job-dismiss", {"id": job_id}) == {}
        assert "error" in info, info
        return info["error"]
