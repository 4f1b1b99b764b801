"""No client can stall the loop (issue 16): each hostile client runs
against a real exportd while a FUSE export of the same daemon is read
(4 KiB, O_DIRECT) and a second QMP client sends query-version, both timed
from threads of this process. The abusive client still gets all it is owed.

The goal is no wait over 50 ms; this shared 2-core machine adds hiccups
of its own (up to a few hundred ms now and then when other work runs), so
the bounds tested are: the 99th percentile under 50 ms, at most 3 waits
over 50 ms, none over 1 s. Before this work the same runs gave stalls of
1.4 to 6 s and hundreds of waits over 100 ms. bench/abuse.py prints the
figures next to qemu-storage-daemon's.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import abuse
from tests.support.abuse import Target

P99_S = 0.050
OVER_50MS = 3
WORST_S = 1.0


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with abuse.running("exportd", tmp_path_factory.mktemp("abuse")) as t:
        yield t


def check_probes(result: dict[str, Any]) -> None:
    assert result["alive"], "the daemon died"
    for probe in ("fuse_read", "qmp"):
        r = result[probe]
        assert not r["errors"], (probe, result)
        assert r["count"] > 20, (probe, result)  # the probe ran all along
        assert r["p99_ms"] <= P99_S * 1000, (probe, result)
        assert r["over_50ms"] <= OVER_50MS, (probe, result)
        assert r["worst_ms"] <= WORST_S * 1000, (probe, result)


def test_query_flood_without_reading(target: Target) -> None:
    r = abuse.probe(target, lambda t: abuse.query_flood(t, seconds=2))
    facts = r["abuse"]
    assert facts["sent"] > 100 and facts["replies"] == facts["sent"] and facts["in_order"], r
    check_probes(r)


def test_json_array_past_the_token_limit(target: Target) -> None:
    r = abuse.probe(target, lambda t: abuse.big_array(t, mib=20))
    # one reply for the whole 20 MiB message (10 Mi tokens), not one per token
    assert r["abuse"] == {"error_replies": 1, "errors": {"JSON token count limit exceeded": 1}}, r
    check_probes(r)


@pytest.mark.parametrize("escaped", [False, True], ids=["plain", "escaped"])
def test_28_mib_string(target: Target, escaped: bool) -> None:
    r = abuse.probe(target, lambda t: abuse.big_string(t, escaped=escaped))
    assert r["abuse"] == {"id": "big", "reply": "Parameter 'x' is unexpected"}, r
    check_probes(r)


def test_connect_burst(target: Target) -> None:
    r = abuse.probe(target, lambda t: abuse.connect_burst(t, clients=200, seconds=2))
    facts = r["abuse"]
    assert facts["connections"] > 500 and facts["no_greeting"] == 0 and facts["refused"] == 0, r
    check_probes(r)


def test_nbd_flood(target: Target) -> None:
    r = abuse.probe(target, lambda t: abuse.nbd_flood(t, requests=100_000))
    assert r["abuse"]["replies"] == r["abuse"]["requests"] and r["abuse"]["bad_replies"] == 0, r
    check_probes(r)


def test_nbd_client_that_never_reads(target: Target) -> None:
    r = abuse.probe(target, lambda t: abuse.nbd_never_reads(t, seconds=2))
    assert "failed" not in r["abuse"], r
    check_probes(r)


def test_open_file_limit_leaves_room_for_qmp(tmp_path: Path) -> None:
    with abuse.running("exportd", tmp_path, open_files=256) as t:
        facts = abuse.exports_until_refused(t)
        assert facts["exports"] > 100, facts
        assert facts["refused_with"].startswith("Too many open files: block-export-add refused with "), facts
        assert "ulimit -n" in facts["refused_with"], facts
        assert facts["new_client"] == "ok", facts
        # filled again, quit still works
        c = abuse.RawClient(t.sock)
        c.negotiate()
        made = 0
        while "return" in c.cmd("block-export-add", {"type": "fuse", "id": f"f{made}", "node-name": "null0",
                                                     "mountpoint": str(_touch(tmp_path / f"f{made}.raw"))}):
            made += 1
        late = abuse.RawClient(t.sock)
        late.negotiate()
        assert late.cmd("quit") == {"return": {}}
        assert t.proc is not None
        assert t.proc.wait(30) == 0
        c.close()
        late.close()
    mounts = subprocess.run(["grep", str(tmp_path), "/proc/mounts"], capture_output=True, text=True).stdout
    assert mounts == ""


def _touch(p: Path) -> Path:
    p.touch()
    return p
