"""The block-job section of the benchmark harness (issue 12) keeps working:
`bench/run.py --quick --only jobs` (real exportd and qemu-storage-daemon,
real mirrors, real fio on real FUSE mounts), into a temporary directory.
A file of its own so that test_quick.py stays short (~17 s more here)."""

from __future__ import annotations

import json
import re

import pytest

from tests.bench.test_quick import harness_run, pytestmark  # noqa: F401  (same skips)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench-jobs-out")
    with harness_run(["--quick", "--only", "jobs", "--runtime", "0.3"], out, timeout=120) as proc:
        yield proc, out


def test_harness_exits_cleanly(quick_run) -> None:
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "latest.json").read_text())
    assert record["only"] == ["jobs"] and record["peers"] == {} and record["fio"] == {}


def test_jobs_section_measures_reads_with_and_without_a_job(quick_run) -> None:
    _, out = quick_run
    record = json.loads((out / "latest.json").read_text())
    jobs = record["jobs"]
    for name in ("exportd", "qsd"):
        assert jobs["daemons"][name]["status"] == "ok", jobs["daemons"][name]
        assert jobs["errors"][name] == [], jobs["errors"][name]
        for cond in ("without", "with"):
            (run,) = jobs["runs"][name][cond]
            assert run["ios"] > 0 and 0 < run["p50_us"] <= run["p99_us"] <= run["max_us"], run
        job = jobs["runs"][name]["with"][0]["job"]
        # the job really copied while fio read, and its rate came from query-block-jobs
        assert job["bytes"] > 0 and job["bytes_per_s"] > 0 and job["duty"] > 0, job
        ratio = jobs["summary"][name]["p99_us"]["with_over_without"]
        assert ratio["min"] == ratio["median"] == ratio["max"] > 0
        speed = jobs["speed"][name]
        assert speed["speed"] == 8 << 20 and speed["reported_speed"] == 8 << 20
        # a limit, not a suggestion: far below what the same mirror does at full speed
        assert 0 < speed["bytes_per_s"] < job["bytes_per_s"]
    # exportd copies at the rate it was given, neither above it nor far below it
    # (qemu-storage-daemon moves in 16 MiB steps, too coarse for a 3 s window)
    assert 0.5 <= jobs["speed"]["exportd"]["ratio"] <= 1.25, jobs["speed"]["exportd"]
    assert "exportd_over_qsd" in jobs["summary"]
    md = (out / "latest.md").read_text()
    assert "## Block jobs (issue 12)" in md
    assert re.search(r"\| exportd \| p50 read latency \| [\d,.]+ us \| [\d,.]+ us \| [\d.]+x \|", md)
    assert "### `speed` as a rate limit" in md
