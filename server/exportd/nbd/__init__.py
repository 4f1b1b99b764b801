"""The NBD protocol (NetworkBlockDevice's doc/proto.md, QEMU's docs/interop/nbd.rst).

protocol.py   wire format: every constant and the pack/unpack helpers, shared
              by the server and the client driver
server.py     the server: listeners, connection limits, nbd-server-start/stop
connection.py one client: fixed newstyle negotiation, then the transmission phase
meta.py       meta contexts (base:allocation, qemu:allocation-depth) and their extents
"""
