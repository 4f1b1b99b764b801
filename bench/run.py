#!/usr/bin/env python3
"""exportd benchmark harness (`make bench`, `make bench QUICK=1`). See bench/README.md.

Runs fio workloads and QMP control-plane measurements against exportd and its
peers (direct access, qemu-storage-daemon plain and with an iothread, a pyfuse3
filesystem, libfuse's passthrough_hp over /dev/fuse and io_uring) on tmpfs
images, and writes latest.json, latest.md and latest.png into --out.

It refuses to run (and to render a table) when the 1-minute load average is
above 0.5, unless --allow-load is given; the table then says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
PROJECT_README = BENCH_DIR.parent / "README.md"
README_BEGIN = "<!-- latest-results:begin (written by bench/run.py) -->"
README_END = "<!-- latest-results:end -->"

sys.path.insert(0, str(BENCH_DIR))

from harness.loadcheck import LOAD_LIMIT, load_check, refusal  # noqa: E402
from harness.nbd_driver import run_section as run_nbd_driver  # noqa: E402
from harness.peers import fio_peers  # noqa: E402
from harness.plot import plot_ratios  # noqa: E402
from harness.report import render_markdown  # noqa: E402
from harness.scratch import Interrupted, raise_on_termination_signals  # noqa: E402
from harness.session import BenchRun, Settings, log  # noqa: E402


def find_exportd(explicit: str | None) -> tuple[list[str] | None, str]:
    """The exportd command, or None and the reason it is missing."""
    if explicit:
        return [explicit], ""
    candidate = REPO / ".venv" / "bin" / "exportd"
    if candidate.exists():
        return [str(candidate)], ""
    found = shutil.which("exportd")
    if found:
        return [found], ""
    return None, f"no exportd executable ({candidate} missing: run make setup)"


def default_passthrough_hp() -> Path:
    """Where bench/peers/build_passthrough_hp.sh leaves libfuse's example."""
    cache = os.environ.get("EXPORTD_BENCH_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "exportd-bench")
    return Path(cache) / "libfuse" / "build" / "example" / "passthrough_hp"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 64 MiB images, 1 s per fio run, 1 repetition")
    p.add_argument("--only", default="",
                   help="comma-separated peer names or families (raw, qcow2, null-co); "
                        "the control plane runs when unrestricted or with null-co or 'control', "
                        "the block-job section when unrestricted or with 'jobs', "
                        "the NBD section when unrestricted or with 'nbd', "
                        "the NBD driver section when unrestricted or with 'nbd-driver'")
    p.add_argument("--no-control", action="store_true", help="skip the QMP control-plane figures")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--runtime", type=float, help="seconds per fio run (overrides the mode)")
    p.add_argument("--reps", type=int, help="fio repetitions (overrides the mode)")
    p.add_argument("--image-mib", type=int, help="image size in MiB (overrides the mode)")
    p.add_argument("--exportd", help="exportd executable (default: .venv/bin/exportd)")
    p.add_argument("--exportd-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment for the exportd peers, e.g. a lever's switch (repeatable)")
    p.add_argument("--note", default="", help="free text recorded with the results (which lever...)")
    p.add_argument("--pyfuse3-python", default=sys.executable,
                   help="interpreter with pyfuse3 and trio for the pyfuse3 peer")
    p.add_argument("--passthrough-hp", type=Path, default=default_passthrough_hp(),
                   help="libfuse's passthrough_hp (default: where bench/peers/build_passthrough_hp.sh "
                        "builds it)")
    p.add_argument("--allow-load", action="store_true",
                   help=f"run and write the table even when the 1-minute load average is above "
                        f"{LOAD_LIMIT:g} (the table is then marked as measured on a loaded machine)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only re-render latest.md/png from an existing record")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings.for_mode(args.quick)
    overrides = {}
    if args.runtime is not None:
        overrides |= {"runtime_s": args.runtime, "qd1_runtime_s": args.runtime,
                      "section_runtime_s": args.runtime}
    if args.reps is not None:
        overrides["reps"] = overrides["qd1_reps"] = max(1, args.reps)
        overrides["control_reps"] = max(1, args.reps)
    if args.image_mib is not None:
        overrides["image_size"] = args.image_mib * 2**20
    return dataclasses.replace(s, **overrides)


def _replace_between_markers(path: Path, block: str) -> None:
    if not path.exists():
        return
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        return
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(f"{head}{README_BEGIN}\n{block}\n{README_END}{tail}")


def update_readme(markdown: str) -> None:
    """Show the latest results between the markers: the whole table and the chart
    in bench/README.md; the header, the targets table and the chart in the
    project's README.md."""
    body = markdown.replace("\n## ", "\n### ").replace("# exportd benchmark: latest run\n", "")
    _replace_between_markers(README, f"\n![ratios](results/latest.png)\n{body}")
    targets = body.split("\n### ")
    summary = [targets[0]] + ["### " + t for t in targets[1:] if t.startswith("Targets")]
    _replace_between_markers(
        PROJECT_README,
        "\n![ratios](bench/results/latest.png)\n" + "\n".join(summary).rstrip()
        + "\n\nEvery figure, the peers' command lines and the levers: "
        "[bench/README.md](bench/README.md).\n",
    )


def write_outputs(record: dict, out: Path) -> None:
    """latest.json, latest.md, latest.png (and the README's copy of the table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    markdown = render_markdown(record)
    (out / "latest.md").write_text(markdown)
    if plot_ratios(record, out / "latest.png"):
        log(f"wrote {out / 'latest.png'}")
    else:
        log("no chart (matplotlib not installed, or no peer to chart)")
    log(f"wrote {out / 'latest.json'} and {out / 'latest.md'}")
    if out.resolve() == DEFAULT_OUT.resolve():
        update_readme(markdown)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.render:
        record = json.loads(args.render.read_text())
        check = record.get("load_check")
        if check and args.allow_load:
            check["allowed"] = True
        why = refusal(check)
        if why:
            print(f"no table: {why}", file=sys.stderr)
            return 3
        write_outputs(record, args.out)
        return 0
    check = load_check(os.getloadavg()[0], args.allow_load)
    why = refusal(check)
    if why:
        print(f"not running: {why}", file=sys.stderr)
        return 3
    only = [x.strip() for x in args.only.split(",") if x.strip()] or None
    if only:
        known = {"control", "jobs", "nbd", "nbd-driver"} | {p.name for p in fio_peers()} | {p.family for p in fio_peers()}
        unknown = [x for x in only if x not in known]
        if unknown:
            print(f"--only: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}",
                  file=sys.stderr)
            return 2
    control = not args.no_control and (only is None or "control" in only or "null-co" in only)
    jobs = only is None or "jobs" in only
    nbd = only is None or "nbd" in only
    exportd_cmd, missing = find_exportd(args.exportd)
    for tool in ("fio",):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    exportd_env = {}
    for item in args.exportd_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"--exportd-env wants NAME=VALUE, not {item!r}", file=sys.stderr)
            return 2
        exportd_env[name] = value
    raise_on_termination_signals()
    run = BenchRun(settings_from(args), only, control, exportd_cmd, missing,
                   args.pyfuse3_python, REPO, exportd_env=exportd_env, note=args.note, jobs=jobs, nbd=nbd,
                   passthrough_hp=args.passthrough_hp)
    try:
        record = run.run()
        if only is None or "nbd-driver" in only:
            s = run.settings
            record["nbd_driver"] = run_nbd_driver(s.mode, s.image_size, s.section_runtime_s, s.reps, exportd_cmd,
                                                  missing, exportd_env, log)
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"interrupted ({exc or 'SIGINT'}): cleaned up, no results written")
        return 130
    record["load_check"] = check
    write_outputs(record, args.out)
    print(render_markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
