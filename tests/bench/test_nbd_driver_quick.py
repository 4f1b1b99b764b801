"""The NBD driver section of the benchmark harness (issue 13, driver side)
keeps working: `bench/run.py --quick --only nbd-driver` (a real nbdkit
server, exportd's nbd driver behind a FUSE export and nbdfuse as clients,
real fio on the mounted files), into a temporary directory (~20 s)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.bench.test_quick import harness_run, pytestmark  # noqa: F401  (same skips)

pytestmark = pytestmark + [  # noqa: F811
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("nbdkit", "nbdfuse", "nbdinfo")),
                       reason="nbdkit, nbdfuse or nbdinfo not installed"),
]
FIGURES = {"rr1", "rw1", "rr16", "rw16", "sr", "sw"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench-nbd-driver-out")
    with harness_run(["--quick", "--only", "nbd-driver", "--runtime", "0.3"], out, timeout=150) as proc:
        yield proc, out


def test_harness_exits_cleanly(quick_run) -> None:
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "latest.json").read_text())
    assert record["only"] == ["nbd-driver"] and record["peers"] == {}
    assert record["nbd"] is None and record["jobs"] is None


def test_both_clients_are_measured_on_one_server(quick_run) -> None:
    _, out = quick_run
    section = json.loads((out / "latest.json").read_text())["nbd_driver"]
    assert section["server"]["status"] in ("ok", "stopped"), section["server"]
    assert section["server"]["multi_conn"] is True  # what lets nbdfuse use several connections
    for name in ("exportd", "nbdfuse"):
        client = section["clients"][name]
        assert client["status"] in ("ok", "stopped"), client
        assert section["errors"][name] == [], section["errors"][name]
        # both mounted files were served by the one server's socket
        assert any("nbd-nbdkit/nbd.sock" in str(a) for a in client["command"]), client
    assert set(section["runs"]) == FIGURES
    for key, per_client in section["runs"].items():
        for name in ("exportd", "nbdfuse"):
            (run,) = per_client[name]
            assert run["value"] > 0 and run["loadavg_1min"] >= 0, (key, name, run)
            assert run["cpu_us_per_io"] > 0, (key, name, run)  # the client process did the work
        entry = section["summary"][key]
        ratio = entry["clients"]["exportd"]["median"] / entry["clients"]["nbdfuse"]["median"]
        assert entry["ratio"] == pytest.approx(ratio)


def test_markdown_has_the_table(quick_run) -> None:
    _, out = quick_run
    md = (out / "latest.md").read_text()
    assert "## NBD driver (issue 13)" in md
    assert re.search(r"\| 4 KiB random read, QD1 \| [\d,]+ IOPS \| [\d,]+ IOPS \| [\d.]+( \[[^]]*\])? \| [\d.]+x \|", md)
    assert re.search(r"\| 1 MiB sequential write \| [\d,]+ MiB/s \| [\d,]+ MiB/s \|", md)
    assert "| nbdfuse | ok |" in md and "| exportd | ok |" in md
