#!/usr/bin/env python3
"""Hostile clients against exportd and qemu-storage-daemon, side by side
(issue 16): for each abuse, the worst wait of a 4 KiB O_DIRECT FUSE read
and of a second QMP client's query-version while it runs, and what the
abusive client itself got. The abuses and probes are tests/support/abuse.py
(the tests/abuse tier runs the same ones against exportd with bounds).

    .venv/bin/python bench/abuse.py [--out DIR] [--only a,b]

Writes DIR/abuse.json and DIR/abuse.md (default bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import abuse  # noqa: E402

PEERS = ("exportd", "qsd")


def run_peer(kind: str, names: list[str], workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in names:
        # a daemon of its own for each abuse: one that an abuse left stuck
        # (qsd on the escaped 28 MiB string) must not spoil the next figure
        print(f"{kind}: {name}", file=sys.stderr, flush=True)
        with abuse.running(kind, workdir / kind / name) as target:
            results[name] = abuse.probe(target, abuse.ABUSES[name], timeout=120)
    print(f"{kind}: open-file limit", file=sys.stderr, flush=True)
    with abuse.running(kind, workdir / f"{kind}-fd", open_files=256) as target:
        results["open-file-limit"] = {"abuse": abuse.exports_until_refused(target), "alive": target.alive}
    return results


def facts_text(facts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in facts.items() if k != "errors") + (
        f", errors={facts['errors']}" if facts.get("errors") else "")


def table(results: dict[str, dict[str, Any]], load: dict[str, Any]) -> str:
    lines = ["# Hostile clients: what an innocent user waits meanwhile", "",
             f"load average before: {load['before']}, after: {load['after']} (2-core machine)", "",
             "| abuse | exportd FUSE read worst / p99 | exportd QMP worst / p99 | "
             "qsd FUSE read worst / p99 | qsd QMP worst / p99 |",
             "|---|---|---|---|---|"]
    names = [n for n in results["exportd"] if n != "open-file-limit"]
    for name in names:
        cells = []
        for kind in PEERS:
            r = results[kind][name]
            for probe in ("fuse_read", "qmp"):
                p = r[probe]
                cells.append(f"{p['worst_ms']:.0f} / {p['p99_ms']:.1f} ms" + ("" if r["alive"] else " (died)"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "qemu-storage-daemon's monitor chardev serves one client at a time: its probe "
              "client has a monitor of its own, and the connect burst meets a busy socket.",
              "", "What the abusive client got (failed: no answer within 120 s):", ""]
    for name in [*names, "open-file-limit"]:
        for kind in PEERS:
            lines.append(f"- {name}, {kind}: {facts_text(results[kind][name]['abuse'])}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--only", help="abuses, comma-separated: " + ",".join(abuse.ABUSES))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(abuse.ABUSES)
    workdir = Path(tempfile.mkdtemp(prefix="exportd-abuse-", dir="/dev/shm"))
    load = {"before": round(os.getloadavg()[0], 2)}
    try:
        results = {kind: run_peer(kind, names, workdir) for kind in PEERS}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load["after"] = round(os.getloadavg()[0], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "abuse.json").write_text(json.dumps({"when": time.time(), "load": load, "results": results},
                                                    indent=1))
    text = table(results, load)
    (args.out / "abuse.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
