"""What systemd (or any service manager speaking its protocols) gives
exportd and expects back, without libsystemd:

- readiness: with Type=notify, READY=1 once the monitors listen and every
  --blockdev/--export/--nbd-server is up, STOPPING=1 when shutdown starts
  (sd_notify: one datagram to $NOTIFY_SOCKET; '@' names an abstract socket);
- socket activation: listening sockets passed as fds 3.. with LISTEN_FDS
  and LISTEN_PID (sd_listen_fds), each of which becomes a QMP monitor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3


def notify(state: str) -> bool:
    """Send `state` ("READY=1", ...) to the service manager, if one listens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify the service manager at %s: %s", address, e.strerror)
        return False
    return True


def listen_fds() -> list[tuple[int, str]]:
    """The sockets passed by socket activation, as (fd, name); the variables
    are unset so that children do not take them too."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if pid != os.getpid() or count <= 0:
        return []
    fds = []
    for i in range(count):
        fd = LISTEN_FDS_START + i
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
        fds.append((fd, names[i] if i < len(names) and names[i] else f"activated{i}"))
    return fds
