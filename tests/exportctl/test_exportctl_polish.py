"""exportctl as scripts and people use it: global options before or after
the command, errors as JSON with --json, relative file names resolved in
the caller's directory, image sizes taken from the backing file, names
whose format is unclear refused, dirty bitmaps, and a help text for every
option of every command."""

from __future__ import annotations

import argparse
import json
import subprocess

import pytest

from exportctl.cli import build_parser


def test_global_options_anywhere(module_daemon, exportctl):
    before = exportctl(None, "--json", "-s", module_daemon.socket, "list")
    after = exportctl(None, "list", "--json", "--socket", module_daemon.socket)
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert json.loads(before.stdout) == json.loads(after.stdout) == []


def test_errors_as_json(module_daemon, exportctl, tmp_path):
    r = exportctl(module_daemon, "blockdev-del", "nope", "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout) == {"error": {"class": "GenericError",
                                              "desc": "Failed to find node with node-name='nope'"}}
    r = exportctl(None, "--json", "-s", str(tmp_path / "none.sock"), "--connect-timeout", "0.2", "list")
    assert r.returncode == 3 and json.loads(r.stdout)["error"]["class"] == "ConnectError"
    r = exportctl(None, "--json", "create", str(tmp_path / "d.vmdk"), "1M")
    assert r.returncode == 2 and json.loads(r.stdout) == {"error": {
        "class": "UsageError",
        "desc": f"cannot tell the format of '{tmp_path}/d.vmdk' from its name: give --format raw or --format qcow2"}}


def test_relative_filenames_resolved_here(daemon, exportctl, tmp_path, monkeypatch):
    d = daemon()
    (tmp_path / "rel.img").write_bytes(bytes(1 << 20))
    monkeypatch.chdir(tmp_path)
    r = exportctl(d, "blockdev-add", "driver=raw,node-name=r,file.driver=file,file.filename=rel.img")
    assert r.returncode == 0, r.stderr
    r = exportctl(d, "blockdev-add", '{"driver": "file", "node-name": "f", "filename": "rel.img", "read-only": true}')
    assert r.returncode == 0, r.stderr
    nodes = json.loads(exportctl(d, "nodes", "--json").stdout)
    assert {n["node-name"]: n["file"] for n in nodes if not n["node-name"].startswith("#")} == {
        "r": str(tmp_path / "rel.img"), "f": str(tmp_path / "rel.img")}


def test_create_sizes_and_formats(exportctl, tmp_path):
    base = tmp_path / "base.qcow2"
    assert exportctl(None, "create", str(base), "3M").returncode == 0
    top = tmp_path / "top.qcow2"
    r = exportctl(None, "--json", "create", str(top), "--backing", "base.qcow2")  # relative to top's directory
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"filename": str(top), "format": "qcow2", "size": 3 << 20}
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(top)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["virtual-size"] == 3 << 20 and info["backing-filename"] == "base.qcow2"
    r = exportctl(None, "create", str(tmp_path / "d.vmdk"), "1M")
    assert r.returncode == 2 and "give --format raw or --format qcow2" in r.stderr
    r = exportctl(None, "create", str(tmp_path / "d.vmdk"), "1M", "--format", "raw")
    assert r.returncode == 0 and (tmp_path / "d.vmdk").stat().st_size == 1 << 20
    r = exportctl(None, "create", str(tmp_path / "nosize.raw"))
    assert r.returncode == 2 and "give a SIZE" in r.stderr


def test_bitmap_commands(daemon, exportctl, tmp_path):
    d = daemon()
    img = tmp_path / "b.qcow2"
    assert exportctl(None, "create", str(img), "4M").returncode == 0
    assert exportctl(d, "blockdev-add", f"driver=qcow2,node-name=q,file.driver=file,file.filename={img}").returncode == 0
    assert exportctl(d, "bitmap", "list").stdout.strip() == "no dirty bitmaps"
    r = exportctl(d, "bitmap", "add", "q", "b0", "--granularity", "4K", "--persistent")
    assert r.returncode == 0 and r.stdout.strip() == "added bitmap b0 on q", r.stderr
    assert exportctl(d, "bitmap", "add", "q", "b1", "--disabled").returncode == 0
    assert exportctl(d, "bitmap", "merge", "q", "b1", "b0", "q:b0").returncode == 0
    listed = json.loads(exportctl(d, "bitmap", "list", "q", "--json").stdout)
    assert [(b["node"], b["name"], b["granularity"], b["recording"], b["persistent"]) for b in listed] == [
        ("q", "b1", 65536, False, False), ("q", "b0", 4096, True, True)]
    table = exportctl(d, "bitmap", "list").stdout.splitlines()
    assert table[0].split() == ["NODE", "BITMAP", "GRANULARITY", "DIRTY", "STATE", "FLAGS"]
    r = exportctl(d, "bitmap", "add", "q", "b0")
    assert r.returncode == 1 and r.stderr.strip() == "error: Bitmap already exists: b0"
    r = exportctl(d, "bitmap", "clear", "q", "b0", "--persistent")
    assert r.returncode == 2
    for verb in ("disable", "enable", "clear", "remove"):
        assert exportctl(d, "bitmap", verb, "q", "b1").returncode == 0, verb
    assert [b["name"] for b in json.loads(exportctl(d, "--json", "bitmap", "list").stdout)] == ["b0"]


def _options(parser: argparse.ArgumentParser, path: str = "exportctl"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


@pytest.mark.parametrize("where,action", list(_options(build_parser())),
                         ids=lambda x: x if isinstance(x, str) else "/".join(x.option_strings) or x.dest)
def test_every_option_has_help(where, action):
    assert action.help, f"{where}: {'/'.join(action.option_strings) or action.dest} has no help text"
