"""In-memory doubles of the balance seams, for tests of the modules that use them."""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from zope.interface import implementer

from wmproxy_tw.balance.interfaces import IHealthChecker, IUpstreamSelector
from wmproxy_tw.balance.model import MemberSpec
from wmproxy_tw.balance.selector import Member


@implementer(IUpstreamSelector)
class FakeSelector:
    """Hands out its members in order (skipping ``exclude`` and ``unusable``).

    Every call is appended to ``events`` as ``(method, member)``; put members
    in ``unusable`` to simulate them being down.
    """

    def __init__(
        self,
        addrs: Sequence[tuple[str, int]] = (("127.0.0.1", 8080),),
        name: str = "fake",
    ) -> None:
        self.name = name
        self.members = tuple(Member(MemberSpec(host, port)) for host, port in addrs)
        self.unusable: set[Member] = set()
        self.events: list[tuple[str, Member | None]] = []

    def select(
        self, key: str | None = None, exclude: AbstractSet[Member] = frozenset()
    ) -> Member | None:
        for m in self.members:
            if m not in exclude and m not in self.unusable:
                self.events.append(("select", m))
                return m
        self.events.append(("select", None))
        return None

    def connection_started(self, member: Member) -> None:
        member.active += 1
        self.events.append(("connection_started", member))

    def connection_finished(self, member: Member) -> None:
        member.active -= 1
        self.events.append(("connection_finished", member))

    def report_success(self, member: Member) -> None:
        self.events.append(("report_success", member))

    def report_failure(self, member: Member) -> None:
        self.events.append(("report_failure", member))

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lb": "fake",
            "members": [
                {
                    "addr": m.addr_str,
                    "weight": m.weight,
                    "healthy": m not in self.unusable,
                    "active": m.active,
                    "fails": 0,
                    "backup": m.backup,
                    "down": m.spec.down,
                }
                for m in self.members
            ],
        }


@implementer(IHealthChecker)
class FakeHealthChecker:
    """Records start/stop; probes nothing."""

    def __init__(self) -> None:
        self.running = False
        self.starts = 0
        self.stops = 0

    def start(self) -> None:
        if not self.running:
            self.running = True
            self.starts += 1

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.stops += 1
