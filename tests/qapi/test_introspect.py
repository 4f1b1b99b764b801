"""exportd.qapi.introspect: query-qmp-schema's honesty."""

from __future__ import annotations

from exportd import commands
from exportd.qapi.introspect import schema_info
from exportd.qapi.schema import schema


def test_qmp_schema_is_consistent_and_complete():
    s = schema()
    registered = sorted(commands.load_all())
    info = schema_info(s, registered, sorted(s.events))
    by_name = {e["name"]: e for e in info}
    assert len(by_name) == len(info), "duplicate entity names"
    referenced = set()
    for e in info:
        mt = e["meta-type"]
        assert mt in ("command", "event", "object", "enum", "array", "alternate", "builtin")
        if mt == "command":
            referenced |= {e["arg-type"], e["ret-type"]}
        elif mt == "event":
            referenced.add(e["arg-type"])
        elif mt == "object":
            referenced |= {m["type"] for m in e["members"]}
            referenced |= {v["type"] for v in e.get("variants", [])}
            if "tag" in e:
                assert e["tag"] in {m["name"] for m in e["members"]}
        elif mt == "array":
            referenced.add(e["element-type"])
        elif mt == "alternate":
            referenced |= {m["type"] for m in e["members"]}
        elif mt == "enum":
            assert e["values"] == [m["name"] for m in e["members"]]
    assert referenced <= set(by_name), referenced - set(by_name)
    for name in registered:
        assert by_name[name]["meta-type"] == "command"
    # the details libvirt probes for
    qmp_caps = by_name[by_name["qmp_capabilities"]["arg-type"]]
    assert [m["name"] for m in qmp_caps["members"]] == ["enable"]
    if "block-export-add" in by_name:
        union = by_name[by_name["block-export-add"]["arg-type"]]
        assert union["tag"] == "type"
        fuse = by_name[union["variants"][0]["type"]]
        assert {"mountpoint", "growable", "allow-other", "passthrough"} <= {m["name"] for m in fuse["members"]}
    if "blockdev-add" in by_name:
        union = by_name[by_name["blockdev-add"]["arg-type"]]
        assert {v["case"] for v in union["variants"]} == {"file", "host_device", "nbd", "null-aio", "null-co", "qcow2",
                                                              "raw", "throttle"}
        optional = {m["name"] for m in union["members"] if "default" in m}
        assert "node-name" in optional and "driver" not in optional
    assert by_name["SHUTDOWN"]["meta-type"] == "event"
    shutdown_data = by_name[by_name["SHUTDOWN"]["arg-type"]]
    assert {m["name"] for m in shutdown_data["members"]} == {"guest", "reason"}


def test_unregistered_commands_are_not_introspected():
    s = schema()
    info = schema_info(s, ["query-version"], [])
    assert [e["name"] for e in info if e["meta-type"] == "command"] == ["query-version"]
