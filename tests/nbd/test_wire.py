"""exportd.nbd.protocol: the helpers round-trip, and their bytes are the
layouts of proto.md (sizes, magics at the right place)."""

from __future__ import annotations

import pytest

from exportd.nbd import protocol as P


def test_request_and_replies_round_trip() -> None:
    req = P.Request(P.CMD_FLAG_FUA, P.CMD_WRITE, 0x1122334455667788, 1 << 40, 4096)
    raw = P.pack_request(req)
    assert len(raw) == 28 and raw[:4] == bytes.fromhex("25609513")
    assert P.unpack_request(raw) == req
    assert len(P.pack_request(req, extended=True)) == 32
    assert P.unpack_request(P.pack_request(req, extended=True), extended=True) == req
    simple = P.pack_simple_reply(7, P.EIO)
    assert len(simple) == 16 and P.unpack_simple_reply(simple) == P.SimpleReply(P.EIO, 7)
    chunk = P.pack_chunk(9, P.REPLY_TYPE_OFFSET_HOLE, P.pack_offset_hole(512, 1024), P.REPLY_FLAG_DONE)
    hdr = P.unpack_chunk_header(chunk[:20])
    assert hdr == P.ChunkHeader(P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_HOLE, 9, 12)
    ext = P.pack_extended_chunk_header(9, P.REPLY_TYPE_BLOCK_STATUS_EXT, 40, 0, 4096)
    assert P.unpack_chunk_header(ext) == P.ChunkHeader(0, P.REPLY_TYPE_BLOCK_STATUS_EXT, 9, 40, 4096)
    with pytest.raises(P.ProtocolError):
        P.unpack_request(b"\0" * 28)


def test_option_payloads_round_trip() -> None:
    opt = P.pack_option(P.OPT_GO, P.pack_go("disk", [P.INFO_NAME, P.INFO_BLOCK_SIZE]))
    assert P.unpack_option_header(opt[:16]) == P.OptionHeader(P.OPT_GO, len(opt) - 16)
    assert P.unpack_go(opt[16:]) == ("disk", [P.INFO_NAME, P.INFO_BLOCK_SIZE])
    q = P.pack_meta_context_query("disk", ["base:allocation", "qemu:"])
    assert P.unpack_meta_context_query(q) == ("disk", ["base:allocation", "qemu:"])
    rep = P.pack_option_reply(P.OPT_LIST, P.REP_SERVER, P.pack_server_reply("a", "desc"))
    h = P.unpack_option_reply_header(rep[:20])
    assert h == P.OptionReplyHeader(P.OPT_LIST, P.REP_SERVER, len(rep) - 20)
    assert P.unpack_server_reply(rep[20:]) == ("a", "desc")
    assert len(P.pack_info_export(1, 2)) == 12 and len(P.pack_info_block_size(1, 2, 3)) == 14
    with pytest.raises(P.ProtocolError):
        P.unpack_go(P.pack_string("x") + b"\0\5")  # 5 infos announced, none there


def test_block_status_and_errors() -> None:
    ext = [(4096, P.STATE_HOLE | P.STATE_ZERO), (8192, 0)]
    assert P.unpack_block_status(P.pack_block_status(3, ext)) == (3, ext)
    assert P.unpack_block_status(P.pack_block_status_ext(3, ext), extended=True) == (3, ext)
    assert P.unpack_error_payload(P.pack_error_payload(P.EINVAL, "bad", 512)) == (P.EINVAL, "bad", 512)
    assert P.unpack_error_payload(P.pack_error_payload(P.EIO)) == (P.EIO, "", None)
    assert P.errno_to_nbd(30) == P.EPERM and P.errno_to_nbd(2) == P.EINVAL  # EROFS, ENOENT
    assert P.nbd_to_errno(P.ENOSPC) == 28 and P.reply_type_is_error(P.REPLY_TYPE_ERROR_OFFSET)
