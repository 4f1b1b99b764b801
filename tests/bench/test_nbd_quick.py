"""The NBD section of the benchmark harness (issue 13) keeps working:
`bench/run.py --quick --only nbd` (real qemu-nbd, qemu-storage-daemon, nbdkit
and exportd servers, real fio nbd engine and nbdcopy), into a temporary
directory (~30 s). exportd is measured when its --help names --nbd-server,
and otherwise reported "not available"."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.bench.test_quick import REPO, harness_run, pytestmark  # noqa: F401  (same skips)

pytestmark = pytestmark + [  # noqa: F811
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("nbdcopy", "nbdinfo", "qemu-nbd")),
                       reason="nbdcopy, nbdinfo or qemu-nbd not installed"),
]
FIGURES = {"rr1", "rw1", "rr16", "rw16", "sr", "sw", "copy-out", "copy-in"}


def _exportd_has_nbd() -> bool:
    out = subprocess.run([str(REPO / ".venv" / "bin" / "exportd"), "--help"],
                         capture_output=True, text=True, timeout=60)
    return "--nbd-server" in out.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench-nbd-out")
    with harness_run(["--quick", "--only", "nbd", "--runtime", "0.3"], out, timeout=150) as proc:
        yield proc, out


def test_harness_exits_cleanly(quick_run) -> None:
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "latest.json").read_text())
    assert record["only"] == ["nbd"] and record["peers"] == {} and record["jobs"] is None


def test_every_server_is_measured_or_says_why(quick_run) -> None:
    _, out = quick_run
    nbd = json.loads((out / "latest.json").read_text())["nbd"]
    expected = {"qsd", "qemu-nbd"} | ({"nbdkit"} if shutil.which("nbdkit") else set())
    if _exportd_has_nbd():
        expected.add("exportd")
    else:
        assert nbd["servers"]["exportd"]["status"] == "unavailable"
        assert nbd["servers"]["exportd"]["reason"].startswith("not available")
    for name in expected:
        server = nbd["servers"][name]
        assert server["status"] == "ok", server
        assert nbd["errors"][name] == [], nbd["errors"][name]
        # multi-conn is what lets nbdcopy use several connections
        assert server["multi_conn"] is True, server
    assert set(nbd["runs"]) == FIGURES
    for key, per_server in nbd["runs"].items():
        for name in expected:
            (run,) = per_server[name]
            assert run["value"] > 0 and run["loadavg_1min"] >= 0, (key, name, run)
    for key, entry in nbd["summary"].items():
        assert set(entry["targets"]) == {"qsd", "qemu-nbd"}
        for ref, status in entry["targets"].items():
            ratio = entry["ratios"].get(ref, {}).get("of_medians")
            assert status == ("n/a" if ratio is None else "met" if ratio > 1 else "missed"), key


def test_markdown_has_the_tables(quick_run) -> None:
    _, out = quick_run
    md = (out / "latest.md").read_text()
    assert "## NBD export (issue 13)" in md
    assert re.search(r"\| 4 KiB random read, QD1 \| .* IOPS \|", md)
    assert re.search(r"\| nbdcopy of the image in \(from a tmpfs file\) \| > 1x qemu-nbd \| "
                     r"(n/a|[\d.]+x) \| (met|\*\*missed\*\*|n/a) \|", md)
    assert "### NBD servers" in md
