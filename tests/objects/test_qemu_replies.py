"""object-add / object-del of iothread, secret and throttle-group objects,
exports naming an iothread, throttle nodes over a group, a TLS key
opened with a secret, and qom-list / qom-get / qom-set on the objects
(limits set live): the same script against exportd and
qemu-storage-daemon 7.2 gives the same replies."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.qsd import QSD, replies_of_both
from tests.tls.certs import Pki, creds_dir

pytestmark = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")

KEY_PASSWORD = "s3cret"


def obj(qom_type: str, oid: str, **props: Any) -> tuple[str, dict[str, Any]]:
    return ("object-add", {"qom-type": qom_type, "id": oid, **props})


def group(oid: str, **limits: Any) -> tuple[str, dict[str, Any]]:
    return obj("throttle-group", oid, limits=limits)


def fuse(eid: str, node: str, mnt: Path, **kw: Any) -> tuple[str, dict[str, Any]]:
    return ("block-export-add", {"type": "fuse", "id": eid, "node-name": node, "mountpoint": str(mnt), **kw})


def encrypted(plain: bytes, key: bytes, iv: bytes) -> str:
    """AES-256-CBC with PKCS#7 padding, base64, by openssl (not by exportd)."""
    r = subprocess.run(["openssl", "enc", "-aes-256-cbc", "-K", key.hex(), "-iv", iv.hex(), "-a", "-A"],
                       input=plain, capture_output=True, check=True)
    return r.stdout.decode()


def files(d: Path, pki: Pki) -> dict[str, Path]:
    """The image, mountpoint, secret files and an encrypted TLS key both daemons use."""
    d.mkdir(exist_ok=True)
    f = {"img": d / "disk.img", "mnt": d / "mnt.raw", "pw": d / "password.txt", "dir": d / "a-directory",
         "tls": creds_dir(d / "tls", pki, client=False)}
    f["img"].write_bytes(bytes(1 << 20))
    f["mnt"].touch()
    f["pw"].write_text(KEY_PASSWORD)
    f["dir"].mkdir(exist_ok=True)
    key = f["tls"] / "server-key.pem"
    subprocess.run(["openssl", "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", str(pki.server_key),
                    "-out", str(key), "-passout", f"pass:{KEY_PASSWORD}"], check=True, capture_output=True)
    return f


def qom(path: str, prop: str | None = None, value: Any = None) -> tuple[str, dict[str, Any]]:
    if prop is None:
        return ("qom-list", {"path": path})
    if value is None:
        return ("qom-get", {"path": path, "property": prop})
    return ("qom-set", {"path": path, "property": prop, "value": value})


def script(f: dict[str, Path]) -> list[tuple[str, dict[str, Any]]]:
    aes_key, iv = os.urandom(32), os.urandom(16)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    tls = {"dir": str(f["tls"]), "endpoint": "server"}
    return [
        qom("/objects"),  # no container before the first object
        # iothread
        obj("iothread", "io0"),
        obj("iothread", "io0"),
        obj("iothread", "io1", **{"poll-max-ns": 100, "poll-grow": 2, "poll-shrink": 2, "aio-max-batch": 4}),
        obj("iothread", "io2", **{"poll-max-ns": -1}),
        obj("iothread", "io2", **{"aio-max-batch": -1}),
        obj("iothread", "io2", **{"thread-pool-min": 10, "thread-pool-max": 2}),
        obj("iothread", "io2", **{"thread-pool-max": 0}),
        obj("iothread", "io2", **{"poll-max-ns": "x"}),
        obj("iothread", "9bad"),
        ("query-iothreads", {}),
        # secret
        obj("secret", "s0", data="abc"),
        obj("secret", "s1", data=b64(b"abc"), format="base64"),
        obj("secret", "s2", data="YWJ", format="base64"),
        obj("secret", "s3", data="!!", format="base64"),
        obj("secret", "s3", data="ab\u00e9", format="base64"),
        obj("secret", "s3", data="abc", loaded=True),
        obj("secret", "s-nl", data="YW\nJj", format="base64"),
        obj("secret", "s3"),
        obj("secret", "s3", file="/nonexistent"),
        obj("secret", "s3", file=str(f["dir"])),
        obj("secret", "s3", file=str(f["pw"]), data="abc"),
        obj("secret", "s3", data="abc", format="hex"),
        obj("secret", "s3", data="abc", keyid="nope"),
        obj("secret", "s3", data="abc", keyid="io0"),
        obj("secret", "s3", data="abc", keyid="s0"),
        obj("secret", "aes", data=b64(aes_key), format="base64"),
        obj("secret", "s3", data="abc", keyid="aes"),
        obj("secret", "s3", data="abc", keyid="aes", iv="AAAA"),
        obj("secret", "s3", data="abc", keyid="aes", iv=b64(iv)),
        obj("secret", "s3", data="abcdabcdabcdabcd", keyid="aes", iv=b64(iv)),
        obj("secret", "pw-enc", data=encrypted(KEY_PASSWORD.encode(), aes_key, iv), format="base64",
            keyid="aes", iv=b64(iv)),
        obj("secret", "pw-file", file=str(f["pw"])),
        obj("secret", "wrong", data="wrong"),
        # secrets where QEMU uses them: the password of an encrypted TLS key
        obj("tls-creds-x509", "x0", **tls),
        obj("tls-creds-x509", "x0", **tls, passwordid="nope"),
        obj("tls-creds-x509", "x0", **tls, passwordid="io0"),
        obj("tls-creds-x509", "x0", **tls, passwordid="wrong"),
        obj("tls-creds-x509", "x0", **tls, passwordid="pw-enc"),
        obj("tls-creds-x509", "x1", **tls, passwordid="pw-file"),
        ("object-del", {"id": "pw-file"}),  # a secret is not held by its users
        # throttle-group
        group("tg0", **{"iops-total": 100}),
        group("tg0", **{"iops-total": 100}),
        obj("throttle-group", "tg1", **{"x-iops-total": 100}),
        obj("throttle-group", "tg2"),
        group("tg3", **{"iops-total": -1}),
        group("tg3", **{"iops-total": 1000000000000001}),
        group("tg3", **{"bps-total": 1, "bps-read": 1}),
        group("tg3", **{"iops-total-max": 1, "iops-write-max": 1}),
        group("tg3", **{"iops-total-max": 100}),
        group("tg3", **{"iops-total": 100, "iops-total-max": 50}),
        group("tg3", **{"iops-total": 100, "iops-total-max-length": 5}),
        group("tg3", **{"iops-total-max-length": 0}),
        group("tg3", **{"iops-total-max-length": 4294967296}),
        group("tg3", **{"iops-total": 10, "iops-total-max": 20, "iops-total-max-length": -1}),
        group("tg3", **{"iops-size": 4096}),
        group("tg3", **{"bps-read": 10, "bps-read-max": 20, "bps-read-max-length": 60, "iops-size": 4096,
                        "iops-write": 5}),
        obj("throttle-group", "tg4", **{"x-iops-total": -5}),
        obj("throttle-group", "tg4", **{"x-bps-read-max-length": 0}),
        obj("throttle-group", "tg4", **{"x-iops-total-max-length": 4294967296}),
        obj("throttle-group", "tg4", **{"x-bps-total": 1, "x-bps-write": 1}),
        obj("throttle-group", "tg4", limits={"bogus": 1}),
        # the throttle driver
        ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(f["img"])}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "nope", "file": "f0"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "s0", "file": "f0"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "nope", "file": "nope"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t0", "file": "f0"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "tg0"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "tg0", "file": "f0"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t1", "throttle-group": "tg0", "file": "t0"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t2", "throttle-group": "tg1",
                          "file": {"driver": "null-co", "node-name": "n2"}}),
        ("x-debug-query-block-graph", {}),
        ("object-del", {"id": "tg0"}),
        ("object-del", {"id": "tg1"}),
        ("object-del", {"id": "nope"}),
        # exports naming an iothread
        fuse("e0", "t1", f["mnt"], iothread="nope"),
        fuse("e0", "nope", f["mnt"], iothread="nope"),
        fuse("e0", "t1", f["mnt"], iothread="tg2"),
        fuse("e0", "t1", f["mnt"], iothread="io0", **{"fixed-iothread": True}),
        ("block-export-del", {"id": "e0"}),
        ("object-del", {"id": "io0"}),  # QEMU lets an iothread go while exports name it
        ("blockdev-del", {"node-name": "t2"}),
        ("object-del", {"id": "tg1"}),
        ("blockdev-del", {"node-name": "t1"}),
        ("object-del", {"id": "tg0"}),
        ("blockdev-del", {"node-name": "t0"}),
        ("object-del", {"id": "tg0"}),
        ("object-del", {"id": "tg0"}),
        obj("iothread", "tg0"),  # the id is free again
        *qom_script(f),
    ]


def qom_script(f: dict[str, Path]) -> list[tuple[str, dict[str, Any]]]:
    """qom-list, qom-get and qom-set on objects of each type."""
    return [
        obj("iothread", "io9"),
        obj("secret", "s9", data="abc"),
        group("tg9", **{"iops-total": 100}),
        obj("tls-creds-x509", "x9", dir=str(f["tls"]), passwordid="pw-enc"),
        qom("/objects"),
        *(qom(path) for path in ("/objects/io9", "s9", "/objects/tg9", "/objects/x9", "/objects/nope",
                                 "/objects/io9/type", "nope")),
        *(qom("/objects/io9", p) for p in ("type", "poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch",
                                           "thread-pool-min", "thread-pool-max", "nope")),
        *(qom("/objects/s9", p) for p in ("data", "file", "format", "keyid", "iv", "loaded")),
        *(qom("/objects/x9", p) for p in ("endpoint", "dir", "verify-peer", "priority", "sanity-check",
                                          "passwordid", "loaded")),
        qom("/objects/tg9", "limits"),
        qom("/objects/tg9", "x-iops-total"),
        qom("/objects/tg9", "x-bps-read-max-length"),
        qom("/objects", "type"),
        qom("/objects", "io9"),
        qom("/objects", "nope"),
        qom("/objects/nope", "type"),
        qom("/objects/io9", "poll-max-ns", 5),
        qom("/objects/io9", "poll-max-ns"),
        qom("/objects/io9", "poll-max-ns", -5),
        qom("/objects/io9", "poll-max-ns", "x"),
        qom("/objects/io9", "thread-pool-min", 100),
        qom("/objects/io9", "thread-pool-min"),
        qom("/objects/io9", "type", "x"),
        qom("/objects/io9", "nope", 1),
        qom("/objects/s9", "loaded", True),
        qom("/objects/s9", "data", "x"),
        qom("/objects/x9", "verify-peer", False),
        qom("/objects/x9", "verify-peer"),
        qom("/objects/tg9", "x-iops-total", 7),
        qom("/objects/tg9", "limits", {"bps-total": 1000}),
        qom("/objects/tg9", "limits"),
        qom("/objects/tg9", "limits", {"bps-total": -1}),
        qom("/objects/tg9", "limits", {"bps-read": 1}),
        qom("/objects/tg9", "limits", {"iops-total": 5, "bogus": 1}),
        qom("/objects/tg9", "limits", 5),
        qom("/objects/tg9", "limits", {"iops-total": "x"}),
        qom("/objects/tg9", "limits", {}),
        qom("/objects/tg9", "limits"),
        ("object-del", {"id": "io9"}),
        qom("/objects/io9"),
    ]


def without_perms(reply: dict[str, Any]) -> dict[str, Any]:
    g = reply["return"]
    return {"nodes": sorted(g["nodes"], key=lambda n: n["id"]),
            "edges": sorted(({k: e[k] for k in ("parent", "child", "name")} for e in g["edges"]),
                            key=lambda e: (e["parent"], e["child"]))}


async def test_same_replies_as_qemu(daemon, tmp_path: Path, pki: Pki) -> None:
    work = tmp_path / "w"
    f = files(work, pki)
    steps = script(f)
    started = []
    ours, theirs = await replies_of_both(tmp_path, lambda: None, steps,
                                         lambda: (started.append(daemon()) or started[0].socket))
    started[0].terminate()
    graph = next(i for i, s in enumerate(steps) if s[0] == "x-debug-query-block-graph")
    for i, (step, a, b) in enumerate(zip(steps, ours, theirs, strict=True)):
        if i == graph:
            assert without_perms(a) == without_perms(b), i
        elif step[0] == "qom-list" and "return" in b:  # QEMU lists properties in hash order
            assert sorted(a["return"], key=str) == sorted(b["return"], key=str), (i, step)
        else:
            assert a == b, (i, step)
    # the script proves something: the good cases succeeded on QEMU
    ok = {s[1].get("id") or s[1].get("node-name") for s, r in zip(steps, theirs, strict=True) if r == {"return": {}}}
    assert {"io0", "io1", "s0", "pw-enc", "x0", "x1", "tg0", "tg1", "t0", "t1", "t2", "e0"} <= ok


def parsed(name: str) -> Any:
    """A json: file name as its options (key order is not part of them)."""
    return json.loads(name[5:]) if name.startswith("json:") else name


def node_names(steps: list[tuple[str, dict[str, Any]]], replies: list[Any]) -> list[Any]:
    """The replies, with query-named-block-nodes cut to each node's file names."""
    return [{n["node-name"]: (parsed(n["file"]), parsed(n["image"]["filename"])) for n in r["return"]}
            if s[0] == "query-named-block-nodes" else r for s, r in zip(steps, replies, strict=True)]


async def test_throttle_nodes_named_and_reopened_as_qemu(daemon, tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    steps = [
        group("tg", **{"iops-total": 100}),
        obj("throttle-group", "tg2"),
        ("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "tg", "file": "f"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f", "offset": 512}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t1", "throttle-group": "tg", "file": "r"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t2", "throttle-group": "tg", "file": "t1"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t3", "throttle-group": "tg",
                          "file": {"driver": "null-co", "node-name": "n3"}}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t4", "throttle-group": "nope",
                          "file": {"driver": "null-co", "node-name": "n4"}}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n4"}),  # the failed add left nothing behind
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-reopen", {"options": [{"driver": "throttle", "node-name": "t0", "throttle-group": "nope",
                                          "file": "f"}]}),
        ("blockdev-reopen", {"options": [{"driver": "throttle", "node-name": "t0", "throttle-group": "tg2",
                                          "file": "f"}]}),
        ("object-del", {"id": "tg2"}),
        ("blockdev-reopen", {"options": [{"driver": "throttle", "node-name": "t0", "throttle-group": "tg",
                                          "file": "f"}]}),
        ("object-del", {"id": "tg2"}),
        ("blockdev-del", {"node-name": "f"}),
        ("blockdev-del", {"node-name": "t2"}),
    ]
    started = []
    ours, theirs = await replies_of_both(tmp_path, lambda: None, steps,
                                         lambda: (started.append(daemon()) or started[0].socket))
    started[0].terminate()
    for i, (step, a, b) in enumerate(zip(steps, node_names(steps, ours), node_names(steps, theirs), strict=True)):
        assert a == b, (i, step)
