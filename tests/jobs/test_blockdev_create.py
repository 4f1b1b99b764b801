"""QMP blockdev-create as a job, against a real daemon; qemu-img is the oracle.

The expected texts and event sequences are what qemu-storage-daemon 7.2
answers to the same commands (checked by hand on this machine)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from exportd.qapi.schema import schema

MiB = 1 << 20
SUCCESS = ["created", "running", "waiting", "pending", "concluded"]


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=30)


def qemu_io(img: Path, cmd: str, *, fmt: str = "qcow2") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", "-f", fmt, "-c", cmd, str(img)], capture_output=True,
                          text=True, timeout=30)


async def test_libvirt_overlay_flow(daemon, jobs_client, tmp_path):
    """blockdev-create file -> blockdev-add file -> blockdev-create qcow2 with a
    backing file -> events in order -> job-dismiss -> blockdev-add qcow2."""
    base = tmp_path / "base.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(base), str(4 * MiB)).returncode == 0
    assert qemu_io(base, "write -P 0x5a 0 64k").returncode == 0
    overlay = tmp_path / "overlay.qcow2"
    d = daemon()
    c = await jobs_client(d)

    assert await c.cmd("query-jobs") == []
    assert await c.cmd("blockdev-create", {"job-id": "create-file", "options": {
        "driver": "file", "filename": str(overlay), "size": 0}}) == {}
    assert await c.wait_status("create-file", "concluded") == SUCCESS
    assert await c.cmd("query-jobs") == [{"id": "create-file", "type": "create", "status": "concluded",
                                          "current-progress": 1, "total-progress": 1}]
    assert await c.cmd("job-dismiss", {"id": "create-file"}) == {}
    assert await c.wait_status("create-file", "null") == [*SUCCESS, "null"]
    assert await c.cmd("query-jobs") == []
    assert overlay.stat().st_size == 0

    await c.cmd("blockdev-add", {"driver": "file", "node-name": "ovl-file", "filename": str(overlay)})
    assert await c.cmd("blockdev-create", {"job-id": "create-fmt", "options": {
        "driver": "qcow2", "file": "ovl-file", "size": 8 * MiB, "backing-file": str(base),
        "backing-fmt": "qcow2", "cluster-size": 4096}}) == {}
    assert await c.wait_status("create-fmt", "concluded") == SUCCESS
    [info] = await c.cmd("query-jobs")
    assert info == {"id": "create-fmt", "type": "create", "status": "concluded",
                    "current-progress": 1, "total-progress": 1}
    assert await c.cmd("job-dismiss", {"id": "create-fmt"}) == {}
    await c.wait_status("create-fmt", "null")
    # every event, in order, across both jobs
    assert c.seen == [("create-file", s) for s in [*SUCCESS, "null"]] + \
        [("create-fmt", s) for s in [*SUCCESS, "null"]]

    await c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "ovl", "file": "ovl-file"})
    nodes = {n["node-name"]: n for n in await c.cmd("query-named-block-nodes")}
    assert nodes["ovl"]["image"]["virtual-size"] == 8 * MiB
    assert nodes["ovl"]["backing_file"] == str(base)
    await c.cmd("blockdev-del", {"node-name": "ovl"})
    await c.cmd("blockdev-del", {"node-name": "ovl-file"})

    check = qemu_img("check", str(overlay))
    assert check.returncode == 0, check.stdout + check.stderr
    i = json.loads(qemu_img("info", "--output=json", str(overlay)).stdout)
    assert i["format"] == "qcow2" and i["virtual-size"] == 8 * MiB and i["cluster-size"] == 4096
    assert i["backing-filename"] == str(base) and i["backing-filename-format"] == "qcow2"
    # the backing file's data shows through the new overlay
    r = qemu_io(overlay, "read -P 0x5a 0 64k")
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout


async def test_nested_file_and_options(daemon, jobs_client, tmp_path):
    """`file` as a nested definition (an implicit node for the job's life), v2,
    relative backing name, refcount width; the implicit node is gone afterwards."""
    img = tmp_path / "n.qcow2"
    assert qemu_img("create", "-q", "-f", "raw", str(tmp_path / "b.raw"), str(MiB)).returncode == 0
    d = daemon()
    c = await jobs_client(d)
    await c.create_ok("f", {"driver": "file", "filename": str(img), "size": 0})
    await c.create_ok("q", {"driver": "qcow2", "file": {"driver": "file", "filename": str(img)},
                            "size": 2 * MiB, "version": "v2", "backing-file": "b.raw",
                            "backing-fmt": "raw"})
    assert await c.cmd("query-named-block-nodes") == []
    assert qemu_img("check", str(img)).returncode == 0
    i = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    assert i["virtual-size"] == 2 * MiB and i["format-specific"]["data"]["compat"] == "0.10"
    assert i["backing-filename"] == "b.raw" and i["backing-filename-format"] == "raw"

    await c.create_ok("q3", {"driver": "qcow2", "file": {"driver": "file", "filename": str(img)},
                             "size": 3 * MiB, "refcount-bits": 64, "lazy-refcounts": True})
    i = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    assert i["virtual-size"] == 3 * MiB and "backing-filename" not in i
    assert i["format-specific"]["data"]["refcount-bits"] == 64
    assert i["format-specific"]["data"]["lazy-refcounts"] is True
    assert qemu_img("check", str(img)).returncode == 0

    # preallocation: the layout is computed in the job, after the reply
    await c.create_ok("qm", {"driver": "qcow2", "file": {"driver": "file", "filename": str(img)},
                             "size": 4 * MiB, "cluster-size": 65536, "preallocation": "metadata"})
    assert qemu_img("check", str(img)).returncode == 0
    m = json.loads(qemu_img("map", "--output=json", str(img)).stdout)
    assert sum(e["length"] for e in m if e["data"] or e.get("offset") is not None) == 4 * MiB

    raw = tmp_path / "r.img"
    await c.create_ok("r", {"driver": "file", "filename": str(raw), "size": 3 * MiB + 1000,
                            "preallocation": "falloc"})
    assert raw.stat().st_size == 3 * MiB + 1000
    # driver=raw: exportd's alias of file (QEMU has no raw creation)
    await c.create_ok("r2", {"driver": "raw", "filename": str(raw), "size": 512})
    assert raw.stat().st_size == 512


async def test_command_errors(daemon, jobs_client, tmp_path):
    d = daemon()
    c = await jobs_client(d)
    opts = {"driver": "file", "filename": str(tmp_path / "a.img"), "size": 0}
    assert await c.error("blockdev-create", {"job-id": "#j", "options": opts}) == "Invalid job ID '#j'"
    assert await c.error("blockdev-create", {"job-id": "", "options": opts}) == "Invalid job ID ''"
    assert await c.cmd("blockdev-create", {"job-id": "j", "options": opts}) == {}
    assert await c.error("blockdev-create", {"job-id": "j", "options": opts}) == "Job ID 'j' already in use"
    await c.wait_status("j", "concluded")
    assert await c.error("job-finalize", {"id": "j"}) == \
        "Job 'j' in state 'concluded' cannot accept command verb 'finalize'"
    assert await c.error("job-cancel", {"id": "j"}) == \
        "Job 'j' in state 'concluded' cannot accept command verb 'cancel'"
    assert await c.cmd("job-dismiss", {"id": "j"}) == {}
    await c.wait_status("j", "null")
    for verb in ("job-dismiss", "job-cancel", "job-finalize"):
        assert await c.error(verb, {"id": "j"}) == "Job not found"
    # the id is free again once dismissed
    await c.create_ok("j", opts)
    assert c.seen == [("j", s) for s in [*SUCCESS, "null"] * 2]
    assert await c.error("job-dismiss", {"id": 1}) == "Invalid parameter type for 'id', expected: string"


@pytest.mark.parametrize("options, text", [
    ({"driver": "qcow2", "file": "nonode", "size": MiB},
     "Cannot find device='nonode' nor node-name='nonode'"),
    ({"driver": "qcow2", "file": "ro", "size": MiB}, "Block node is read-only"),
    ({"driver": "qcow2", "file": "rw", "size": 1000}, "Image size must be a multiple of 512 bytes"),
    ({"driver": "qcow2", "file": "rw", "size": (1 << 63) - 1},
     "Image size must be a multiple of 512 bytes"),
    ({"driver": "qcow2", "file": "rw", "size": MiB, "cluster-size": 3000},
     "Cluster size must be a power of two between 512 and 2048k"),
    ({"driver": "qcow2", "file": "rw", "size": MiB, "refcount-bits": 3},
     "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"driver": "qcow2", "file": "rw", "size": MiB, "backing-fmt": "qcow2"},
     "Backing format cannot be used without backing file"),
    ({"driver": "qcow2", "file": "rw", "size": MiB, "version": "v2", "lazy-refcounts": True},
     "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"),
    ({"driver": "qcow2", "file": "rw", "size": MiB, "version": "v2", "compression-type": "zstd"},
     "Non-zlib compression type is only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"driver": "qcow2", "file": "rw", "size": MiB, "backing-file": "b", "backing-fmt": "raw",
      "preallocation": "metadata"},
     "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
    ({"driver": "qcow2", "file": {"driver": "file", "filename": "/nonexistent/z.qcow2"}, "size": MiB},
     "Could not open '/nonexistent/z.qcow2': No such file or directory"),
    ({"driver": "file", "filename": "/nonexistent/x", "size": 0},
     "Could not create '/nonexistent/x': No such file or directory"),
    ({"driver": "file", "filename": "X", "size": MiB, "preallocation": "metadata"},
     "Unsupported preallocation mode: metadata"),
])
async def test_job_errors(daemon, jobs_client, tmp_path, options, text):
    """A failing creation: the command succeeds, the job concludes with the error,
    and the image is untouched."""
    ro_img, rw_img = tmp_path / "ro.qcow2", tmp_path / "rw.img"
    assert qemu_img("create", "-q", "-f", "qcow2", str(ro_img), str(MiB)).returncode == 0
    rw_img.write_bytes(b"keep" * 1024)
    before = ro_img.read_bytes(), rw_img.read_bytes()
    d = daemon()
    c = await jobs_client(d)
    await c.cmd("blockdev-add", {"driver": "file", "node-name": "ro", "filename": str(ro_img),
                                 "read-only": True})
    await c.cmd("blockdev-add", {"driver": "file", "node-name": "rw", "filename": str(rw_img)})
    if options.get("filename") == "X":
        options = {**options, "filename": str(tmp_path / "x.img")}
    assert await c.create_error("j", options) == text
    assert (ro_img.read_bytes(), rw_img.read_bytes()) == before
    assert await c.cmd("query-jobs") == []
    # the nodes are free again: a good creation on the same node works
    await c.create_ok("again", {"driver": "qcow2", "file": "rw", "size": MiB})
    await c.cmd("blockdev-del", {"node-name": "rw"})
    assert qemu_img("check", str(rw_img)).returncode == 0


async def test_node_in_use_is_refused(daemon, jobs_client, tmp_path):
    img = tmp_path / "u.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(img), str(MiB)).returncode == 0
    before = img.read_bytes()
    d = daemon()
    c = await jobs_client(d)
    await c.cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
    await c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
    err = await c.create_error("j", {"driver": "qcow2", "file": "f", "size": 2 * MiB})
    assert err.startswith("Permission conflict on node") and "'write, resize'" in err, err
    # the file driver takes image locks: the opened file is not emptied under its user
    err = await c.create_error("k", {"driver": "file", "filename": str(img), "size": 0})
    assert err.startswith('Failed to get "write" lock'), err
    await c.cmd("blockdev-del", {"node-name": "q"})
    await c.cmd("blockdev-del", {"node-name": "f"})
    assert img.read_bytes() == before


async def test_query_jobs_newest_first_and_schema(daemon, jobs_client, tmp_path):
    d = daemon()
    c = await jobs_client(d)
    await c.run_create("a", {"driver": "file", "filename": str(tmp_path / "a"), "size": 0})
    await c.run_create("b", {"driver": "qcow2", "file": "none", "size": MiB})
    await c.run_create("c", {"driver": "file", "filename": str(tmp_path / "c"), "size": 512})
    jobs = await c.cmd("query-jobs")
    schema().check_returns("query-jobs", jobs)
    for job_id, status in c.seen:
        schema().validate_event("JOB_STATUS_CHANGE", {"id": job_id, "status": status})
    assert jobs == [
        {"id": "c", "type": "create", "status": "concluded", "current-progress": 1, "total-progress": 1},
        {"id": "b", "type": "create", "status": "concluded", "current-progress": 1, "total-progress": 1,
         "error": "Cannot find device='none' nor node-name='none'"},
        {"id": "a", "type": "create", "status": "concluded", "current-progress": 1, "total-progress": 1},
    ]
    assert await c.cmd("job-dismiss", {"id": "b"}) == {}
    assert [j["id"] for j in await c.cmd("query-jobs")] == ["c", "a"]
    names = {x["name"] for x in await c.cmd("query-commands")}
    assert {"blockdev-create", "query-jobs", "job-dismiss", "job-cancel", "job-finalize"} <= names


async def test_running_job_answers_queries_and_cancels(daemon, raw_qmp, tmp_path):
    """A big preallocated file is written off the loop: commands sent right behind
    blockdev-create (same socket write) see the job running; job-cancel is best
    effort (the file is finished), and the job concludes with QEMU's text."""
    big = tmp_path / "big.img"
    size = 256 * MiB
    d = daemon()
    c = raw_qmp(d, timeout=60)
    c.negotiate()
    c.send(json.dumps({"execute": "blockdev-create", "id": 1, "arguments": {"job-id": "big", "options": {
        "driver": "file", "filename": str(big), "size": size, "preallocation": "full"}}})
           + json.dumps({"execute": "query-jobs", "id": 2})
           + json.dumps({"execute": "job-cancel", "id": 3, "arguments": {"id": "big"}})
           + json.dumps({"execute": "query-jobs", "id": 4}))
    replies: dict[int, dict] = {}
    events: list[str] = []
    while len(replies) < 4 or "concluded" not in events:
        msg = c.recv_msg()
        if msg.get("event") == "JOB_STATUS_CHANGE":
            assert msg["data"]["id"] == "big"
            events.append(msg["data"]["status"])
        else:
            replies[msg["id"]] = msg
    assert replies[1] == {"id": 1, "return": {}}
    running = {"id": "big", "type": "create", "status": "running", "current-progress": 0, "total-progress": 1}
    assert replies[2] == {"id": 2, "return": [running]}
    assert replies[3] == {"id": 3, "return": {}}
    assert replies[4] == {"id": 4, "return": [running]}
    assert events == ["created", "running", "aborting", "concluded"]
    assert c.cmd("query-jobs") == {"return": [{
        "id": "big", "type": "create", "status": "concluded", "current-progress": 1,
        "total-progress": 1, "error": "Operation canceled"}]}
    assert big.stat().st_size == size
    assert c.cmd("job-dismiss", {"id": "big"}) == {"return": {}}


async def test_quit_waits_for_a_running_job(daemon, raw_qmp, tmp_path):
    """quit while a qcow2 creation is writing: the job is cancelled and waited for
    before the nodes close (as qemu-storage-daemon), so the image is complete."""
    img = tmp_path / "q.qcow2"
    img.write_bytes(b"")
    size = 256 * MiB
    d = daemon()
    c = raw_qmp(d, timeout=60)
    c.negotiate()
    assert c.cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)}) == \
        {"return": {}}
    c.send(json.dumps({"execute": "blockdev-create", "id": 1, "arguments": {"job-id": "q", "options": {
        "driver": "qcow2", "file": "f", "size": size, "preallocation": "full"}}})
           + json.dumps({"execute": "quit", "id": 2}))
    seen: list[str] = []
    while True:
        try:
            msg = c.recv_msg()
        except EOFError:
            break
        if "event" in msg:
            seen.append(msg["data"]["status"] if msg["event"] == "JOB_STATUS_CHANGE" else msg["event"])
        else:
            seen.append(f"reply {msg['id']}")
    assert d.wait() == 0
    assert seen == ["created", "running", "reply 1", "reply 2", "SHUTDOWN", "aborting", "concluded"]
    check = qemu_img("check", str(img))
    assert check.returncode == 0, check.stdout + check.stderr
    i = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    assert i["virtual-size"] == size and i["actual-size"] >= size
