"""exportd as a package: a wheel built from the tree carries the schema,
the man pages and the shell completion, and works installed into a fresh
venv and run by a user who is not root; the generated files in share/ are
those `make docs` makes now; the bash completion offers commands and the
running daemon's node names."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _without_date(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith(".TH "))


def test_generated_docs_are_current(tmp_path):
    pytest.importorskip("shtab")
    manpage = shutil.which("argparse-manpage", path=str(VENV_BIN))
    if manpage is None:
        pytest.skip("argparse-manpage missing (make setup installs it)")
    for module, section, name in (("exportd.cli", "8", "exportd.8"), ("exportctl.cli", "1", "exportctl.1")):
        out = tmp_path / name
        subprocess.run([manpage, "--module", module, "--function", "build_parser", "--project-name", "exportd",
                        "--manual-section", section, "--output", str(out)], check=True, capture_output=True)
        committed = (ROOT / "share" / "man" / name).read_text()
        # only the options part is compared (the title line holds the date and the make target's extra words)
        fresh_options = _without_date(out.read_text()).split(".SH OPTIONS", 1)[1]
        assert committed.split(".SH OPTIONS", 1)[1].strip() == fresh_options.strip(), f"run make docs ({name})"
    from exportctl.completion import script

    assert (ROOT / "share/completion/exportctl.bash").read_text() == script("bash"), "run make docs"
    assert (ROOT / "share/completion/_exportctl").read_text() == script("zsh"), "run make docs"


def test_bash_completion_offers_commands_and_nodes(daemon, raw_qmp, tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    d = daemon()
    c = raw_qmp(d)
    c.negotiate()
    assert c.cmd("blockdev-add", {"driver": "null-co", "node-name": "alpha"}) == {"return": {}}

    def complete(*words: str) -> list[str]:
        script = (f"source {ROOT}/share/completion/exportctl.bash\n"
                  f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
                  f"COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}\n"
                  "_shtab_exportctl; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
        env = {**os.environ, "EXPORTD_SOCKET": d.socket, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
        return [w for w in r.stdout.split() if w]

    assert "bitmap" in complete("exportctl", "bit")
    assert complete("exportctl", "blockdev-del", "al") == ["alpha"]
    assert "--json" in complete("exportctl", "list", "--js")


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root")
def test_wheel_installs_and_runs_as_a_plain_user():
    # not under pytest's tmp_path: its parents are private to root
    work = Path(tempfile.mkdtemp(prefix="exportd-pkg-"))
    try:
        _install_and_run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _install_and_run(work: Path) -> None:
    os.chmod(work, 0o755)
    dist = work / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("exportd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "exportd/schema/commands/blockdev-add.json" in names
    assert any(n.endswith("share/man/man8/exportd.8") for n in names)
    assert any(n.endswith("share/bash-completion/completions/exportctl.bash") for n in names)
    venv = work / "venv"
    # the system's interpreter: ours may live where only root can read (pyenv under /root)
    base_python = "/usr/bin/python3"
    version = subprocess.run([base_python, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                             capture_output=True, text=True)
    if version.stdout.strip() != "True":
        pytest.skip("no system python3 >= 3.11 for a plain user")
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, capture_output=True,
                   timeout=600)
    assert (venv / "share" / "man" / "man8" / "exportd.8").exists()
    user = pwd.getpwnam("nobody")
    sock = work / "run" / "qmp.sock"
    sock.parent.mkdir()
    os.chown(sock.parent, user.pw_uid, user.pw_gid)
    proc = subprocess.Popen(["runuser", "-u", "nobody", "--", str(venv / "bin" / "exportd"), "--socket", str(sock)],
                            cwd="/", stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert sock.stat().st_uid == user.pw_uid
        r = subprocess.run(["runuser", "-u", "nobody", "--", str(venv / "bin" / "exportctl"), "-s", str(sock),
                            "--json", "qmp", "query-commands"], capture_output=True, text=True, timeout=60, cwd="/")
        assert r.returncode == 0, r.stderr
        assert {"name": "blockdev-add"} in json.loads(r.stdout)
        r = subprocess.run(["runuser", "-u", "nobody", "--", str(venv / "bin" / "exportctl"), "-s", str(sock), "quit"],
                           capture_output=True, text=True, timeout=60, cwd="/")
        assert r.returncode == 0, r.stderr
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
