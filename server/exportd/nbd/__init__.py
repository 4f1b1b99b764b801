"""The NBD protocol (NetworkBlockDevice's doc/proto.md, QEMU's docs/interop/nbd.rst).

protocol.py   wire format: every constant and the pack/unpack helpers, shared
              by the server and the client driver
server.py     the server: listeners, handshake, transmission phase
"""
