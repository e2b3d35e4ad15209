"""The one upstream selector: algorithms plus passive and active health state.

Time comes only from the injected ``clock`` (``IReactorTime``), randomness
only from the injected ``random.Random``, and hashing from MD5, so behaviour is
deterministic in tests and stable across processes (never Python's ``hash``).

Health of a member, as seen by :meth:`UpstreamGroup.select`:

* ``spec.down`` -- never used;
* passive -- ``max_fails`` failures within ``fail_timeout`` mark it *failed*
  for ``fail_timeout`` seconds; afterwards it is *probing*: the next request
  that selects it is the single probe in flight (a lease of ``fail_timeout``
  seconds, in case the caller never reports); a success restores it, a
  failure marks it failed again. ``max_fails = 0`` disables all this;
* active -- :class:`~wmproxy_tw.balance.health.HealthChecker` results via
  :meth:`UpstreamGroup.report_check` (``fall`` / ``rise`` streaks).

Backup members are considered only when no primary is usable (members in
``exclude`` count as unusable).
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from wmproxy_tw.balance.interfaces import IUpstreamSelector
from wmproxy_tw.balance.model import GroupSpec, MemberSpec

log = Logger()

VNODES_PER_WEIGHT = 160
"""Points on the consistent-hash ring per unit of weight (as nginx)."""

_IP_HASH_TRIES = 20
"""Rehashes before ip_hash gives up and falls back to round robin (as nginx)."""


def hash64(data: bytes) -> int:
    """A 64-bit hash that is the same in every process and on every platform."""
    return int.from_bytes(hashlib.md5(data, usedforsecurity=False).digest()[:8], "big")


class Member:
    """One upstream server of a group and its mutable state.

    Public: ``spec``, ``addr``, ``addr_str``, ``weight``, ``backup``,
    ``active`` (open connections). Identity-hashed, so it can go in the
    ``exclude`` set. The state is changed only through the group.
    """

    def __init__(self, spec: MemberSpec) -> None:
        self.spec = spec
        self.addr: tuple[str, int] = spec.addr
        self.addr_str = spec.addr_str
        self.weight = spec.weight
        self.backup = spec.backup
        self.active = 0
        # smooth weighted round robin (nginx)
        self.current_weight = 0
        self.effective_weight = spec.weight
        # passive health
        self._failures: deque[float] = deque()
        self._failed_until: float | None = None
        self._probe_until: float | None = None
        # active health
        self.check_healthy = True
        self._check_ok_streak = 0
        self._check_fail_streak = 0

    def __repr__(self) -> str:
        return f"<Member {self.addr_str} weight={self.weight}{' backup' if self.backup else ''}>"

    def _recent_fails(self, now: float) -> int:
        horizon = now - self.spec.fail_timeout
        return sum(1 for t in self._failures if t > horizon)

    def _state(self, now: float) -> str:
        if self.spec.down:
            return "down"
        if self._failed_until is not None:
            return "failed" if now < self._failed_until else "probing"
        if not self.check_healthy:
            return "unhealthy"
        return "up"


@implementer(IUpstreamSelector)
class UpstreamGroup:
    """Selects members of one upstream group; see the module docstring."""

    def __init__(
        self,
        spec: GroupSpec,
        clock: IReactorTime,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(spec, GroupSpec):
            raise TypeError(f"UpstreamGroup needs a GroupSpec, got {spec!r}")
        for ms in spec.members:
            # MemberSpec validates itself; the group relies on it (weights
            # are divisors and ring sizes), so it checks once more.
            if ms.weight < 1:
                raise ValueError(
                    f"upstream {spec.name!r}: {ms.addr_str} weight must be >= 1"
                )
        self.spec = spec
        self.name = spec.name
        self.lb = spec.lb
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.members: tuple[Member, ...] = tuple(Member(ms) for ms in spec.members)
        self._primaries = tuple(m for m in self.members if not m.backup)
        self._backups = tuple(m for m in self.members if m.backup)
        self._exhausted = False
        self._rings: dict[bool, tuple[list[int], list[Member]]] = {}
        if self.lb == "hash":
            self._rings[False] = _build_ring(self._primaries)
            self._rings[True] = _build_ring(self._backups)

    def __repr__(self) -> str:
        return f"<UpstreamGroup {self.name} lb={self.lb} members={len(self.members)}>"

    # -- selection -----------------------------------------------------------

    def select(
        self, key: str | None = None, exclude: AbstractSet[Member] = frozenset()
    ) -> Member | None:
        now = self._clock.seconds()
        for is_backup, tier in ((False, self._primaries), (True, self._backups)):
            usable = [m for m in tier if m not in exclude and self._usable(m, now)]
            if usable:
                chosen = self._pick(is_backup, tier, usable, key)
                if chosen._failed_until is not None:
                    # half-open: this request is the one probe in flight
                    chosen._probe_until = now + chosen.spec.fail_timeout
                    log.info(
                        "upstream {group} probing {member} after fail_timeout",
                        group=self.name,
                        member=chosen.addr_str,
                    )
                if self._exhausted:
                    self._exhausted = False
                    log.info(
                        "upstream {group} has usable members again", group=self.name
                    )
                return chosen
        if not exclude and not self._exhausted:
            # logged once per outage, not once per refused request
            self._exhausted = True
            log.warn(  # noqa: G010 (twisted.logger has no .warning)
                "upstream {group}: no usable member", group=self.name
            )
        return None

    def _usable(self, m: Member, now: float) -> bool:
        if m.spec.down or not m.check_healthy:
            return False
        if m._failed_until is None:
            return True
        if now < m._failed_until:
            return False
        return m._probe_until is None or now >= m._probe_until

    def _pick(
        self,
        is_backup: bool,
        tier: Sequence[Member],
        usable: list[Member],
        key: str | None,
    ) -> Member:
        if len(usable) == 1:
            if self.lb in ("round_robin", "least_conn"):
                return _smooth_rr(usable)  # keep the weights' bookkeeping
            return usable[0]
        if self.lb == "random":
            return self._rng.choices(usable, weights=[m.weight for m in usable])[0]
        if self.lb == "least_conn":
            return _least_conn(usable)
        if self.lb == "ip_hash" and key is not None:
            return _ip_hash(tier, usable, key)
        if self.lb == "hash" and key is not None:
            return _ring_lookup(self._rings[is_backup], usable, key)
        return _smooth_rr(usable)

    # -- connection accounting -----------------------------------------------

    def connection_started(self, member: Member) -> None:
        member.active += 1

    def connection_finished(self, member: Member) -> None:
        if member.active <= 0:
            log.error(
                "upstream {group}: connection_finished({member}) without a start",
                group=self.name,
                member=member.addr_str,
            )
            return
        member.active -= 1

    # -- passive health ------------------------------------------------------

    def report_success(self, member: Member) -> None:
        if member._failed_until is None:
            return
        if self._clock.seconds() < member._failed_until:
            # a late answer from before the member was marked failed
            return
        self._back(member, "")

    def _back(self, member: Member, how: str) -> None:
        """End ``member``'s passive failure (``how`` says what showed it works again)."""
        member._failed_until = None
        member._probe_until = None
        member._failures.clear()
        log.info("upstream {group}: {member} is back{how}", group=self.name, member=member.addr_str, how=how)

    def report_failure(self, member: Member) -> None:
        spec = member.spec
        if spec.max_fails == 0:
            return
        now = self._clock.seconds()
        member.effective_weight = max(
            0, member.effective_weight - member.weight // spec.max_fails
        )
        if member._failed_until is not None:
            if now < member._failed_until:
                return  # already failed; nothing new to learn
            member._failures.append(now)
            self._mark_failed(member, now, "probe failed")
            return
        member._failures.append(now)
        horizon = now - spec.fail_timeout
        while member._failures and member._failures[0] <= horizon:
            member._failures.popleft()
        if len(member._failures) >= spec.max_fails:
            self._mark_failed(member, now, f"{len(member._failures)} failures")

    def _mark_failed(self, member: Member, now: float, why: str) -> None:
        member._failed_until = now + member.spec.fail_timeout
        member._probe_until = None
        member._check_ok_streak = 0  # active checks must see it good again, from now on
        log.warn(  # noqa: G010 (twisted.logger has no .warning)
            "upstream {group}: {member} marked failed for {seconds}s ({why})",
            group=self.name,
            member=member.addr_str,
            seconds=member.spec.fail_timeout,
            why=why,
        )

    # -- active health (driven by HealthChecker) -----------------------------

    def report_check(self, member: Member, ok: bool, *, fall: int, rise: int) -> None:
        """Record one active check result; ``fall``/``rise`` streaks flip health.

        ``rise`` successful checks also end a passive failure (one counted
        from the moment the member was marked failed), so a member that was
        down comes back after ``rise × interval``, not after ``fail_timeout``.
        """
        if ok:
            member._check_fail_streak = 0
            member._check_ok_streak += 1
            if member._check_ok_streak >= rise:
                if not member.check_healthy:
                    member.check_healthy = True
                    log.info(
                        "upstream {group}: {member} healthy after {n} checks",
                        group=self.name,
                        member=member.addr_str,
                        n=member._check_ok_streak,
                    )
                if member._failed_until is not None:
                    self._back(member, f" ({member._check_ok_streak} good checks)")
        else:
            member._check_ok_streak = 0
            member._check_fail_streak += 1
            if member.check_healthy and member._check_fail_streak >= fall:
                member.check_healthy = False
                log.warn(  # noqa: G010 (twisted.logger has no .warning)
                    "upstream {group}: {member} unhealthy after {n} failed checks",
                    group=self.name,
                    member=member.addr_str,
                    n=member._check_fail_streak,
                )

    # -- state ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = self._clock.seconds()
        members = []
        for m in self.members:
            state = m._state(now)
            members.append(
                {
                    "addr": m.addr_str,
                    "weight": m.weight,
                    "healthy": state == "up",
                    "state": state,
                    "active": m.active,
                    "fails": m._recent_fails(now),
                    "backup": m.backup,
                    "down": m.spec.down,
                    "check_healthy": m.check_healthy,
                    "failed_for": (
                        max(0.0, m._failed_until - now)
                        if m._failed_until is not None
                        else 0.0
                    ),
                }
            )
        return {"name": self.name, "lb": self.lb, "members": members}

    def carry_state_from(self, old: UpstreamGroup) -> None:
        """Copy health state from ``old`` (a group being replaced on reload).

        Matches members by address. Connection counts stay with the old group:
        connections opened under the old config report to it until they end.
        """
        by_addr = {m.addr: m for m in old.members}
        for m in self.members:
            prev = by_addr.get(m.addr)
            if prev is None:
                continue
            m.check_healthy = prev.check_healthy
            m._check_ok_streak = prev._check_ok_streak
            m._check_fail_streak = prev._check_fail_streak
            if m.spec.max_fails == 0:
                continue
            m._failures = deque(prev._failures)
            m._failed_until = prev._failed_until
            m._probe_until = prev._probe_until
            m.effective_weight = min(m.weight, prev.effective_weight)


# -- algorithms ----------------------------------------------------------------


def _smooth_rr(candidates: Iterable[Member]) -> Member:
    """nginx smooth weighted round robin over ``candidates`` (non-empty)."""
    best: Member | None = None
    total = 0
    for m in candidates:
        m.current_weight += m.effective_weight
        total += m.effective_weight
        if m.effective_weight < m.weight:
            m.effective_weight += 1
        if best is None or m.current_weight > best.current_weight:
            best = m
    assert best is not None
    best.current_weight -= total
    return best


def _least_conn(usable: list[Member]) -> Member:
    """Fewest ``active / weight``; ties by smooth round robin among them."""
    best = usable[0]
    ties = [best]
    for m in usable[1:]:
        # m.active / m.weight vs best.active / best.weight without floats
        lhs = m.active * best.weight
        rhs = best.active * m.weight
        if lhs < rhs:
            best = m
            ties = [m]
        elif lhs == rhs:
            ties.append(m)
    if len(ties) == 1:
        return best
    return _smooth_rr(ties)


def _ip_hash(tier: Sequence[Member], usable: list[Member], key: str) -> Member:
    """Weighted, stable pick over the whole tier; rehash while it hits unusable ones."""
    usable_ids = {id(m) for m in usable}
    total = sum(m.weight for m in tier)
    h = hash64(key.encode("utf-8", "surrogateescape"))
    for _ in range(_IP_HASH_TRIES):
        w = h % total
        for m in tier:
            w -= m.weight
            if w < 0:
                break
        if id(m) in usable_ids:
            return m
        h = hash64(h.to_bytes(8, "big"))
    return _smooth_rr(usable)


def _build_ring(members: Sequence[Member]) -> tuple[list[int], list[Member]]:
    points: list[tuple[int, int, Member]] = []
    for index, m in enumerate(members):
        for i in range(VNODES_PER_WEIGHT * m.weight):
            points.append((hash64(f"{m.addr_str}#{i}".encode()), index, m))
    points.sort(key=lambda p: (p[0], p[1]))
    return [p[0] for p in points], [p[2] for p in points]


def _ring_lookup(
    ring: tuple[list[int], list[Member]], usable: list[Member], key: str
) -> Member:
    """First usable member clockwise from the key's point (consistent hashing)."""
    points, owners = ring
    usable_ids = {id(m) for m in usable}
    n = len(points)
    start = bisect_left(points, hash64(key.encode("utf-8", "surrogateescape")))
    for step in range(n):
        m = owners[(start + step) % n]
        if id(m) in usable_ids:
            return m
    return _smooth_rr(usable)  # unreachable: every usable member owns points
