"""python -m http.server with byte ranges: the standard library's server
answers every GET with the whole file, and nbdkit's curl plugin needs
`Range: bytes=a-b` (206 Partial Content) and `Accept-Ranges: bytes`.

    python -m tests.support.range_http DIRECTORY PORTFILE

binds 127.0.0.1 on a free port and writes that port to PORTFILE once it
listens (so a test can wait for the file, not guess a port)."""

from __future__ import annotations

import functools
import os
import re
import sys
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class RangeHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def send_head(self):  # noqa: ANN201 - the base class's contract
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return super().send_head()
        f = open(path, "rb")  # noqa: SIM115 - the base class closes it
        size = os.fstat(f.fileno()).st_size
        m = _RANGE.match(self.headers.get("Range", ""))
        if m is None:
            self.send_response(HTTPStatus.OK)
            start, end = 0, size - 1
        else:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if start >= size:
                f.close()
                self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                return None
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        f.seek(start)
        self._left = end - start + 1
        return f

    def copyfile(self, source, outputfile) -> None:  # noqa: ANN001
        left = getattr(self, "_left", None)
        while left is None or left > 0:
            chunk = source.read(1 << 20 if left is None else min(left, 1 << 20))
            if not chunk:
                break
            outputfile.write(chunk)
            if left is not None:
                left -= len(chunk)


def main() -> None:
    directory, portfile = sys.argv[1], sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=directory))
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(tmp, portfile)
    server.serve_forever()


if __name__ == "__main__":
    main()
