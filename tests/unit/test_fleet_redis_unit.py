"""RedisManager pieces that need no server: command encoding, failing fast, scripts."""

from __future__ import annotations

import txredisapi
from twisted.internet.task import Clock

from wmproxy_tw.fleet.redis import RedisManager, RedisUnavailable, Script, _CommandProtocol


def test_command_encoding_matches_txredisapi() -> None:
    """Our one-join RESP encoder writes the same bytes as txredisapi's for every argument type."""
    args = ("EVALSHA", "abc", 1, "k:é", b"\x00\xff", bytearray(b"ba"), 0.25, 10**12, -3, "")
    ours = _CommandProtocol()._build_command(*args)
    theirs = txredisapi.BaseRedisProtocol()._build_command(*args)
    assert ours == theirs


def test_commands_fail_fast_before_start() -> None:
    """Not started / not connected: execute and run fail at once with RedisUnavailable (no waiting)."""
    r = RedisManager(Clock(), "redis://127.0.0.1:1/0")
    failures: list[object] = []
    r.execute("PING").addErrback(lambda f: failures.append(f.check(RedisUnavailable)))
    r.run(Script("return 1")).addErrback(lambda f: failures.append(f.check(RedisUnavailable)))
    assert failures == [RedisUnavailable, RedisUnavailable] and not r.available


def test_script_sha_and_password_precedence() -> None:
    """A Script is named by the SHA1 of its text; a separate password wins over the URL's."""
    assert Script("return 1").sha == "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
    assert RedisManager(Clock(), "redis://:a@h/0").password == "a"
    assert RedisManager(Clock(), "redis://:a@h/0", password="b").password == "b"
    assert "a@" not in repr(RedisManager(Clock(), "redis://:a@h/0"))
