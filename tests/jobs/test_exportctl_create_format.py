"""`exportctl create` picks qcow2 by default with --backing or a .qcow2 name."""

from __future__ import annotations

import json
import subprocess


def fmt(path) -> dict:
    r = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout)


def test_default_format(exportctl, tmp_path):
    base = tmp_path / "b.qcow2"
    assert exportctl(None, "create", str(base), "10M").returncode == 0
    assert fmt(base)["format"] == "qcow2"
    top = tmp_path / "top"  # no suffix, but a backing file: qcow2
    r = exportctl(None, "create", str(top), "10M", "--backing", "b.qcow2")
    assert r.returncode == 0, r.stderr
    i = fmt(top)
    assert i["format"] == "qcow2" and i["backing-filename"] == "b.qcow2"
    assert i["backing-filename-format"] == "qcow2"
    plain = tmp_path / "d.img"
    assert exportctl(None, "create", str(plain), "1M").returncode == 0
    assert fmt(plain)["format"] == "raw"
    forced = tmp_path / "e.qcow2"  # --format still wins
    assert exportctl(None, "create", str(forced), "1M", "--format", "raw").returncode == 0
    assert fmt(forced)["format"] == "raw"
