"""The daemon starts, greets, negotiates and quits (qemu.qmp client)."""

from qemu.qmp import ExecuteError


async def test_version_and_quit(daemon, qmp):
    d = daemon()
    client = await qmp(d)
    ver = await client.execute("query-version")
    assert ver["package"].startswith("exportd ")
    assert set(ver["qemu"]) == {"major", "minor", "micro"}
    try:
        await client.execute("no-such-command")
    except ExecuteError as e:
        assert e.error_class == "CommandNotFound"
        assert str(e) == "The command no-such-command has not been found"
    else:
        raise AssertionError("unknown command succeeded")
    await client.execute("quit")
    assert d.wait(15) == 0
