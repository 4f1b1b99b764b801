"""object-add / object-del / --object of the authorization objects
(authz-simple, authz-list, authz-listfile): the same script against
exportd and qemu-storage-daemon 7.2 (identical replies), then what only
exportd has (Debian's qemu-storage-daemon 7.2 says `invalid object type:
authz-listfile`), with QEMU's texts from authz/listfile.c."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exportd.authz import (
    QOM_PROPERTIES,
    AuthzError,
    AuthzList,
    AuthzSimple,
    Rule,
    _glob,
    decide,
    is_allowed_by_id,
    read_list_file,
)
from tests.support.daemon import Exportd
from tests.support.qsd import QSD, replies_of, running_qsd


def add(qom_type: str, oid: str, **props: Any) -> tuple[str, dict[str, Any]]:
    return ("object-add", {"qom-type": qom_type, "id": oid, **props})


RULE = {"match": "CN=*", "policy": "deny", "format": "glob"}
SCRIPT = [
    add("authz-simple", "a1", identity="C=GB,CN=x"),
    add("authz-simple", "a2"),
    add("authz-simple", "a3", identity=5),
    add("authz-simple", "a1", identity="CN=y"),  # duplicate
    add("authz-simple", "a4", identity=""),
    add("authz-simple", "a5", identity="x", policy="allow"),
    add("authz-list", "l1"),
    add("authz-list", "l2", policy="allow", rules=[RULE, {"match": "CN=a", "policy": "allow"}]),
    add("authz-list", "l3", policy="maybe"),
    add("authz-list", "l3", policy=1),
    add("authz-list", "l3", rules=[{"match": "x"}]),
    add("authz-list", "l3", rules=[{"policy": "allow"}]),
    add("authz-list", "l3", rules=[{"match": 1, "policy": "allow"}]),
    add("authz-list", "l3", rules={"match": "x", "policy": "allow"}),
    add("authz-list", "l3", rules=["x"]),
    add("authz-list", "l3", rules=[{"match": "x", "policy": "allow", "extra": 1}]),
    add("authz-list", "l3", rules=[]),
    add("authz-list", "l4", identity="x"),
    add("authz-list", "1bad"),
    add("authz-listfile", "f0"),
    add("authz-listfile", "f0", filename=7),
    add("authz-listfile", "f0", filename="/x", refresh="yes"),
    ("object-del", {"id": "a1"}),
    ("object-del", {"id": "a1"}),
    ("object-del", {"id": "l2"}),
    add("authz-list", "l2", policy="deny"),  # the id is free again
    ("qom-list", {"path": "/objects"}),
    ("qom-list", {"path": "/objects/l2"}),
    ("qom-list", {"path": "a4"}),
    ("qom-get", {"path": "l2", "property": "policy"}),
    ("qom-get", {"path": "l2", "property": "rules"}),
    ("qom-set", {"path": "l2", "property": "policy", "value": "allow"}),
    ("qom-get", {"path": "l2", "property": "policy"}),
    ("qom-set", {"path": "l2", "property": "rules", "value": [RULE]}),
    ("qom-get", {"path": "l2", "property": "rules"}),
    ("qom-set", {"path": "l2", "property": "policy", "value": "maybe"}),
    ("qom-set", {"path": "a4", "property": "identity", "value": "CN=z"}),
    ("qom-get", {"path": "a4", "property": "identity"}),
    ("qom-get", {"path": "a4", "property": "nope"}),
]


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_same_replies_as_qemu(daemon, tmp_path: Path) -> None:
    async with running_qsd(str(tmp_path / "qsd.sock")):
        theirs = await replies_of(str(tmp_path / "qsd.sock"), SCRIPT)
    ours = await replies_of(daemon().socket, SCRIPT)
    for i, (step, a, b) in enumerate(zip(SCRIPT, ours, theirs, strict=True)):
        if step[0] == "qom-list":  # the order of /objects' children is QEMU's hash order
            a, b = sorted(map(json.dumps, a["return"])), sorted(map(json.dumps, b["return"]))
        assert a == b, (i, step)
    assert sum("return" in r for r in ours) == 19  # the script does succeed where it should


# exportd's schema layer names a nested enum member by its path; QEMU 7.2's
# visitor by its bare name (a difference of exportd.qapi.schema, all commands)
NESTED_ENUM = [
    (add("authz-list", "l3", rules=[{"match": "x", "policy": "allow", "format": "regex"}]), "rules[0].format",
     "format", "regex"),
    (add("authz-list", "l3", rules=[{"match": "x", "policy": "perhaps"}]), "rules[0].policy", "policy", "perhaps"),
]


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_nested_enum_texts(daemon, tmp_path: Path) -> None:
    steps = [step for step, *_ in NESTED_ENUM]
    async with running_qsd(str(tmp_path / "qsd.sock")):
        theirs = await replies_of(str(tmp_path / "qsd.sock"), steps)
    ours = await replies_of(daemon().socket, steps)
    for (_, path, name, value), a, b in zip(NESTED_ENUM, ours, theirs, strict=True):
        assert a == {"error": ["GenericError", f"Parameter '{path}' does not accept value '{value}'"]}
        assert b == {"error": ["GenericError", f"Parameter '{name}' does not accept value '{value}'"]}


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
async def test_command_line_same_as_qemu(daemon, tmp_path: Path) -> None:
    # keyval: ',,' is a comma in a value; a list is rules.N.member
    objects = ["--object", "authz-simple,id=a0,identity=C=GB,,O=Example Org,,CN=laptop",
               "--object", "authz-list,id=l0,policy=allow,rules.0.match=CN=*,rules.0.policy=deny,"
                           "rules.0.format=glob,rules.1.match=x,rules.1.policy=allow",
               "--object", '{"qom-type": "authz-list", "id": "l1", "rules": [{"match": "y", "policy": "allow"}]}']
    steps = [add("authz-simple", oid, identity="z") for oid in ("a0", "l0", "l1")]
    async with running_qsd(str(tmp_path / "qsd.sock"), *objects):
        theirs = await replies_of(str(tmp_path / "qsd.sock"), steps)
    ours = await replies_of(daemon(*objects).socket, steps)
    assert ours == theirs
    assert all("duplicate" in r["error"][1] for r in ours)


def test_glob_is_glibs_simple_pattern() -> None:
    # g_pattern_match_simple: '*' any string (also empty), '?' one character, nothing else special
    cases = [("*", "", True), ("C=GB,*", "C=GB,CN=a", True), ("C=GB,*", "C=FR,CN=a", False),
             ("CN=?", "CN=é", True), ("CN=?", "CN=ab", False), ("[ab]", "a", False), ("[ab]", "[ab]", True),
             ("a.c", "abc", False), ("a\\*", "a\\xyz", True), ("*O=Org*", "C=GB,O=Org,CN=x", True)]
    for pattern, text, expected in cases:
        assert (_glob(pattern).fullmatch(text) is not None) is expected, (pattern, text)
    rules = [Rule("*CN=intruder*", "deny", "glob"), Rule("C=GB,*", "allow", "glob"), Rule("CN=x", "allow")]
    assert decide(rules, "deny", "C=GB,CN=laptop")
    assert not decide(rules, "allow", "C=GB,CN=intruder")  # the first match decides
    assert decide(rules, "deny", "CN=x") and not decide(rules, "deny", "CN=y")
    assert decide([], "allow", "anything") and not decide([], "deny", "anything")


async def test_lookup_texts() -> None:
    objects: dict[str, Any] = {"l": AuthzList("l", "allow"), "tls0": object()}
    assert await is_allowed_by_id(objects, "l", "CN=x")
    for oid, text in (("nope", "Cannot find QAuthZ object ID nope"),
                      ("tls0", "Object 'tls0' is not a QAuthZ subclass")):
        with pytest.raises(AuthzError) as e:
            await is_allowed_by_id(objects, oid, "CN=x")
        assert str(e.value) == text


def listfile_cases(d: Path) -> list[tuple[str, str | None]]:
    """(file content or None for no file, the object-add error or "" for success)."""
    return [
        ('{"policy": "allow", "rules": [{"match": "CN=*", "policy": "deny", "format": "glob"}]}', ""),
        ("{}", ""),
        (None, "Unable to read '{f}': Failed to open file \u201c{f}\u201d: No such file or directory"),
        ("[1]", "File '{f}' must contain a JSON object"),
        ('"allow"', "File '{f}' must contain a JSON object"),
        ("", "Expecting a JSON value"),
        ("  \n", "Expecting a JSON value"),
        ("{} {}", "Expecting at most one JSON value"),
        ('{"policy": "allow"', "JSON parse error, premature EOF"),
        ('{"foo": 1}', "Property 'authz-list.foo' not found"),
        ('{"id": "x"}', "Property 'authz-list.id' not found"),
        ('{"policy": "maybe"}', "Parameter 'policy' does not accept value 'maybe'"),
        ('{"policy": 1}', "Invalid parameter type for 'policy', expected: string"),
        ('{"rules": {}}', "Invalid parameter type for 'rules', expected: array"),
        ('{"rules": [1]}', "Invalid parameter type for 'rules[0]', expected: object"),
        ('{"rules": [{"policy": "allow"}]}', "Parameter 'rules[0].match' is missing"),
        ('{"rules": [{"match": "x"}]}', "Parameter 'rules[0].policy' is missing"),
        ('{"rules": [{"match": "x", "policy": "allow", "format": "regex"}]}',
         "Parameter 'format' does not accept value 'regex'"),
        ('{"rules": [{"match": "x", "policy": "allow", "x": 1}]}', "Parameter 'rules[0].x' is unexpected"),
    ]


async def test_listfile_objects(workdir: Path) -> None:
    d = Exportd(workdir)
    try:
        await d.start()
        for i, (content, error) in enumerate(listfile_cases(workdir)):
            f = workdir / f"acl{i}.json"
            if content is not None:
                f.write_text(content)
            args = {"qom-type": "authz-listfile", "id": f"f{i}", "filename": str(f)}
            if error:
                assert await d.error("object-add", args) == error.format(f=f), (i, content)
            else:
                await d.cmd("object-add", args)
                await d.cmd("object-del", {"id": f"f{i}"})
        good = workdir / "acl0.json"
        # exportd runs in workdir (tests.support.daemon): a relative name reads from
        # there; with refresh (the default) QEMU wants a directory in it to watch
        assert await d.error("object-add", {"qom-type": "authz-listfile", "id": "r",
                                            "filename": "acl0.json"}) == "Filename must be an absolute path"
        (workdir / "rel").mkdir()
        (workdir / "rel" / "acl.json").write_text("{}")
        await d.cmd("object-add", {"qom-type": "authz-listfile", "id": "rel", "filename": "rel/acl.json"})
        await d.cmd("object-add", {"qom-type": "authz-listfile", "id": "r", "filename": "acl0.json",
                                   "refresh": False})
        await d.cmd("object-add", {"qom-type": "authz-listfile", "id": "w", "filename": str(good)})
        assert await d.error("object-add", {"qom-type": "authz-listfile", "id": "w",
                                            "filename": str(good)}) == \
            "attempt to add duplicate property 'w' to object (type 'container')"
        fds = len(list(Path(f"/proc/{d.pid}/fd").iterdir()))
        await d.cmd("object-del", {"id": "w"})  # its inotify descriptor goes with it
        assert len(list(Path(f"/proc/{d.pid}/fd").iterdir())) == fds - 1
        await d.cmd("object-del", {"id": "r"})
    finally:
        await d.stop()


def test_read_list_file(tmp_path: Path) -> None:
    f = tmp_path / "acl.json"
    f.write_text('{"policy": "allow", "rules": [{"match": "CN=?", "policy": "deny", "format": "glob"}]}')
    acl = read_list_file(str(f))
    assert acl.policy == "allow" and acl.rules == [Rule("CN=?", "deny", "glob")]
    with pytest.raises(AuthzError) as e:
        read_list_file(str(tmp_path))
    assert str(e.value) == (f"Unable to read '{tmp_path}': Error reading file \u201c{tmp_path}\u201d: "
                            "Is a directory")


async def test_qom_rows_and_live_setters() -> None:
    # what exportd.qom needs to show and change these objects as qemu-storage-daemon 7.2 does
    # (qom-list /objects/l1: type, policy QAuthZListPolicy, rules QAuthZListRule)
    acl = AuthzList.from_args({"id": "l1", "rules": [{"match": "a", "policy": "allow"}]})
    rows = QOM_PROPERTIES[AuthzList]
    assert [(n, t) for n, (t, _) in rows.items()] == [("policy", "QAuthZListPolicy"), ("rules", "QAuthZListRule")]
    assert rows["rules"][1](acl) == [{"match": "a", "policy": "allow"}] and rows["policy"][1](acl) == "deny"
    assert not await acl.is_allowed("b")
    acl.qom_set("policy", "allow")
    assert await acl.is_allowed("b")
    acl.qom_set("rules", [{"match": "b*", "policy": "deny", "format": "glob"}])
    assert not await acl.is_allowed("bee") and await acl.is_allowed("a")
    simple = AuthzSimple("s", "CN=a")
    simple.qom_set("identity", "CN=b")
    assert await simple.is_allowed("CN=b") and QOM_PROPERTIES[AuthzSimple]["identity"][1](simple) == "CN=b"
