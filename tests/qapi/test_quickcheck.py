"""The fast validity check in front of jsonschema (exportd/quickcheck.py):
it may only say yes where jsonschema says yes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exportd.qapi.schema import schema

SCHEMA = schema()

WELL_FORMED: list[tuple[str, dict[str, Any]]] = [
    ("qmp_capabilities", {}),
    ("query-block-exports", {}),
    ("block-export-add", {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/m",
                          "writable": True, "growable": False, "allow-other": "off",
                          "passthrough": "auto"}),
    ("block-export-del", {"id": "e", "mode": "hard"}),
    ("blockdev-add", {"driver": "file", "node-name": "f", "filename": "/x", "locking": "off",
                      "cache": {"direct": True}, "discard": "unmap"}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q",
                      "file": {"driver": "file", "filename": "/x"}}),
    ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f", "offset": 512, "size": 4096}),
    ("blockdev-add", {"driver": "null-co", "node-name": "z", "size": 1 << 30}),
    ("blockdev-del", {"node-name": "q"}),
]


def full_verdict(command: str, args: Any) -> bool:
    return not list(SCHEMA.validator("commands", command).iter_errors(args))


@pytest.mark.parametrize(("command", "args"), WELL_FORMED, ids=[c for c, _ in WELL_FORMED])
def test_well_formed_arguments_take_the_fast_path(command, args):
    assert full_verdict(command, args)
    assert SCHEMA._quick.valid(SCHEMA.commands[command], args)


MEMBER_NAMES = sorted(
    {name for doc in SCHEMA.commands.values() for name in SCHEMA.members(doc)}
    | {"driver", "type", "filename", "file", "direct", "bogus"}
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(allow_nan=False),
    st.sampled_from(["", "fuse", "file", "qcow2", "raw", "null-co", "on", "off", "auto",
                     "unmap", "ignore", "hard", "safe", "e", "/x"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(MEMBER_NAMES), inner, max_size=4),
    ),
    max_leaves=8,
)
ARGS = st.dictionaries(st.sampled_from(MEMBER_NAMES), VALUES, max_size=7)


def near_valid(draw_args: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    return {**base, **draw_args}


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pick=st.sampled_from(WELL_FORMED),
    changes=ARGS,
    drop=st.lists(st.sampled_from(MEMBER_NAMES), max_size=2),
)
def test_never_more_lenient_than_jsonschema(pick, changes, drop):
    command, base = pick
    args = {k: v for k, v in near_valid(changes, base).items() if k not in drop}
    if SCHEMA._quick.valid(SCHEMA.commands[command], args):
        assert full_verdict(command, args), (command, args)
