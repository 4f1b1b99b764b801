"""latest.md from a run record (latest.json): figures, ratios, targets, peers."""

from __future__ import annotations

import re

from .figures import BEST_OF, CONTROL_METRICS, Figures, median
from .loadcheck import banner

REASON_CHARS = 90


def _scratchless(text: str) -> str:
    """Scratch paths differ per run and say nothing: shorten them."""
    return re.sub(r"/dev/shm/exportd-bench-\d+", "$SCRATCH", text)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _short(text: str, limit: int = REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(value: float, unit: str) -> str:
    if unit in ("IOPS", "MiB/s"):
        return f"{value:,.0f}"
    return f"{value:,.2f}" if value < 100 else f"{value:,.1f}"


def _ratio(r: float | None) -> str:
    return "" if r is None else f"{r:.2f}x"


def figures_from_record(record: dict) -> Figures:
    figures = Figures({name: p["family"] for name, p in record["peers"].items()})
    for key, value in record["figures"].items():
        peer, metric = key.split("/", 1)
        figures.set(peer, metric, value)
    return figures


def _targets_by_row(record: dict) -> dict[tuple[str, str], list[dict]]:
    rows: dict[tuple[str, str], list[dict]] = {}
    for t in record["targets"]:
        rows.setdefault((t["peer"], t["metric"]), []).append(t)
    return rows


def _target_cells(targets: list[dict]) -> tuple[str, str]:
    if not targets:
        return "", ""
    described = "<br>".join(t["target"] for t in targets)
    statuses = []
    for t in targets:
        if t["value"] is None:
            statuses.append("n/a")
        elif t["target"].startswith("<"):
            statuses.append(f"**{t['status']}**" if t["status"] == "missed" else t["status"])
        else:
            shown = f"{t['status']} ({t['value']:.2f}x)"
            statuses.append(f"**{shown}**" if t["status"] == "missed" else shown)
    return described, "<br>".join(statuses)


STATUS_WORDS = {"unavailable": "unavailable", "start-error": "start error", "failed": "failed"}


def _unavailable(peer: dict) -> str:
    word = STATUS_WORDS.get(peer["status"])
    return f"{word}: {_short(peer['reason'])}" if word else ""


def _header(record: dict) -> list[str]:
    s, m = record["settings"], record["machine"]
    size = s["image_size"]
    size_text = f"{size // 2**30} GiB" if size >= 2**30 else f"{size // 2**20} MiB"
    counts: dict[str, int] = {}
    for t in record["targets"]:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    exportd = m.get("exportd", "")
    qd1 = ""
    if s.get("qd1_reps") and (s["qd1_reps"], s["qd1_runtime_s"]) != (s["reps"], s["runtime_s"]):
        qd1 = f" (4 KiB QD1: {s['qd1_runtime_s']:g} s, {max(s['reps'], s['qd1_reps'])} repetitions)"
    warning = banner(record.get("load_check"))
    lines = [
        "# exportd benchmark: latest run",
        "",
        *([warning, ""] if warning else []),
        f"{record['mode']} run started {record['started']}, {record['duration_s'] / 60:.1f} min; "
        f"images on tmpfs: {size_text}; fio {s['runtime_s']:g} s per run, "
        f"{s['reps']} repetition(s){qd1} interleaved across peers, median [min–max] shown"
        + (f"; control plane: {s['control_cycles']} add+del cycles x {s['control_reps']}, "
           f"{s['memory_exports']} exports for memory." if record.get("control") else ".")
        + (f" Peers restricted to: {', '.join(record['only'])}." if record.get("only") else "")
        + (f" exportd environment: {' '.join(f'{k}={v}' for k, v in record['exportd_env'].items())}."
           if record.get("exportd_env") else "")
        + (f" Note: {record['note']}" if record.get("note") else ""),
        "",
        f"Machine: {m['cpu']} ({m['cpus']} CPUs), {(m['mem_total_kib'] or 0) / 2**20:.1f} GiB RAM, "
        f"kernel {m['kernel']}, {m['os']}; load average {m['loadavg_start'][0]:.2f} at start, "
        f"{m.get('loadavg_end', [0])[0]:.2f} at end. Tools: {m['fio']}; {m['qemu_storage_daemon']}; "
        f"pyfuse3 {m['pyfuse3']}; {exportd if exportd.startswith('exportd') else 'exportd ' + exportd}; commit {m['git_commit'][:12]}"
        + (" (uncommitted changes)" if m.get("git_dirty") else "") + ".",
        "",
    ]
    if record["peers"]:
        lines += [
            "Ratios: > 1 means better than the reference (throughput and IOPS: peer / reference; "
            "time and memory: reference / peer), ratios of medians. *vs qsd* compares with "
            "qemu-storage-daemon on the same kind of node (raw, qcow2, null-co), the best of its "
            "plain, iothread and aio=io_uring configurations per figure where they ran; *vs direct* with fio on "
            "the raw image file itself.",
            "",
        ]
    if record["targets"]:
        lines += [
            "Targets (issue 7): " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            + ("; n/a means the peer or its reference did not run." if counts.get("n/a") else "."),
            "",
        ]
    return lines


# Rows of the issue-17 table: (peer or best-of group, reference, how it reads).
ISSUE17_ROWS = (
    ("exportd-raw", "qsd-raw-best", "exportd raw /dev/fuse / qsd best"),
    ("exportd-raw", "passthrough-hp", "exportd raw /dev/fuse / passthrough_hp /dev/fuse"),
    ("exportd-raw", "passthrough-hp-uring", "exportd raw /dev/fuse / passthrough_hp io_uring"),
    ("exportd-raw-uring", "qsd-raw-best", "exportd raw io_uring / qsd best"),
    ("exportd-raw-uring", "passthrough-hp", "exportd raw io_uring / passthrough_hp /dev/fuse"),
    ("exportd-raw-uring", "passthrough-hp-uring", "exportd raw io_uring / passthrough_hp io_uring"),
    ("exportd-raw-uring", "exportd-raw", "exportd raw io_uring / exportd raw /dev/fuse"),
    ("exportd-raw-uring-threads", "exportd-raw", "exportd raw ring threads / exportd raw /dev/fuse"),
    ("exportd-raw-uring-threads", "exportd-raw-uring", "exportd raw ring threads / loop-driven ring"),
    ("exportd-raw-uring-threads", "passthrough-hp-uring", "exportd raw ring threads / passthrough_hp io_uring"),
    ("passthrough-hp-uring", "passthrough-hp", "passthrough_hp io_uring / passthrough_hp /dev/fuse"),
    ("qsd-raw-iothread", "qsd-raw", "qsd raw iothread / qsd raw plain"),
    ("qsd-raw-aio-uring", "qsd-raw", "qsd raw aio=io_uring / qsd raw plain"),
    ("exportd-qcow2", "qsd-qcow2-best", "exportd qcow2 /dev/fuse / qsd best"),
    ("exportd-qcow2-uring", "qsd-qcow2-best", "exportd qcow2 io_uring / qsd best"),
    ("exportd-qcow2-uring", "exportd-qcow2", "exportd qcow2 io_uring / exportd qcow2 /dev/fuse"),
    ("qsd-qcow2-iothread", "qsd-qcow2", "qsd qcow2 iothread / qsd qcow2 plain"),
    ("qsd-qcow2-aio-uring", "qsd-qcow2", "qsd qcow2 aio=io_uring / qsd qcow2 plain"),
)


def issue17_markdown(record: dict, figures: Figures) -> list[str]:
    """exportd against the strongest peers: one row per comparison, one column
    per workload (ratio of medians, > 1: the first is better)."""
    peers = record["peers"]
    def present(name: str) -> bool:
        return any(m in peers for m in (BEST_OF[name][1] if name in BEST_OF else (name,)))

    rows = [r for r in ISSUE17_ROWS if present(r[0]) or present(r[1])]
    if not rows:
        return []
    workloads = record["workloads"]
    lines = ["## Against the strongest peers (issue 17)", "",
             "Ratios of medians, > 1: the first is faster. *qsd best*: the best of "
             "qemu-storage-daemon's plain, iothread and aio=io_uring configurations, per figure "
             "(which one won is in the last rows). n/a: a peer did not run (see Peers).", "",
             "| comparison | " + " | ".join(w["title"] for w in workloads) + " |",
             "|---|" + "---:|" * len(workloads)]
    for peer, ref, title in rows:
        cells = [_ratio(figures.ratio(peer, w["key"], ref)) or "n/a" for w in workloads]
        lines.append("| " + " | ".join(_cell(c) for c in [title, *cells]) + " |")
    for group, best in (record.get("best_of") or {}).items():
        if group.startswith("qsd-") and present(group):
            cells = [best["chosen"].get(w["key"], "n/a") for w in workloads]
            lines.append("| " + " | ".join(_cell(c) for c in [f"{group}: which won", *cells]) + " |")
    lines.append("")
    targets = record.get("targets_issue17") or []
    if targets:
        titles = {w["key"]: w["title"] for w in workloads}
        counts: dict[str, int] = {}
        for t in targets:
            counts[t["status"]] = counts.get(t["status"], 0) + 1
        lines += ["### Targets of issue 17", "",
                  "exportd is the better of its /dev/fuse and io_uring configurations against "
                  "the peers (as qsd is the best of its three); the io_uring gain is "
                  "exportd-raw-uring against exportd-raw. Targets: "
                  + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".", "",
                  "| exportd | figure | target | this run | status |", "|---|---|---|---:|---|"]
        for t in targets:
            label = BEST_OF[t["peer"]][0] if t["peer"] in BEST_OF else peers.get(
                t["peer"], {"label": t["peer"]})["label"]
            shown = "" if t["value"] is None else f"{t['value']:.2f}x"
            status = f"**{t['status']}**" if t["status"] == "missed" else t["status"]
            lines.append(f"| {_cell(label)} | {titles[t['metric']]} | {t['target']} | {shown} "
                         f"| {status} |")
        lines.append("")
    return lines


JOB_FIGURES = (("p50_us", "p50 read latency", "us"), ("p99_us", "p99 read latency", "us"),
               ("max_us", "max read latency", "us"), ("iops", "read IOPS", "IOPS"))


def _spread_cell(sp: dict | None, fmt: str, unit: str = "") -> str:
    if not sp:
        return ""
    cell = f"{sp['median']:{fmt}}{unit}"
    if sp["min"] != sp["max"]:
        cell += f" [{sp['min']:{fmt}}–{sp['max']:{fmt}}]"
    return cell


def jobs_markdown(jobs: dict | None) -> list[str]:
    """The block-job section (issue 12): its own tables."""
    if not jobs:
        return []
    if "skipped" in jobs:
        return ["## Block jobs (issue 12)", "", f"Skipped: {jobs['skipped']}.", ""]
    s, summary, daemons = jobs["settings"], jobs["summary"], jobs["daemons"]
    size = s["image_size"]
    size_text = f"{size // 2**30} GiB" if size >= 2**30 else f"{size // 2**20} MiB"
    lines = [
        "## Block jobs (issue 12): 4 KiB reads on one export while a job copies another", "",
        f"One daemon, two FUSE exports of two {size_text} qcow2 images. Read load on export A: "
        f"{s['read_load']}, {s['runtime_s']:g} s per run, {s['reps']} repetition(s) interleaved "
        f"(without job: exportd, qsd; with job: exportd, qsd). Job: {s['job']}, at full speed "
        "(no `speed`). Completion latency (fio clat). Cells: median [min–max] over the "
        "repetitions; *with / without* is the ratio per repetition (latency: > 1 is worse; "
        "IOPS: < 1 is worse); *exportd / qsd* the same for the two daemons (latency: < 1 "
        "means exportd is faster). qemu-storage-daemon serves export A in an iothread of its "
        "own, the job in its main loop; exportd serves everything in one loop.", "",
        "| daemon | figure | without job | with job | with / without | exportd / qsd without "
        "| exportd / qsd with |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    vs = summary.get("exportd_over_qsd", {})
    for name, d in daemons.items():
        entry = summary.get(name)
        if d["status"] != "ok" or not entry or not entry["p50_us"]["without"]:
            why = d["reason"] or "; ".join(jobs["errors"].get(name, [])) or "no data"
            lines.append(f"| {_cell(d['label'])} | | {_cell(_short(why))} | | | | |")
            continue
        for i, (key, title, unit) in enumerate(JOB_FIGURES):
            fmt = ",.0f" if unit == "IOPS" else ",.1f"
            u = " IOPS" if unit == "IOPS" else " us"
            mine = vs.get(key, {}) if name == "exportd" else {}
            lines.append("| " + " | ".join(_cell(c) for c in (
                d["label"] if i == 0 else "", title,
                _spread_cell(entry[key]["without"], fmt, u), _spread_cell(entry[key]["with"], fmt, u),
                _spread_cell(entry[key]["with_over_without"], ".2f", "x"),
                _spread_cell(mine.get("without"), ".2f", "x"),
                _spread_cell(mine.get("with"), ".2f", "x"))) + " |")
        rate = entry.get("job_bytes_per_s")
        duty = entry.get("job_duty")
        if rate:
            scaled = {k: v / 2**20 for k, v in rate.items()}
            lines.append(f"| | job throughput (while fio ran) | | {_spread_cell(scaled, ',.0f', ' MiB/s')} "
                         f"| copying {_spread_cell(duty, '.0%')} of the time | | |")
        load = entry.get("loadavg_1min")
        if load:
            lines.append(f"| | load average (1 min) | | {_spread_cell(load, '.2f')} | | | |")
    lines.append("")
    if jobs.get("speed") or any(jobs["errors"].values()):
        lines += ["### `speed` as a rate limit", "",
                  f"A mirror alone with speed={s['speed'] // 2**20} MiB/s, query-block-jobs' "
                  f"offset sampled every 0.1 s for {s['speed_window_s']:g} s. *measured*: bytes / "
                  "time between the first and the last sample where the offset moved (a daemon "
                  "may copy a whole buffer at once and then sleep it off: qemu-storage-daemon "
                  "moves in 16 MiB steps); *from start*: offset / time since the command "
                  "returned, bursts included.", "",
                  "| daemon | speed | measured | measured / speed | from start |",
                  "|---|---:|---:|---:|---:|"]
        for name, d in daemons.items():
            sp = jobs["speed"].get(name)
            if sp:
                lines.append(f"| {_cell(d['label'])} | {sp['speed'] / 2**20:g} MiB/s "
                             f"| {sp['bytes_per_s'] / 2**20:.2f} MiB/s | {sp['ratio']:.2f}x "
                             f"| {sp['bytes_per_s_from_start'] / 2**20:.2f} MiB/s |")
            else:
                errors = [e for e in jobs["errors"].get(name, []) if e.startswith("speed")]
                why = d["reason"] or (errors[0] if errors else "no data")
                lines.append(f"| {_cell(d['label'])} | | {_cell(_short(why))} | | |")
        lines.append("")
    for name, d in daemons.items():
        if d.get("command"):
            lines.append(f"- {name}: `{_cell(_scratchless(' '.join(d['command'])))}`")
    lines.append("")
    return lines


def nbd_markdown(nbd: dict | None) -> list[str]:
    """The NBD section (issue 13): one row per figure, exportd / each server."""
    if not nbd:
        return []
    if "skipped" in nbd:
        return ["## NBD export (issue 13)", "", f"Skipped: {nbd['skipped']}.", ""]
    s, servers, summary = nbd["settings"], nbd["servers"], nbd["summary"]
    size = s["image_size"]
    size_text = f"{size // 2**30} GiB" if size >= 2**30 else f"{size // 2**20} MiB"
    names = list(servers)
    others = [n for n in names if n != "exportd"]
    lines = [
        "## NBD export (issue 13): the same clients against each NBD server", "",
        f"One raw image of {size_text} on tmpfs (a private copy per server), UNIX sockets; "
        f"fio's nbd engine, {s['runtime_s']:g} s per run; nbdcopy of the whole image with its "
        f"default connections; {s['reps']} repetition(s) interleaved across servers. "
        "Cells: median [min–max]; *load*: the 1-minute load average at the end of the row's "
        "runs [min–max]; *exportd / X*: ratio of the medians (> 1: exportd is faster), "
        "with the per-repetition ratios' range."
        + (" Tools: " + "; ".join(nbd["versions"].values()) + "." if nbd.get("versions") else ""),
        "",
    ]
    down = [f"{n}: {servers[n]['status']}: {servers[n]['reason']}" for n in names
            if servers[n]["status"] != "ok" and servers[n]["status"] != "stopped"]
    if down:
        lines += ["Not measured: " + "; ".join(_short(d, 200) for d in down) + ".", ""]
    lines.append("| figure | " + " | ".join(names) + " | load | "
                 + " | ".join(f"exportd / {n}" for n in others) + " |")
    lines.append("|---|" + "---:|" * (len(names) + 1 + len(others)))
    units = {w["key"]: w["unit"] for w in nbd["workloads"]}
    for w in nbd["workloads"]:
        entry = summary[w["key"]]
        cells = [w["title"]]
        for n in names:
            sp = entry["servers"].get(n)
            cells.append(_spread_cell(sp, ",.0f", " " + units[w["key"]]) if sp else "n/a")
        cells.append(_spread_cell(entry["loadavg"], ".2f") or "")
        for n in others:
            r = entry["ratios"].get(n)
            if not r or r["of_medians"] is None:
                cells.append("n/a")
                continue
            cell = f"{r['of_medians']:.2f}x"
            pr = r["per_rep"]
            if pr and pr["min"] != pr["max"]:
                cell += f" [{pr['min']:.2f}–{pr['max']:.2f}]"
            cells.append(cell)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    counts: dict[str, int] = {}
    rows = []
    for w in nbd["workloads"]:
        entry = summary[w["key"]]
        for ref, status in entry["targets"].items():
            counts[status] = counts.get(status, 0) + 1
            r = entry["ratios"].get(ref, {}).get("of_medians")
            rows.append(f"| {w['title']} | > 1x {ref} | "
                        + (f"{r:.2f}x" if r is not None else "n/a") + " | "
                        + (f"**{status}**" if status == "missed" else status) + " |")
    lines += ["### Target of issue 13: ahead of qemu-storage-daemon and qemu-nbd on every figure",
              "", "Targets: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".", "",
              "| figure | target | exportd | status |", "|---|---|---:|---|", *rows, ""]
    lines += ["### NBD servers", "", "| server | status | multi-conn | command |", "|---|---|---|---|"]
    for n, d in servers.items():
        status = d["status"] if d["status"] in ("ok", "stopped") else f"{d['status']}: {d['reason']}"
        errors = nbd["errors"].get(n) or []
        if errors:
            status += f"; {len(errors)} failed run(s), first: {errors[0]}"
        if d.get("exit_status") not in (0, None) and d["status"] in ("ok", "stopped"):
            status += f" (exit status {d['exit_status']} on SIGTERM)"
        command = _scratchless(" ".join(d["command"])) if d.get("command") else ""
        lines.append(f"| {n} | {_cell(_short(status, 300))} | {d.get('multi_conn')} | "
                     + (f"`{_cell(command)}` |" if command else " |"))
    lines.append("")
    return lines


OTHERS_LIMIT = 0.5  # CPUs of other work during a run worth pointing out


def _runs(record: dict):
    for per_peer in record["fio"].values():
        for name, entry in per_peer.items():
            for run in entry["runs"]:
                yield name, run


def _run_conditions(record: dict) -> dict[str, str]:
    """Per peer: the 1-minute load average before and after its fio runs and the
    CPUs other work took during them (cpu.CpuWindow), each as a range."""
    values: dict[str, dict[str, list[float]]] = {}
    for name, run in _runs(record):
        for key in ("loadavg_1min_before", "loadavg_1min", "others_cpus"):
            if key in run:
                values.setdefault(name, {}).setdefault(key, []).append(run[key])

    def span(v: list[float]) -> str:
        return f"{min(v):.2f}–{max(v):.2f}" if min(v) != max(v) else f"{v[0]:.2f}"

    cells = {}
    for name, v in values.items():
        parts = []
        if "loadavg_1min_before" in v:
            parts.append(f"before {span(v['loadavg_1min_before'])}")
        parts.append(f"after {span(v['loadavg_1min'])}")
        if "others_cpus" in v:
            parts.append(f"others {span(v['others_cpus'])} CPUs")
        cells[name] = ", ".join(parts)
    return cells


def _disturbed_runs_line(record: dict) -> list[str]:
    others = [run["others_cpus"] for _, run in _runs(record) if "others_cpus" in run]
    if not others:
        return []
    busy = [o for o in others if o > OTHERS_LIMIT]
    return [f"Other work during the fio runs (machine CPU time minus fio's, the peer's and the "
            f"harness's): more than {OTHERS_LIMIT:g} CPU in {len(busy)} of {len(others)} runs, "
            f"at most {max(others):.2f} CPUs.", ""]


def render_markdown(record: dict) -> str:
    figures = figures_from_record(record)
    targets = _targets_by_row(record)
    peers = record["peers"]
    lines = _header(record) + _disturbed_runs_line(record)

    if record["targets"]:
        titles = {w["key"]: w["title"] for w in record["workloads"]}
        titles |= {k: t for k, (t, _) in CONTROL_METRICS.items()}
        lines += ["## Targets of issue 7", "",
                  "| peer | figure | target | this run | status |", "|---|---|---|---:|---|"]
        for t in record["targets"]:
            if t["value"] is None:
                shown = ""
            elif t["target"].startswith("<"):
                shown = f"{t['value']:.1f} KiB"
            else:
                shown = f"{t['value']:.2f}x"
            status = f"**{t['status']}**" if t["status"] == "missed" else t["status"]
            lines.append(f"| {peers[t['peer']]['label']} | {titles[t['metric']]} | {t['target']} "
                         f"| {shown} | {status} |")
        lines.append("")

    io_peers = [name for name, p in peers.items() if p["role"] == "io"]
    if io_peers:
        lines += ["## I/O (fio, direct=1)", "",
                  "| workload | peer | median | vs qsd | vs direct | target | status |",
                  "|---|---|---:|---:|---:|---|---|"]
        for w in record["workloads"]:
            first = True
            for name in io_peers:
                entry = record["fio"].get(w["key"], {}).get(name, {"runs": [], "errors": []})
                values = [r["value"] for r in entry["runs"]]
                if values:
                    med = median(values)
                    cell = f"{_num(med, w['unit'])} {w['unit']}"
                    if len(values) > 1:
                        cell += f" [{_num(min(values), w['unit'])}–{_num(max(values), w['unit'])}]"
                else:
                    cell = _unavailable(peers[name]) or (
                        f"error: {_short(entry['errors'][0])}" if entry["errors"] else "no data")
                target, status = _target_cells(targets.get((name, w["key"]), []))
                lines.append("| " + " | ".join(_cell(c) for c in (
                    w["title"] if first else "", peers[name]["label"], cell,
                    _ratio(figures.ratio(name, w["key"], "qsd")),
                    _ratio(figures.ratio(name, w["key"], "direct")), target, status)) + " |")
                first = False
        lines.append("")

    ctl_peers = [name for name, p in peers.items() if p["role"] == "control"]
    if ctl_peers:
        lines += ["## Control plane (QMP, null-co node)", "",
                  "| figure | daemon | value | vs qsd | target | status |",
                  "|---|---|---:|---:|---|---|"]
        for key, (title, unit) in CONTROL_METRICS.items():
            first = True
            for name in ctl_peers:
                value = figures.get(name, key)
                entry = record["control"].get(name, {})
                if value is not None:
                    cell = f"{_num(value, unit)} {unit}"
                    if key.startswith("memory"):
                        rss = entry["memory"]["rss_kib"]
                        n = entry["memory"]["exports"]
                        suffix = "-after-io" if key == "memory-io" else ""
                        cell += (f" (RSS {rss['1' + suffix]:,} → {rss[str(n) + suffix]:,} KiB"
                                 f" with 1 → {n} exports)")
                    elif len(entry.get("cycle_ms", [])) > 1:
                        cell += f" [{min(entry['cycle_ms']):.2f}–{max(entry['cycle_ms']):.2f}]"
                else:
                    wanted = "memory" if key.startswith("memory") else "cycles"
                    errors = [e for e in entry.get("errors", []) if e.startswith(wanted)]
                    cell = _unavailable(peers[name]) or (
                        f"unavailable: {_short(errors[0].split(': ', 1)[1])}" if errors else "no data")
                target, status = _target_cells(targets.get((name, key), []))
                lines.append("| " + " | ".join(_cell(c) for c in (
                    title if first else "", peers[name]["label"], cell,
                    _ratio(figures.ratio(name, key, "qsd")), target, status)) + " |")
                first = False
        lines.append("")

    lines += issue17_markdown(record, figures)
    lines += jobs_markdown(record.get("jobs"))
    lines += nbd_markdown(record.get("nbd"))
    from .nbd_driver import nbd_driver_markdown  # late: that module uses this one's cell helpers
    lines += nbd_driver_markdown(record.get("nbd_driver"))

    if not peers:
        return "\n".join(lines)
    lines += ["## Peers", "",
              "*load*: the 1-minute load average before and after the peer's fio runs, "
              "[min–max] over them (the harness's own fio and daemons add about 2 on 2 CPUs), "
              "and the CPUs that other work took during them.", "",
              "| peer | status | load | how it runs |", "|---|---|---|---|"]
    load_ranges = _run_conditions(record)
    for name, p in peers.items():
        status = p["status"] if p["status"] == "ok" else f"{STATUS_WORDS.get(p['status'], p['status'])}: {p['reason']}"
        threads = p["info"].get("threads")
        if threads:
            status += " (threads: " + ", ".join(f"{n} x{c}" if c > 1 else n
                                                 for n, c in threads.items()) + ")"
        load = load_ranges.get(name, "")
        exit_status = p["info"].get("exit_status", 0)
        if p["status"] == "ok" and not p["info"].get("exit_status_expected", exit_status == 0):
            # SIGTERM should end a daemon cleanly; anything else is worth a look.
            status += (" (did not exit on SIGTERM, killed)" if exit_status is None
                       else f" (exit status {exit_status} on SIGTERM)")
        command = p["info"].get("command")
        how = " ".join(command) if command else p["info"].get("image", "")
        exports = p["info"].get("query-block-exports")
        if isinstance(exports, list) and exports:
            # Only what the command line does not already say (e.g. exportd's
            # passthrough mode, an extension field).
            known = {"id", "type", "node-name", "shutting-down", "mountpoint", "writable",
                     "growable", "allow-other", "writethrough"}
            extra = {k: v for k, v in exports[0].items() if k not in known}
            if extra:
                status += " (query-block-exports: " + ", ".join(
                    f"{k}={v}" for k, v in extra.items()) + ")"
        how = _scratchless(how)
        lines.append(f"| {name} | {_cell(status)} | {load} | `{_cell(how)}` |" if how
                     else f"| {name} | {_cell(status)} | {load} | |")
    lines.append("")
    return "\n".join(lines)
