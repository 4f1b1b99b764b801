"""Running Python children as another user (`nobody`).

The checkout may sit in a directory only root can enter (a `mktemp -d`
folder, /root), where that user could import nothing from it. So the code a
child imports, the exportd package and the test filesystems, is copied into a
fresh root-owned directory under /tmp that every user may read but only root
may change, and removed afterwards. The child runs the system Python (the
venv's interpreter may be under /root too): the FUSE layer and the toy need
only the standard library.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import REPO, SUPPORT_DIR

SYSTEM_PYTHON = "/usr/bin/python3"
# what a child imports, relative to the copy's root (which goes on its PYTHONPATH)
SHARED_CODE = {
    "exportd": REPO / "server" / "exportd",
    "tests/__init__.py": None,  # a regular package: no other `tests` on the path wins
    "tests/support/__init__.py": SUPPORT_DIR / "__init__.py",
    "tests/support/toyfs.py": SUPPORT_DIR / "toyfs.py",
}


@dataclass(frozen=True)
class OtherUser:
    """A user to run children as, and the readable copy of the code they import."""

    pw_name: str
    pw_uid: int
    pw_gid: int
    pythonpath: str

    def popen_args(self, argv: list[str], **kw: Any) -> dict[str, Any]:
        """subprocess.run/Popen keyword arguments running argv as this user."""
        env = {"PYTHONPATH": self.pythonpath, "PATH": "/usr/bin:/bin", "HOME": "/"}
        return dict(
            args=argv, user=self.pw_uid, group=self.pw_gid, extra_groups=[], env=env, cwd="/", **kw
        )


def _make_readable(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


@contextmanager
def readable_code() -> Iterator[Path]:
    """A root-owned copy of SHARED_CODE every user can read, removed after."""
    root = Path(tempfile.mkdtemp(prefix="exportd-code-", dir="/tmp"))
    try:
        for rel, src in SHARED_CODE.items():
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src is None:
                dst.write_text("")
            elif src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copyfile(src, dst)
        _make_readable(root)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def other_user(name: str = "nobody") -> Iterator[OtherUser]:
    """User `name` with a readable copy of the code its children import."""
    pw = pwd.getpwnam(name)
    with readable_code() as code:
        yield OtherUser(pw.pw_name, pw.pw_uid, pw.pw_gid, str(code))
