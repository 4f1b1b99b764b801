#!/usr/bin/env python3
"""Compare two benchmark records (latest.json), e.g. without and with a lever.

    python bench/compare.py BEFORE.json AFTER.json [--peer exportd-raw ...]

Prints a markdown table of every figure present in both runs, with
AFTER relative to BEFORE oriented so that > 1 means AFTER is better, and the
same for the figure's ratio to qemu-storage-daemon, which cancels part of
the machine's drift between the two runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.figures import CONTROL_METRICS, HIGHER_IS_BETTER  # noqa: E402
from harness.report import figures_from_record  # noqa: E402


def _titles(record: dict) -> dict[str, tuple[str, str]]:
    titles = {w["key"]: (w["title"], w["unit"]) for w in record["workloads"]}
    return titles | dict(CONTROL_METRICS)


def compare(before: dict, after: dict, peers: list[str] | None) -> str:
    fb, fa = figures_from_record(before), figures_from_record(after)
    titles = _titles(after)
    lines = [
        f"before: {before['mode']} run {before['started']} {before.get('note', '')}".rstrip(),
        f"after: {after['mode']} run {after['started']} {after.get('note', '')}".rstrip(),
        "",
        "| figure | peer | before | after | after vs before | vs qsd before | vs qsd after |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, (title, unit) in titles.items():
        for peer in after["peers"]:
            if peers and peer not in peers:
                continue
            b, a = fb.get(peer, key), fa.get(peer, key)
            if b is None or a is None or b <= 0 or a <= 0:
                continue
            change = a / b if HIGHER_IS_BETTER[key] else b / a
            qb, qa = fb.ratio(peer, key, "qsd"), fa.ratio(peer, key, "qsd")
            lines.append(f"| {title} | {peer} | {b:,.2f} {unit} | {a:,.2f} {unit} | {change:.2f}x | "
                         f"{'' if qb is None else f'{qb:.2f}x'} | {'' if qa is None else f'{qa:.2f}x'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--peer", action="append", help="only this peer (repeatable)")
    args = p.parse_args(argv)
    before = json.loads(args.before.read_text())
    after = json.loads(args.after.read_text())
    sys.stdout.write(compare(before, after, args.peer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
