"""Replies of a real daemon match the x-returns of their schema (so
query-qmp-schema's ret-types tell clients the truth)."""

from __future__ import annotations

from exportd.qapi import schema


def test_replies_match_schema(daemon, raw_qmp):
    d = daemon("--blockdev", "driver=null-co,node-name=n0,size=1M")
    c = raw_qmp(d)
    c.negotiate()
    s = schema()
    commands = {x["name"] for x in c.cmd("query-commands")["return"]}
    s.check_returns("query-commands", [{"name": n} for n in sorted(commands)])
    for name in ("query-version", "query-commands", "query-qmp-schema",
                 "query-named-block-nodes", "query-block-exports"):
        if name not in commands:
            continue
        reply = c.cmd(name)
        assert "return" in reply, reply
        s.check_returns(name, reply["return"])
