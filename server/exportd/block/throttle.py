"""I/O throttling as QEMU has it: throttle-group objects (block/throttle-groups.c)
with their limits and leaky buckets (util/throttle.c), and the `throttle`
block driver (block/throttle.c) whose requests wait for their group.

A group holds six leaky buckets (bytes and operations; total, read, write).
A request may start when no bucket it counts in is over its size; it then
adds its bytes (and operations: one, or size / iops-size) to the levels, and
the levels leak at the average rate. A bucket without a burst rate (`-max`)
may hold a tenth of a second of its average; with one it holds
max * max-length, and while its burst lasts longer than a second a second
level keeps the burst itself to `max` per second.

Every throttle node of a group shares its buckets. Reads and writes queue
apart; requests of one node go in order, and when several nodes wait, the
group serves them round robin (QEMU's tokens). Waiting is an asyncio timer:
nothing blocks the loop, and other nodes and exports go on at their speed.
"""

from __future__ import annotations

import asyncio
import errno
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from exportd.block import register_driver
from exportd.block.node import BlockNode, BlockStatus, Perm, Prealloc
from exportd.errors import BlockError, QMPError

THROTTLE_VALUE_MAX = 1_000_000_000_000_000  # QEMU's THROTTLE_VALUE_MAX
UINT_MAX = (1 << 32) - 1

# QEMU's BucketType order: the validity checks go through them in this order
BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
# the buckets a read (0) or write (1) must find room in, and fills
CHECKED = (("bps-total", "iops-total", "bps-read", "iops-read"),
           ("bps-total", "iops-total", "bps-write", "iops-write"))
# ThrottleLimits members (qapi/block-core.json), which are also the
# throttle-group's legacy flat properties with an "x-" in front
LIMIT_KEYS = tuple(f"{b}{s}" for b in BUCKETS for s in ("", "-max", "-max-length")) + ("iops-size",)


@dataclass
class LeakyBucket:
    avg: int = 0  # units per second (0: no limit)
    max: int = 0  # burst rate in units per second (0: none)
    burst_length: int = 1  # seconds the burst may last
    level: float = 0.0
    burst_level: float = 0.0

    def leak(self, delta_s: float) -> None:
        self.level = max(self.level - self.avg * delta_s, 0.0)
        if self.burst_length > 1:
            self.burst_level = max(self.burst_level - self.max * delta_s, 0.0)

    def wait(self) -> float:
        """Seconds until a request may go (util/throttle.c throttle_compute_wait)."""
        if not self.avg:
            return 0.0
        if not self.max:
            # a tenth of a second of the average lets short bursts through
            bucket_size, burst_bucket_size = self.avg / 10, 0.0
        else:
            bucket_size, burst_bucket_size = self.max * self.burst_length, self.max / 10
        extra = self.level - bucket_size
        if extra > 0:
            return extra / self.avg
        if self.burst_length > 1:
            extra = self.burst_level - burst_bucket_size
            if extra > 0:
                return extra / self.max
        return 0.0

    def fill(self, units: float) -> None:
        self.level += units
        if self.burst_length > 1:
            self.burst_level += units


@dataclass
class ThrottleConfig:
    """QEMU's ThrottleConfig: the buckets and iops-size."""

    buckets: dict[str, LeakyBucket] = field(default_factory=lambda: {b: LeakyBucket() for b in BUCKETS})
    op_size: int = 0

    def settings(self) -> ThrottleConfig:
        """A copy of the limits with empty buckets."""
        return ThrottleConfig({n: LeakyBucket(b.avg, b.max, b.burst_length) for n, b in self.buckets.items()},
                              self.op_size)

    def set(self, key: str, value: int) -> None:
        """One ThrottleLimits member (unchecked: check() follows)."""
        if key == "iops-size":
            self.op_size = value
            return
        name, _, part = key.partition("-max")
        bucket = self.buckets[name]
        if part == "-length":
            bucket.burst_length = value
        elif key.endswith("-max"):
            bucket.max = value
        else:
            bucket.avg = value

    def apply_limits(self, limits: dict[str, int]) -> None:
        """throttle_limits_to_config(): a ThrottleLimits over this config."""
        for key in LIMIT_KEYS:
            if key not in limits:
                continue
            value = limits[key]
            if key.endswith("-max-length"):
                if value > UINT_MAX:
                    raise QMPError(f"{key} value must be in the range [0, {UINT_MAX}]")
                value %= 1 << 64  # QEMU stores it unsigned
            elif key != "iops-size":
                value %= 1 << 64  # a negative rate becomes huge, as QEMU's uint64_t, and fails check()
            self.set(key, value)

    def check(self) -> None:
        """throttle_is_valid(), with its texts, in its order."""
        b = self.buckets
        for kind in ("bps", "iops"):
            for attr in ("avg", "max"):
                total = getattr(b[f"{kind}-total"], attr)
                if total and (getattr(b[f"{kind}-read"], attr) or getattr(b[f"{kind}-write"], attr)):
                    raise QMPError("bps/iops/max total values and read/write values cannot be used at the same time")
        if self.op_size and not any(b[n].avg for n in ("iops-total", "iops-read", "iops-write")):
            raise QMPError("iops size requires an iops value to be set")
        for bucket in b.values():
            if bucket.avg > THROTTLE_VALUE_MAX or bucket.max > THROTTLE_VALUE_MAX:
                raise QMPError(f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]")
            if not bucket.burst_length:
                raise QMPError("the burst length cannot be 0")
            if bucket.burst_length > 1 and not bucket.max:
                raise QMPError("burst length set without burst rate")
            if bucket.max and bucket.burst_length > THROTTLE_VALUE_MAX // bucket.max:
                raise QMPError("burst length too high for this burst rate")
            if bucket.max and not bucket.avg:
                raise QMPError("bps_max/iops_max require corresponding bps/iops values")
            if bucket.max and bucket.max < bucket.avg:
                raise QMPError("bps_max/iops_max cannot be lower than bps/iops")

    def limits(self) -> dict[str, int]:
        """throttle_config_to_limits(): qom-get of `limits`."""
        out: dict[str, int] = {"iops-size": self.op_size}
        for name, bucket in self.buckets.items():
            out[name], out[f"{name}-max"], out[f"{name}-max-length"] = bucket.avg, bucket.max, bucket.burst_length
        return out


class ThrottleMember:
    """One throttle node's place in its group (QEMU's ThrottleGroupMember):
    its queues of waiting requests and its timers, per direction (0 read, 1 write)."""

    def __init__(self, group: ThrottleGroup) -> None:
        self.group = group
        self.waiting: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (deque(), deque())
        self.woken = [0, 0]  # woken requests that have not run yet: newcomers queue behind them
        self.timers: list[asyncio.TimerHandle | None] = [None, None]
        self.limits_disabled = False  # leaving the group: requests pass

    async def intercept(self, nbytes: int, is_write: bool) -> None:
        """Wait until the group's limits let a request of `nbytes` go, and count it."""
        await self.group.intercept(self, nbytes, int(is_write))


class ThrottleGroup:
    """A throttle-group object: the limits, the buckets every member shares,
    and the round robin among members with waiting requests."""

    qom_type = "throttle-group"

    def __init__(self, oid: str, config: ThrottleConfig) -> None:
        self.id = oid
        self.config = config
        self.previous_leak: float | None = None  # loop time of the last leak
        self.members: list[ThrottleMember] = []
        self.any_timer_armed = [False, False]
        self.tokens: list[ThrottleMember | None] = [None, None]  # whose turn it is

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ThrottleGroup:
        """The object's properties from object-add's validated arguments,
        checked as QEMU's setters check them: the x- ones one by one, `limits`
        as a whole."""
        config = ThrottleConfig()
        for key in LIMIT_KEYS:
            value = args.get(f"x-{key}")
            if value is None:
                continue
            if value < 0:
                raise QMPError("Property values cannot be negative")
            if key.endswith("-max-length") and value > UINT_MAX:
                raise QMPError(f"x-{key} value must be in therange [0, {UINT_MAX}]")  # sic (QEMU 7.2)
            config.set(key, value)
        if "limits" in args:
            config.apply_limits(args["limits"])
            config.check()
        return cls(args["id"], config)

    def load(self) -> None:
        """Completing the object checks the limits once more (QEMU does)."""
        self.config.check()

    def in_use(self) -> bool:
        return bool(self.members)

    # --- qom-get / qom-set of `limits` --------------------------------------------------
    def get_limits(self) -> dict[str, int]:
        return self.config.limits()

    def set_limits(self, limits: dict[str, int]) -> None:
        """New limits over the current ones; the buckets start empty and the
        waiting requests are reconsidered under the new limits."""
        config = self.config.settings()
        config.apply_limits(limits)
        config.check()
        self.config = config
        self.previous_leak = None
        for d in (0, 1):
            self.any_timer_armed[d] = False
            for m in self.members:
                _cancel(m, d)
            for m in self.members:
                if m.waiting[d]:
                    self._schedule_next(m, d)
                    break

    # --- members --------------------------------------------------------------------
    def register(self) -> ThrottleMember:
        member = ThrottleMember(self)
        self.members.append(member)
        for d in (0, 1):
            if self.tokens[d] is None:
                self.tokens[d] = member
        return member

    def unregister(self, member: ThrottleMember) -> None:
        """A node leaves: its waiting requests go unthrottled, its timers stop,
        the turn passes on."""
        member.limits_disabled = True
        for d in (0, 1):
            while member.waiting[d]:
                fut = member.waiting[d].popleft()
                if not fut.done():
                    member.woken[d] += 1
                    fut.set_result(None)
            if member.timers[d] is not None:
                _cancel(member, d)
                self.any_timer_armed[d] = False
            if self.tokens[d] is member:
                rest = [m for m in self.members if m is not member]
                self.tokens[d] = rest[0] if rest else None
        self.members.remove(member)
        for d in (0, 1):
            for m in self.members:
                if m.waiting[d]:
                    self._schedule_next(m, d)
                    break

    # --- scheduling (block/throttle-groups.c) ------------------------------------------
    async def intercept(self, member: ThrottleMember, nbytes: int, d: int) -> None:
        if member.limits_disabled:
            return
        token = self._next_token(member, d)
        must_wait = self._schedule_timer(token, d)
        if must_wait or member.waiting[d] or member.woken[d]:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            member.waiting[d].append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.cancelled():
                    _discard(member.waiting[d], fut)
                else:  # woken, then cancelled before it ran: the next one's turn
                    member.woken[d] -= 1
                    self._schedule_next(member, d)
                raise
            member.woken[d] -= 1
            if member.limits_disabled:
                return
        self._account(nbytes, d)
        self._schedule_next(member, d)

    def _account(self, nbytes: int, d: int) -> None:
        """throttle_account(): the request's bytes and operations into its buckets."""
        op_size = self.config.op_size
        units = nbytes / op_size if op_size and nbytes > op_size else 1.0
        b = self.config.buckets
        for name in CHECKED[d]:
            b[name].fill(nbytes if name.startswith("bps") else units)

    def _compute_wait(self, d: int, now: float) -> float:
        """Leak for the time gone by, then the longest wait of the buckets a
        request of direction `d` counts in."""
        if self.previous_leak is not None and now > self.previous_leak:
            delta = now - self.previous_leak
            for bucket in self.config.buckets.values():
                bucket.leak(delta)
        self.previous_leak = now
        return max(self.config.buckets[name].wait() for name in CHECKED[d])

    def _schedule_timer(self, member: ThrottleMember, d: int) -> bool:
        """Whether a request of `member` must wait; if so, make sure a timer
        will wake the group (one armed timer per direction in the group)."""
        if member.limits_disabled:
            return False
        if self.any_timer_armed[d]:
            return True
        loop = asyncio.get_running_loop()
        now = loop.time()
        wait = self._compute_wait(d, now)
        if wait <= 0:
            return False
        if member.timers[d] is None:
            member.timers[d] = loop.call_at(now + wait, self._timer_fired, member, d)
        self.tokens[d] = member
        self.any_timer_armed[d] = True
        return True

    def _timer_fired(self, member: ThrottleMember, d: int) -> None:
        member.timers[d] = None
        self.any_timer_armed[d] = False
        if not self._restart_queue(member, d):
            self._schedule_next(member, d)

    def _restart_queue(self, member: ThrottleMember, d: int) -> bool:
        """Wake the first waiting request of `member`; False if it has none."""
        queue = member.waiting[d]
        while queue:
            fut = queue.popleft()
            if not fut.done():
                member.woken[d] += 1
                fut.set_result(None)
                return True
        return False

    def _next_token(self, member: ThrottleMember, d: int) -> ThrottleMember:
        """The next member after the current token, round robin, that has
        waiting requests; `member` when none has."""
        start = self.tokens[d]
        if start is None or start not in self.members:
            return member
        i = self.members.index(start)
        n = len(self.members)
        for step in range(1, n + 1):
            token = self.members[(i + step) % n]
            if token.waiting[d]:
                return token
        return member

    def _schedule_next(self, member: ThrottleMember, d: int) -> None:
        """After a request went (or gave up its turn): wake the next one now
        if the limits allow, else leave it to a timer."""
        token = self._next_token(member, d)
        if not token.waiting[d]:
            return
        if self._schedule_timer(token, d):
            return
        if self._restart_queue(member, d):  # QEMU prefers the current member
            token = member
        else:
            _cancel(token, d)  # QEMU's timer_mod(now): the token's timer fires at once
            loop = asyncio.get_running_loop()
            token.timers[d] = loop.call_at(loop.time(), self._timer_fired, token, d)
            self.any_timer_armed[d] = True
        self.tokens[d] = token


def _cancel(member: ThrottleMember, d: int) -> None:
    timer = member.timers[d]
    if timer is not None:
        timer.cancel()
        member.timers[d] = None


def _discard(queue: deque[asyncio.Future[None]], fut: asyncio.Future[None]) -> None:
    try:
        queue.remove(fut)
    except ValueError:
        pass


async def _nothing_to_undo() -> None:
    """A reopen's abort when its prepare changed nothing."""


def _describe(node: BlockNode) -> dict[str, Any]:
    """A node as the options of QEMU's json: file names (bdrv_refresh_filename)."""
    name = node.filename()
    if name.startswith("json:"):
        return dict(json.loads(name[5:]))
    if node.driver in ("file", "host_device"):
        return {"driver": node.driver, "filename": name}
    child = node.child("file")
    return {"driver": node.driver, "file": _describe(child)} if child is not None else {"driver": node.driver}


def find_group(daemon: Any, name: str) -> ThrottleGroup:
    """The throttle-group object `name` of the daemon, with QEMU's text."""
    from exportd.objects import registry_of

    group = registry_of(daemon).get(name)
    if not isinstance(group, ThrottleGroup):
        raise BlockError(f"Throttle group '{name}' does not exist")
    return group


@register_driver
class ThrottleNode(BlockNode):
    """The throttle filter: its `file` child's data, each request let through
    by the group's limits. Never a fast path (map_now None): every request
    must pass intercept()."""

    driver = "throttle"
    option_members = frozenset({"file", "throttle-group"})
    reopen_members = frozenset({"throttle-group"})

    def __init__(self, node_name: str, *, read_only: bool) -> None:
        super().__init__(node_name, read_only=read_only)
        self.member: ThrottleMember | None = None
        self.daemon: Any = None

    @classmethod
    async def open(cls, graph: Any, node_name: str, options: dict[str, Any]) -> ThrottleNode:
        read_only = options["read-only"]
        node = cls(node_name, read_only=read_only)
        # QEMU opens the file before it looks for the group
        child = await graph.open_child(options["file"], node, "file", Perm(0), Perm.ALL, read_only=read_only)
        node.daemon = graph.daemon  # where its group is looked up again on reopen
        node.member = find_group(graph.daemon, options["throttle-group"]).register()
        node.request_alignment = child.request_alignment
        return node

    async def close(self) -> None:
        if self.member is not None:
            self.member.group.unregister(self.member)
            self.member = None

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        """blockdev-reopen may move the node to another group (which must exist)."""

        daemon = getattr(self, "daemon", None)
        new = find_group(daemon, options["throttle-group"])

        async def commit() -> None:
            if self.member is not None and self.member.group is not new:
                self.member.group.unregister(self.member)
                self.member = new.register()

        return commit, _nothing_to_undo

    @property
    def file(self) -> BlockNode:
        return self.child_edges["file"].node

    @property
    def group(self) -> ThrottleGroup | None:
        return self.member.group if self.member is not None else None

    def filename(self) -> str:
        """QEMU's json: name of a throttle node (its options are not a plain file name)."""
        group = self.group.id if self.group is not None else ""
        desc = {"throttle-group": group, "driver": "throttle", "file": _describe(self.file)}
        return "json:" + json.dumps(desc)

    def apply_permissions(self, perm: Perm, shared: Perm) -> None:
        # a filter: its users' needs are its file's
        edge = self.child_edges.get("file")
        if edge is not None:
            edge.node.update(edge, perm, shared)

    async def _intercept(self, nbytes: int, is_write: bool) -> None:
        if self.member is not None:
            await self.member.intercept(nbytes, is_write)

    # --- I/O: throttled ------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        await self._intercept(length, False)
        return await self.file.read(offset, length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "node is read-only")
        await self._intercept(len(data), True)
        await self.file.write(offset, data, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "node is read-only")
        await self._intercept(length, True)
        await self.file.write_zeroes(offset, length, may_unmap=may_unmap)

    async def discard(self, offset: int, length: int) -> None:
        await self._intercept(length, True)
        await self.file.discard(offset, length)

    # --- the rest passes to the file unthrottled, as in QEMU ----------------------------------
    async def flush(self) -> None:
        await self.file.flush()

    async def truncate(self, size: int, *, prealloc: Prealloc = Prealloc.OFF, exact: bool = True) -> None:
        self.check_resize_allowed()
        await self.file.truncate(size, prealloc=prealloc, exact=exact)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return await self.file.block_status(offset, length)

    def getlength(self) -> int:
        return self.file.getlength()

    def refresh_length(self) -> int:
        return self.file.refresh_length()

    async def allocated_size(self) -> int:
        return await self.file.allocated_size()
