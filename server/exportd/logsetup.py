"""Where the daemon's log lines go.

In the foreground: stderr. With --log-file: that file (appended; the path
is resolved before --daemonize leaves the directory). Daemonized without a
log file: syslog, i.e. the journal on systemd machines (/dev/log), since
stderr then goes to /dev/null; --syslog asks for it in the foreground too.
The level is --log-level (default warning; EXPORTD_DEBUG=1 means debug);
at debug every QMP command is one line (exportd.daemon)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

FORMAT = "exportd: %(levelname)s: %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s exportd[%(process)d]: %(levelname)s: %(name)s: %(message)s"
SYSLOG_FORMAT = "exportd[%(process)d]: %(levelname)s: %(name)s: %(message)s"
SYSLOG_SOCKET = os.environ.get("EXPORTD_SYSLOG_SOCKET", "/dev/log")  # the variable is for tests
LEVELS = ("debug", "info", "warning", "error")


def level_of(name: str | None) -> int:
    if name is None:
        name = "debug" if os.environ.get("EXPORTD_DEBUG") else "warning"
    return getattr(logging, name.upper())


def configure(level: str | None, log_file: str | None, syslog: bool) -> None:
    """The handlers for a daemon starting in the foreground (stderr stays
    until detach_stderr(), so startup errors reach the user)."""
    root = logging.getLogger()
    root.setLevel(level_of(level))
    for h in list(root.handlers):
        root.removeHandler(h)
    if log_file is not None:
        handler: logging.Handler = logging.FileHandler(os.path.abspath(log_file), encoding="utf-8")
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
    elif syslog:
        handler = _syslog_handler() or _stderr_handler()
    else:
        handler = _stderr_handler()
    root.addHandler(handler)


def detach_stderr() -> None:
    """Daemonized: stderr now leads nowhere; a stderr handler becomes syslog."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__):
            root.removeHandler(h)
            replacement = _syslog_handler()
            if replacement is not None:
                root.addHandler(replacement)


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def _syslog_handler() -> logging.Handler | None:
    if not os.path.exists(SYSLOG_SOCKET):
        return None  # no syslog daemon or journal here: nothing to log to
    try:
        handler = logging.handlers.SysLogHandler(address=SYSLOG_SOCKET,
                                                 facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        return None
    handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    return handler
