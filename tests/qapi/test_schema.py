"""schema/ and exportd.qapi.schema: files load, references resolve, errors read as QEMU's."""

from __future__ import annotations

import json

import jsonschema
import pytest

from exportd import commands
from exportd.errors import QMPError
from exportd.qapi.schema import Schema, default_schema_dir, param_name, schema


@pytest.fixture(scope="module")
def s() -> Schema:
    return schema()


def test_every_file_is_a_valid_json_schema(s):
    files = sorted(default_schema_dir().rglob("*.json"))
    assert len(files) >= 14
    for path in files:
        doc = json.loads(path.read_text())
        jsonschema.Draft202012Validator.check_schema(doc)


def test_every_reference_resolves(s):
    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                target = s.resolve(node)
                assert isinstance(target, dict) and "$ref" not in target, node["$ref"]
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for doc in s.docs.values():
        walk(doc)


def test_described_commands_and_events(s):
    expected = {
        "qmp_capabilities", "query-version", "query-commands", "query-qmp-schema", "quit",
        "blockdev-add", "blockdev-del", "query-named-block-nodes", "blockdev-create",
        "block-export-add", "block-export-del", "query-block-exports",
        "query-jobs", "job-dismiss", "job-cancel", "job-finalize",
    }
    assert expected <= set(s.commands)
    assert {"SHUTDOWN", "BLOCK_EXPORT_DELETED", "JOB_STATUS_CHANGE"} <= set(s.events)


def test_every_registered_command_has_a_schema(s):
    registered = set(commands.load_all())
    assert registered - set(s.commands) == set()


def err(s: Schema, command: str, args: dict) -> str:
    with pytest.raises(QMPError) as ei:
        s.validate(command, args)
    assert ei.value.cls == "GenericError"
    return ei.value.desc


# Each text checked against what qemu-storage-daemon 7.2 answers for the same input.
@pytest.mark.parametrize(
    "command, args, text",
    [
        ("blockdev-add", {"node-name": "n"}, "Parameter 'driver' is missing"),
        ("blockdev-add", {"driver": "file"}, "Parameter 'filename' is missing"),
        ("blockdev-add", {"driver": "xx"}, "Parameter 'driver' does not accept value 'xx'"),
        ("blockdev-add", {"driver": 7}, "Invalid parameter type for 'driver', expected: string"),
        ("blockdev-add", {"driver": "file", "filename": 1},
         "Invalid parameter type for 'filename', expected: string"),
        ("blockdev-add", {"driver": "file", "filename": "x", "foo": 1, "node-name": "n"},
         "Parameter 'foo' is unexpected"),
        ("blockdev-add", {"driver": "raw", "file": {"driver": "file"}}, "Parameter 'file.filename' is missing"),
        ("blockdev-add", {"driver": "raw", "file": {}}, "Parameter 'file.driver' is missing"),
        ("blockdev-add", {"driver": "raw", "file": {"driver": "bad"}},
         "Parameter 'file.driver' does not accept value 'bad'"),
        ("blockdev-add", {"driver": "raw", "file": {"driver": "file", "filename": "x", "zz": 1}},
         "Parameter 'file.zz' is unexpected"),
        ("blockdev-add", {"driver": "raw", "file": 1}, "Invalid parameter type for 'file', expected: BlockdevRef"),
        ("blockdev-add", {"driver": "qcow2", "file": "f", "backing": 1},
         "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
        ("blockdev-add", {"driver": "qcow2", "file": "f", "backing": [1]},
         "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
        ("blockdev-add", {"driver": "file", "filename": "x", "aio": "bad"},
         "Parameter 'aio' does not accept value 'bad'"),
        ("blockdev-add", {"driver": "file", "filename": "x", "aio": 1},
         "Invalid parameter type for 'aio', expected: string"),
        ("blockdev-add", {"driver": "file", "filename": "x", "cache": 1},
         "Invalid parameter type for 'cache', expected: object"),
        ("blockdev-add", {"driver": "file", "filename": "x", "cache": {"direct": 1}},
         "Invalid parameter type for 'cache.direct', expected: boolean"),
        ("blockdev-add", {"driver": "file", "filename": "x", "cache": {"direct": True, "x": 1}},
         "Parameter 'cache.x' is unexpected"),
        ("blockdev-add", {"driver": "file", "filename": "x", "discard": 1},
         "Invalid parameter type for 'discard', expected: string"),
        ("blockdev-add", {"driver": "file", "filename": "x", "detect-zeroes": "bad"},
         "Parameter 'detect-zeroes' does not accept value 'bad'"),
        ("blockdev-add", {"driver": "file", "filename": "x", "aio-max-batch": "a"},
         "Invalid parameter type for 'aio-max-batch', expected: integer"),
        ("blockdev-add", {"driver": "null-co", "size": 1.5}, "Invalid parameter type for 'size', expected: integer"),
        ("blockdev-add", {"driver": "null-co", "size": 1e3}, "Invalid parameter type for 'size', expected: integer"),
        ("blockdev-add", {"driver": "null-co", "size": "1"}, "Invalid parameter type for 'size', expected: integer"),
        ("blockdev-add", {"driver": "null-co", "read-zeroes": "on"},
         "Invalid parameter type for 'read-zeroes', expected: boolean"),
        ("blockdev-add", {"driver": "null-co", "latency-ns": -2}, "Parameter 'latency-ns' expects uint64"),
        ("blockdev-add", {"driver": "file", "node-name": 1, "filename": "x"},
         "Invalid parameter type for 'node-name', expected: string"),
        ("blockdev-del", {}, "Parameter 'node-name' is missing"),
        ("block-export-add", {"type": "fuse", "id": "e"}, "Parameter 'node-name' is missing"),
        ("block-export-add", {"type": "fusex", "id": "e"}, "Parameter 'type' does not accept value 'fusex'"),
        ("block-export-add", {"type": "fuse", "id": "e", "node-name": "n"}, "Parameter 'mountpoint' is missing"),
        ("block-export-add", {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "m",
                              "allow-other": "maybe"}, "Parameter 'allow-other' does not accept value 'maybe'"),
        ("block-export-add", {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "m",
                              "passthrough": True}, "Invalid parameter type for 'passthrough', expected: string"),
        ("block-export-add", {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "m", "x": 1},
         "Parameter 'x' is unexpected"),
        ("block-export-del", {"id": "e", "mode": "x"}, "Parameter 'mode' does not accept value 'x'"),
        ("query-named-block-nodes", {"flat": "x"}, "Invalid parameter type for 'flat', expected: boolean"),
        ("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2"}}, "Parameter 'options.file' is missing"),
        ("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "f", "size": 1,
                                                         "version": "v4"}},
         "Parameter 'options.version' does not accept value 'v4'"),
        ("query-commands", {"a": 1}, "Parameter 'a' is unexpected"),
        ("qmp_capabilities", {"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
        ("qmp_capabilities", {"enable": [1]}, "Invalid parameter type for 'enable[0]', expected: string"),
    ],
)
def test_qemu_error_texts(s, command, args, text):
    assert err(s, command, args) == text


def test_missing_is_reported_before_unexpected(s):
    assert err(s, "blockdev-add", {"driver": "file", "bogus": 1}) == "Parameter 'filename' is missing"
    assert err(s, "block-export-del", {"zz": 1}) == "Parameter 'id' is missing"
    # nested missing beats a top-level unexpected member, too
    assert err(s, "blockdev-add", {"driver": "raw", "zz": 1, "file": {"driver": "file"}}) == \
        "Parameter 'file.filename' is missing"


def test_union_branch_only(s):
    # members of another driver are unexpected for this one
    assert err(s, "blockdev-add", {"driver": "null-co", "filename": "x"}) == "Parameter 'filename' is unexpected"
    assert err(s, "blockdev-add", {"driver": "file", "filename": "x", "read-zeroes": True}) == \
        "Parameter 'read-zeroes' is unexpected"


@pytest.mark.parametrize(
    "command, args",
    [
        ("blockdev-add", {"driver": "file", "filename": "/x", "node-name": "a", "read-only": True,
                          "cache": {"direct": True, "no-flush": False}, "discard": "unmap",
                          "aio": "native", "locking": "off", "detect-zeroes": "unmap",
                          "auto-read-only": False, "force-share": True, "aio-max-batch": 0}),
        ("blockdev-add", {"driver": "host_device", "filename": "/dev/null"}),
        ("blockdev-add", {"driver": "raw", "file": "f", "offset": 512, "size": 4096}),
        ("blockdev-add", {"driver": "raw", "file": {"driver": "file", "filename": "x"}}),
        ("blockdev-add", {"driver": "null-co", "size": 1 << 30, "read-zeroes": True, "latency-ns": 10}),
        ("blockdev-add", {"driver": "qcow2", "file": {"driver": "file", "filename": "a.qcow2"},
                          "backing": None, "lazy-refcounts": True, "l2-cache-size": 1 << 20,
                          "refcount-cache-size": 65536, "cache-size": 1 << 21, "cache-clean-interval": 0,
                          "pass-discard-request": True}),
        ("blockdev-add", {"driver": "qcow2", "file": "f", "backing": {"driver": "qcow2", "file": "g"}}),
        ("blockdev-del", {"node-name": "x"}),
        ("block-export-add", {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/m",
                              "writable": True, "writethrough": False, "growable": True,
                              "allow-other": "auto", "passthrough": "off"}),
        ("block-export-del", {"id": "e", "mode": "hard"}),
        ("query-block-exports", {}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "x", "size": 1 << 20,
                                                          "preallocation": "falloc"}}),
        ("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "n", "size": 1 << 30,
                                                          "version": "v3", "cluster-size": 65536,
                                                          "backing-file": "b.qcow2", "backing-fmt": "qcow2"}}),
        ("qmp_capabilities", {"enable": []}),
    ],
)
def test_valid_arguments_pass(s, command, args):
    assert s.validate(command, args) is args


def test_event_schemas(s):
    s.validate_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    s.validate_event("SHUTDOWN", {"guest": False, "reason": "host-signal"})
    s.validate_event("BLOCK_EXPORT_DELETED", {"id": "e"})
    with pytest.raises(QMPError):
        s.validate_event("SHUTDOWN", {"guest": False})


def test_param_name():
    assert param_name(["file", "filename"]) == "file.filename"
    assert param_name(["enable", 0]) == "enable[0]"
    assert param_name(["a", 1, "b"]) == "a[1].b"


def test_check_returns(s):
    s.check_returns("query-version", {"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": "exportd 0"})
    with pytest.raises(QMPError):
        s.check_returns("query-version", {"qemu": {"major": 9}, "package": "x"})


def test_absurd_nesting_is_refused_quickly(s):
    node: dict = {"driver": "null-co"}
    for _ in range(200):
        node = {"driver": "raw", "file": node}
    text = err(s, "blockdev-add", node)
    assert text.startswith("Parameter 'file.file.") and text.endswith("nests deeper than 64 levels")
    ok: dict = {"driver": "null-co"}
    for _ in range(10):
        ok = {"driver": "raw", "file": ok}
    s.validate("blockdev-add", ok)
