"""Shared fixtures: no test may log an unhandled error; every test is bounded."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher


@pytest.fixture(autouse=True)
def no_logged_errors() -> Iterator[list[dict[str, Any]]]:
    """Fail the test if anything logged a failure (an error lost in a Deferred, a crash)."""
    errors: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield errors
        gc.collect()  # a Deferred that failed unseen logs its error when collected
    finally:
        globalLogPublisher.removeObserver(observer)
    if errors:
        from twisted.logger import formatEvent

        texts = []
        for e in errors:
            f = e.get("log_failure")
            texts.append(formatEvent(e) + ("\n" + f.getTraceback() if f is not None else ""))
        pytest.fail("errors were logged:\n" + "\n".join(texts))


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """`make fuzz` (FUZZ_EXAMPLES=N) runs every hypothesis test with N examples."""
    n = os.environ.get("FUZZ_EXAMPLES")
    if not n:
        return
    from hypothesis import settings

    for item in items:
        fn = getattr(item, "obj", None)
        current = getattr(fn, "_hypothesis_internal_use_settings", None)
        if current is not None:
            fn._hypothesis_internal_use_settings = settings(current, max_examples=int(n), deadline=None)  # type: ignore[union-attr]


@pytest_twisted.async_yield_fixture
async def redis_server(tmp_path: Any) -> Any:
    """A real redis-server on a free loopback port for the test (killed after it)."""
    from .helpers import REDIS_SERVER, RedisServer

    if not os.path.exists(REDIS_SERVER):
        pytest.fail(f"{REDIS_SERVER} is missing: `make test-deps` installs the redis-server package")
    server = RedisServer(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def fleet_log() -> Iterator[list[str]]:
    """The fleet's log lines (``fleet: ...``) during the test."""
    from twisted.logger import formatEvent

    lines: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if (event.get("log_format") or "").startswith("fleet:"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)
