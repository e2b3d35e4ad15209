"""Hostile clients against one wmproxy-tw instance running every listener (issue 9, SPEC §10/§12).

The cases are the table in tests/hostile.py (``python -m tests.hostile_table`` prints it with
nginx's and HAProxy's answers).  Each case must get our expected answer within its bound; where the
table claims we match nginx or HAProxy, they must give the same status; nothing may be smuggled to
the origin; the instance never logs a traceback; and a well-behaved client of the abused listener
(and of the reverse proxy) is served right after.  The slow cases run all at once while
well-behaved clients of every listener keep being served.

What the per-feature suites already pin is not repeated here (the reverse proxy's smuggling
inputs are replayed only to compare with nginx and HAProxy on the same origin, and on the other
HTTP listeners): the in-process smuggling battery never reaching the upstream (test_reverse.py),
a 100 MB WebSocket frame closed 1009 and stalled WebSocket peers pausing TCP (test_websocket.py),
the forward proxy's CONNECT reader that never reads (test_forward.py), garbage on center_addr
(test_tunnel.py), file-server traversal (test_files.py), and the sans-IO fuzzing
(tests/unit/test_fuzz_forward.py and friends).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from ..helpers import deferLater
from ..hostile import BOUND, CASES, LISTENERS, Case, Stack, matches, probe, rss_kb, run_case, status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

RSS_SLACK_KB = 24 * 1024
"""What one hostile input may add to the instance's RSS (its inputs are 1 MiB to 256 MiB)."""


@pytest_twisted.async_yield_fixture(scope="module")
async def stack(tmp_path_factory: Any) -> AsyncIterator[Stack]:
    """The instance under abuse, nginx and HAProxy: started once for the module."""
    s = await Stack(tmp_path_factory.mktemp("hostile")).start()
    try:
        yield s
    finally:
        await s.stop()


def _no_traceback(stack: Stack) -> None:
    log = stack.log()
    assert b"Traceback" not in log and b"Unhandled" not in log, log.decode(errors="replace")[-4000:]


def _check(case: Case, got: dict[str, str]) -> None:
    assert any(matches(got["ours"], e) for e in case.expected), (case.name, got)
    assert "⚠" not in got["ours"], (case.name, got)
    for peer in case.match:
        if peer in got:
            assert status(got[peer]) == status(got["ours"]), (case.name, peer, got)


FAMILIES = sorted({c.family for c in CASES} - {"slow"})


@pytest.mark.parametrize("family", FAMILIES)
@pytest_twisted.ensureDeferred
async def test_hostile_inputs(stack: Stack, family: str) -> None:
    """Each input of the family gets the table's answer (and the peers' where claimed); the abused
    listener and the reverse proxy serve a well-behaved client right after; memory stays bounded."""
    failures = []
    for case in (c for c in CASES if c.family == family):
        before = rss_kb(stack.pid)
        try:
            got = await run_case(stack, case)
            _check(case, got)
            await probe(stack, case.target)
            if case.target != "reverse":
                await probe(stack, "reverse")
            if case.rss:
                assert rss_kb(stack.pid) - before < RSS_SLACK_KB, (case.name, rss_kb(stack.pid), before)
        except Exception as e:  # noqa: BLE001 - every case of the family is played, failures reported together
            failures.append(f"{case.name}: {e!r}")
    assert not failures, "\n".join(failures)
    _no_traceback(stack)


@pytest_twisted.ensureDeferred
async def test_slow_clients_all_at_once_while_others_are_served(stack: Stack) -> None:
    """Slow-loris on every listener with a deadline, idle and slow-reading clients, all at once:
    each is answered (408, close, paused origin) within its bound, and well-behaved clients of
    every listener are served during and after."""
    slow = [c for c in CASES if c.slow]
    before = rss_kb(stack.pid)
    done: list[bool] = []

    async def keep_probing() -> int:
        rounds = 0
        while not done:
            await defer.gatherResults([defer.ensureDeferred(probe(stack, n)) for n in LISTENERS],
                                      consumeErrors=True)
            rounds += 1
            await deferLater(0.2)
        return rounds

    prober = defer.ensureDeferred(keep_probing())
    try:
        results = await defer.gatherResults([defer.ensureDeferred(run_case(stack, c)) for c in slow],
                                            consumeErrors=True)
    finally:
        done.append(True)
    assert await prober >= 2
    for case, got in zip(slow, results, strict=True):
        _check(case, got)
        if case.kind == "slowread":
            assert "NOT" not in got["ours"] and "not paused" not in got["ours"], got
    assert rss_kb(stack.pid) - before < RSS_SLACK_KB
    for name in LISTENERS:
        await probe(stack, name)
    _no_traceback(stack)


def test_every_case_has_a_bound_and_a_known_listener() -> None:
    """The table is well-formed: unique names, known listeners, peers only on the reverse proxy."""
    assert len({c.name for c in CASES}) == len(CASES)
    for c in CASES:
        assert c.target in LISTENERS, c.name
        assert not c.match or c.peers, c.name
        assert not c.peers or c.target == "reverse", c.name
    assert BOUND <= 5.0
