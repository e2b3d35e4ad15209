"""Unit tests of the upstream selector (wmproxy_tw.balance.selector) on a fake clock."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from wmproxy_tw.balance import (
    GroupSpec,
    HealthCheckSpec,
    IUpstreamSelector,
    Member,
    MemberSpec,
    UpstreamGroup,
)
from wmproxy_tw.balance.selector import hash64
from wmproxy_tw.balance.testing import FakeSelector

pytestmark = pytest.mark.timeout(5)


def spec(port: int, **kw: object) -> MemberSpec:
    return MemberSpec("10.0.0.1", port, **kw)  # type: ignore[arg-type]


def make(
    *members: MemberSpec,
    lb: str = "round_robin",
    clock: Clock | None = None,
    rng: random.Random | None = None,
    hash_key: str | None = None,
) -> UpstreamGroup:
    if lb == "hash" and hash_key is None:
        hash_key = "{path}"
    return UpstreamGroup(
        GroupSpec("g", tuple(members), lb=lb, hash_key=hash_key),
        clock if clock is not None else Clock(),
        rng=rng,
    )


def ports(group: UpstreamGroup, n: int, **kw: object) -> list[int | None]:
    out: list[int | None] = []
    for _ in range(n):
        m = group.select(**kw)  # type: ignore[arg-type]
        out.append(None if m is None else m.addr[1])
    return out


def fail(group: UpstreamGroup, member: Member, times: int) -> None:
    for _ in range(times):
        group.report_failure(member)


# -- interfaces and validation ---------------------------------------------------


def test_group_and_fake_provide_selector_interface() -> None:
    """UpstreamGroup and the FakeSelector double both provide IUpstreamSelector."""
    assert verifyObject(IUpstreamSelector, make(spec(1)))
    assert verifyObject(IUpstreamSelector, FakeSelector())


def test_weight_zero_is_rejected() -> None:
    """A member with weight 0 raises ValueError when built."""
    with pytest.raises(ValueError, match="weight"):
        spec(1, weight=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 0},
        {"port": 65536},
        {"weight": -1},
        {"max_fails": -1},
        {"fail_timeout": 0},
        {"weight": True},
    ],
)
def test_bad_member_specs_are_rejected(kwargs: dict) -> None:
    """Out-of-range member fields raise ValueError naming the problem."""
    args = {"port": 80, **kwargs}
    with pytest.raises(ValueError):
        MemberSpec("h", **args)


def test_bad_group_specs_are_rejected() -> None:
    """Empty groups, duplicate addresses, unknown lb and hash without key are errors."""
    with pytest.raises(ValueError, match="at least one"):
        GroupSpec("g", ())
    with pytest.raises(ValueError, match="twice"):
        GroupSpec("g", (spec(1), spec(1)))
    with pytest.raises(ValueError, match="lb"):
        GroupSpec("g", (spec(1),), lb="fastest")
    with pytest.raises(ValueError, match="hash_key"):
        GroupSpec("g", (spec(1),), lb="hash")


# -- round robin -----------------------------------------------------------------


def test_round_robin_3_to_1_is_exact_over_1000() -> None:
    """Smooth RR with weights 3:1 picks exactly 750/250 in 1000 selections."""
    g = make(spec(1, weight=3), spec(2, weight=1))
    assert Counter(ports(g, 1000)) == {1: 750, 2: 250}


def test_round_robin_follows_nginx_sequence_for_5_1_1() -> None:
    """Weights {a:5, b:1, c:1} give nginx's smooth sequence a,a,b,a,c,a,a (repeating)."""
    g = make(spec(1, weight=5), spec(2), spec(3))
    assert ports(g, 14) == [1, 1, 2, 1, 3, 1, 1] * 2


def test_round_robin_equal_weights_rotate() -> None:
    """Equal weights rotate through the members in configuration order."""
    g = make(spec(1), spec(2), spec(3))
    assert ports(g, 6) == [1, 2, 3, 1, 2, 3]


def test_failure_lowers_effective_weight_then_recovers() -> None:
    """As nginx: a failure lowers effective weight by weight/max_fails, regained per pick."""
    g = make(spec(1, weight=6, max_fails=3), spec(2, weight=6))
    a = g.members[0]
    g.report_failure(a)
    assert a.effective_weight == 4
    ports(g, 2)
    assert a.effective_weight == 6


# -- random ----------------------------------------------------------------------


def test_random_is_weighted_within_5_percent() -> None:
    """Weighted random with a seeded RNG lands within 5% of the 3:1 split."""
    g = make(spec(1, weight=3), spec(2), lb="random", rng=random.Random(1234))
    counts = Counter(ports(g, 10_000))
    assert abs(counts[1] - 7500) <= 375
    assert counts[1] + counts[2] == 10_000


def test_random_is_deterministic_with_injected_rng() -> None:
    """Two groups with equally seeded RNGs pick the same sequence."""
    g1 = make(spec(1), spec(2), spec(3), lb="random", rng=random.Random(7))
    g2 = make(spec(1), spec(2), spec(3), lb="random", rng=random.Random(7))
    assert ports(g1, 50) == ports(g2, 50)


# -- least_conn ------------------------------------------------------------------


def test_least_conn_prefers_idle_member() -> None:
    """least_conn picks the member with the fewest active connections."""
    g = make(spec(1), spec(2), spec(3), lb="least_conn")
    a, b, c = g.members
    g.connection_started(a)
    g.connection_started(a)
    g.connection_started(c)
    assert g.select() is b


def test_least_conn_divides_by_weight() -> None:
    """least_conn compares active/weight: 2 conns at weight 3 beat 1 conn at weight 1."""
    g = make(spec(1, weight=3), spec(2), lb="least_conn")
    a, b = g.members
    for m in (a, a, b):
        g.connection_started(m)
    assert g.select() is a


def test_least_conn_breaks_ties_by_round_robin() -> None:
    """Idle members tie and are taken in weighted round-robin order."""
    g = make(spec(1), spec(2), spec(3), lb="least_conn")
    assert ports(g, 6) == [1, 2, 3, 1, 2, 3]


def test_least_conn_spreads_open_connections() -> None:
    """Holding each chosen connection open spreads them evenly."""
    g = make(spec(1), spec(2), spec(3), lb="least_conn")
    for _ in range(9):
        m = g.select()
        assert m is not None
        g.connection_started(m)
    assert [m.active for m in g.members] == [3, 3, 3]


# -- ip_hash ---------------------------------------------------------------------


def test_hash64_is_md5_based_and_process_independent() -> None:
    """hash64 is the first 8 bytes of MD5, so mappings survive restarts and PYTHONHASHSEED."""
    assert hash64(b"abc") == int(hashlib.md5(b"abc").hexdigest()[:16], 16)


def test_ip_hash_pins_a_client_to_one_member() -> None:
    """The same client IP always gets the same member; many IPs spread over all."""
    g = make(spec(1), spec(2), spec(3), lb="ip_hash")
    for i in range(20):
        ip = f"192.0.2.{i}"
        assert len(set(ports(g, 10, key=ip))) == 1
    seen = {g.select(key=f"198.51.100.{i}") for i in range(200)}
    assert seen == set(g.members)


def test_ip_hash_is_the_same_in_a_fresh_group() -> None:
    """A rebuilt group (e.g. another worker) maps every key identically."""
    members = (spec(1), spec(2, weight=2), spec(3))
    g1, g2 = make(*members, lb="ip_hash"), make(*members, lb="ip_hash")
    keys = [f"203.0.113.{i}" for i in range(100)]
    assert [g1.select(key=k).addr for k in keys] == [
        g2.select(key=k).addr for k in keys
    ]


def test_ip_hash_rehashes_to_a_usable_member_and_returns_after_recovery() -> None:
    """When the pinned member is down the key moves to another one, stably, and back later."""
    clock = Clock()
    g = make(spec(1), spec(2), spec(3), lb="ip_hash", clock=clock)
    key = "192.0.2.77"
    home = g.select(key=key)
    assert home is not None
    fail(g, home, 3)
    moved = {g.select(key=key) for _ in range(10)}
    assert len(moved) == 1 and home not in moved
    clock.advance(30)
    assert g.select(key=key) is home  # the probe
    g.report_success(home)
    assert g.select(key=key) is home


def test_ip_hash_without_key_falls_back_to_round_robin() -> None:
    """ip_hash with no key (e.g. a unix client) behaves as round robin."""
    g = make(spec(1), spec(2), lb="ip_hash")
    assert ports(g, 4) == [1, 2, 1, 2]


# -- consistent hash -------------------------------------------------------------


def test_hash_removing_one_of_four_remaps_only_its_keys() -> None:
    """Removing one of 4 members moves only the keys it owned, about a quarter of them."""
    four = [spec(p) for p in (1, 2, 3, 4)]
    g4 = make(*four, lb="hash")
    g3 = make(*four[:3], lb="hash")
    keys = [f"/item/{i}" for i in range(2000)]
    before = {k: g4.select(key=k).addr[1] for k in keys}
    after = {k: g3.select(key=k).addr[1] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == 4 for k in moved)
    assert len(moved) == sum(1 for k in keys if before[k] == 4)
    assert 0.15 <= len(moved) / len(keys) <= 0.35


def test_hash_failed_member_keys_move_others_stay() -> None:
    """A failed member's keys go elsewhere; every other key keeps its member."""
    g = make(*(spec(p) for p in (1, 2, 3, 4)), lb="hash")
    keys = [f"k{i}" for i in range(500)]
    before = {k: g.select(key=k) for k in keys}
    victim = g.members[1]
    fail(g, victim, 3)
    for k in keys:
        now = g.select(key=k)
        if before[k] is victim:
            assert now is not victim
        else:
            assert now is before[k]


def test_hash_respects_weights() -> None:
    """A weight-3 member owns about three quarters of the ring against a weight-1 one."""
    g = make(spec(1, weight=3), spec(2), lb="hash")
    counts = Counter(g.select(key=f"/p/{i}").addr[1] for i in range(4000))
    assert 0.65 <= counts[1] / 4000 <= 0.85


# -- passive health --------------------------------------------------------------


def test_passive_max_fails_within_window_marks_member_failed() -> None:
    """max_fails failures inside fail_timeout take the member out for fail_timeout."""
    clock = Clock()
    g = make(spec(1, max_fails=3, fail_timeout=30), spec(2), clock=clock)
    a = g.members[0]
    fail(g, a, 2)
    assert 1 in ports(g, 2)
    g.report_failure(a)
    clock.advance(29.9)
    assert set(ports(g, 10)) == {2}
    assert g.snapshot()["members"][0]["state"] == "failed"


def test_passive_failures_spread_beyond_window_do_not_mark() -> None:
    """Failures further apart than fail_timeout never add up to max_fails."""
    clock = Clock()
    g = make(spec(1, max_fails=3, fail_timeout=30), spec(2), clock=clock)
    a = g.members[0]
    for _ in range(5):
        g.report_failure(a)
        clock.advance(16)
    assert 1 in ports(g, 2)


def test_passive_half_open_allows_one_probe_then_restores() -> None:
    """After fail_timeout exactly one request probes the member; success puts it back."""
    clock = Clock()
    g = make(spec(1, fail_timeout=30), spec(2), clock=clock)
    a = g.members[0]
    fail(g, a, 3)
    clock.advance(30)
    picks = ports(g, 10)
    assert picks.count(1) == 1
    assert g.snapshot()["members"][0]["state"] == "probing"
    g.report_success(a)
    assert ports(g, 4).count(1) == 2
    assert g.snapshot()["members"][0]["healthy"] is True


def test_passive_probe_failure_marks_failed_again() -> None:
    """A failed probe takes the member out for another full fail_timeout."""
    clock = Clock()
    g = make(spec(1, fail_timeout=30), spec(2), clock=clock)
    a = g.members[0]
    fail(g, a, 3)
    clock.advance(30)
    assert 1 in ports(g, 2)
    g.report_failure(a)
    clock.advance(29)
    assert set(ports(g, 6)) == {2}
    clock.advance(1)
    assert ports(g, 6).count(1) == 1


def test_passive_unreported_probe_lease_expires() -> None:
    """A probe whose outcome is never reported frees the slot after fail_timeout."""
    clock = Clock()
    g = make(spec(1, fail_timeout=10), spec(2), clock=clock)
    a = g.members[0]
    fail(g, a, 3)
    clock.advance(10)
    assert ports(g, 4).count(1) == 1
    clock.advance(9)
    assert ports(g, 4).count(1) == 0
    clock.advance(1)
    assert ports(g, 4).count(1) == 1


def test_passive_late_success_during_window_is_ignored() -> None:
    """A success reported while the member is failed (an old request) does not restore it."""
    clock = Clock()
    g = make(spec(1), spec(2), clock=clock)
    a = g.members[0]
    fail(g, a, 3)
    g.report_success(a)
    assert set(ports(g, 4)) == {2}


def test_max_fails_zero_disables_passive_marking() -> None:
    """With max_fails = 0 failures never take a member out."""
    g = make(spec(1, max_fails=0), spec(2))
    fail(g, g.members[0], 50)
    assert ports(g, 4) == [1, 2, 1, 2]


def test_single_member_group_marked_failed_gives_none() -> None:
    """A one-member group whose member failed has nothing to offer: None (→ 502)."""
    g = make(spec(1))
    fail(g, g.members[0], 3)
    assert g.select() is None


# -- down, backup, exclude, all down -----------------------------------------------


def test_down_member_is_never_used() -> None:
    """A member configured down = true is never selected, by any algorithm or key."""
    for lb in ("round_robin", "random", "least_conn", "ip_hash", "hash"):
        g = make(spec(1, down=True), spec(2), lb=lb, rng=random.Random(0))
        assert {g.select(key=f"k{i}").addr[1] for i in range(50)} == {2}


def test_backup_only_when_every_primary_is_unusable() -> None:
    """Backups idle while a primary is usable, serve when all primaries fail, yield after."""
    clock = Clock()
    g = make(spec(1), spec(2), spec(9, backup=True), clock=clock)
    a, b, _ = g.members
    fail(g, a, 3)
    assert set(ports(g, 6)) == {2}
    fail(g, b, 3)
    assert set(ports(g, 6)) == {9}
    clock.advance(30)
    first = g.select()
    assert first in (a, b)
    g.report_success(first)
    assert 9 not in ports(g, 6)


def test_backup_used_when_primaries_are_excluded() -> None:
    """A retry that already tried every primary falls through to the backups."""
    g = make(spec(1), spec(2), spec(9, backup=True))
    a, b, backup = g.members
    assert g.select(exclude=frozenset({a})) is b
    assert g.select(exclude=frozenset({a, b})) is backup


def test_all_down_gives_none() -> None:
    """When no primary and no backup is usable select returns None at once."""
    g = make(spec(1), spec(2, down=True), spec(9, backup=True))
    a, _, backup = g.members
    fail(g, a, 3)
    fail(g, backup, 3)
    assert g.select() is None
    assert g.select(key="x") is None


def test_exclude_skips_tried_members_for_every_algorithm() -> None:
    """Excluded members are never returned; excluding all usable ones gives None."""
    for lb in ("round_robin", "random", "least_conn", "ip_hash", "hash"):
        g = make(spec(1), spec(2), spec(3), lb=lb, rng=random.Random(0))
        a, b, c = g.members
        for i in range(30):
            assert g.select(key=f"k{i}", exclude=frozenset({a, c})) is b
        assert g.select(key="k", exclude=frozenset(g.members)) is None


# -- active health state, accounting, snapshot, reload ---------------------------------


def test_actively_unhealthy_member_is_not_used() -> None:
    """fall failed checks take a member out; rise good checks bring it back."""
    g = make(spec(1), spec(2))
    a = g.members[0]
    for _ in range(2):
        g.report_check(a, False, fall=2, rise=2)
    assert set(ports(g, 4)) == {2}
    g.report_check(a, True, fall=2, rise=2)
    assert set(ports(g, 4)) == {2}
    g.report_check(a, True, fall=2, rise=2)
    assert 1 in ports(g, 2)


def test_member_brought_back_by_checks_is_not_held_by_passive_state() -> None:
    """A member marked failed passively and by checks is usable as soon as rise checks pass."""
    g = make(spec(1), spec(2))
    a = g.members[0]
    for _ in range(3):
        g.report_failure(a)
    g.report_check(a, False, fall=1, rise=2)
    assert set(ports(g, 4)) == {2}
    g.report_check(a, True, fall=1, rise=2)
    g.report_check(a, True, fall=1, rise=2)
    assert 1 in ports(g, 2)


def test_passive_failure_ends_after_rise_fresh_good_checks() -> None:
    """Checks that stayed good during a passive failure bring the member back only after rise new ones."""
    g = make(spec(1), spec(2))
    a = g.members[0]
    for _ in range(5):
        g.report_check(a, True, fall=1, rise=2)
    for _ in range(3):
        g.report_failure(a)
    g.report_check(a, True, fall=1, rise=2)
    assert set(ports(g, 4)) == {2}
    g.report_check(a, True, fall=1, rise=2)
    assert 1 in ports(g, 2)


def test_connection_counting_never_goes_negative() -> None:
    """connection_started/finished track active; an unmatched finish is ignored."""
    g = make(spec(1))
    a = g.members[0]
    g.connection_started(a)
    g.connection_finished(a)
    g.connection_finished(a)
    assert a.active == 0


def test_snapshot_is_json_serialisable_with_member_state() -> None:
    """snapshot() lists every member with addr, weight, healthy, active, fails, backup, down."""
    g = make(spec(1, weight=2), spec(2, down=True), spec(3, backup=True))
    a = g.members[0]
    g.connection_started(a)
    g.report_failure(a)
    snap = json.loads(json.dumps(g.snapshot()))
    assert snap["name"] == "g" and snap["lb"] == "round_robin"
    first, second, third = snap["members"]
    assert first == first | {
        "addr": "10.0.0.1:1",
        "weight": 2,
        "healthy": True,
        "active": 1,
        "fails": 1,
        "backup": False,
        "down": False,
    }
    assert second["healthy"] is False and second["down"] is True
    assert third["backup"] is True


def test_snapshot_brackets_ipv6_addresses() -> None:
    """IPv6 member addresses are shown as [addr]:port."""
    g = make(MemberSpec("::1", 8080))
    assert g.snapshot()["members"][0]["addr"] == "[::1]:8080"


def test_carry_state_from_copies_health_by_address() -> None:
    """On reload a member with the same address keeps its health; new ones start up."""
    clock = Clock()
    old = make(spec(1), spec(2), clock=clock)
    a_old, b_old = old.members
    fail(old, a_old, 3)
    old.report_check(b_old, False, fall=1, rise=2)
    old.connection_started(a_old)
    new = make(spec(1), spec(2), spec(3), clock=clock)
    new.carry_state_from(old)
    a_new = new.members[0]
    assert [m["state"] for m in new.snapshot()["members"]] == [
        "failed",
        "unhealthy",
        "up",
    ]
    assert a_new.active == 0
    assert set(ports(new, 4)) == {3}
    clock.advance(30)
    assert 1 in ports(new, 3)


def test_fake_selector_records_calls_and_honours_exclude() -> None:
    """The FakeSelector double hands members out in order and records every call."""
    fake = FakeSelector([("127.0.0.1", 1), ("127.0.0.1", 2)])
    a, b = fake.members
    assert fake.select() is a
    assert fake.select(exclude=frozenset({a})) is b
    fake.unusable.add(b)
    assert fake.select(exclude=frozenset({a})) is None
    fake.connection_started(a)
    fake.report_failure(a)
    fake.connection_finished(a)
    assert [e[0] for e in fake.events][-3:] == [
        "connection_started",
        "report_failure",
        "connection_finished",
    ]
    assert json.dumps(fake.snapshot())


def test_health_check_spec_in_group_spec_is_kept() -> None:
    """GroupSpec carries its HealthCheckSpec through to the group."""
    hc = HealthCheckSpec(kind="tcp", path=None)
    g = UpstreamGroup(GroupSpec("g", (spec(1),), health_check=hc), Clock())
    assert g.spec.health_check is hc
