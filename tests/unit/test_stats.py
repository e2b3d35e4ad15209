"""The stats registry: counting, live gauges, Prometheus text, merging across workers."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wmproxy_tw.control.supervisor import merge_metrics, merge_status
from wmproxy_tw.observe.stats import Stats
from wmproxy_tw.relay import Splice

pytestmark = pytest.mark.timeout(10)


def samples(text: str | bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_counts_render_and_parse() -> None:
    """Requests, latency, bytes and reloads come out in Prometheus text that its own parser reads."""
    st = Stats()
    for _ in range(3):
        st.request("forward", "http", "", 200)
    st.request("forward", "socks5", "", 502)
    st.upstream_latency("forward", "direct", "", 0.003)
    meter = st.meter("forward")
    meter.inbound(10)
    meter(1, 5)
    st.reload(True)
    s = samples(st.render())
    assert s[("wmproxy_requests_total", (("feature", "forward"), ("location", ""), ("server", "http"),
                                         ("status", "200")))] == 3
    assert s[("wmproxy_bytes_total", (("direction", "in"), ("feature", "forward")))] == 10
    assert s[("wmproxy_bytes_total", (("direction", "out"), ("feature", "forward")))] == 5
    assert s[("wmproxy_upstream_latency_seconds_bucket", (("feature", "forward"), ("group", "direct"),
                                                          ("le", "0.005"), ("member", "")))] == 1
    assert s[("wmproxy_reloads_total", (("result", "ok"),))] == 1
    assert st.totals() == {"requests": 4, "bytes_in": 10, "bytes_out": 5, "reloads": 1}


def test_live_gauges_come_from_status() -> None:
    """Open connections, member health and tunnel clients are read from the status snapshot at scrape time."""
    st = Stats()
    st.set_live(lambda: {"uptime": 7.0, "tunnel_clients": [{}, {}],
                         "listeners": [{"name": "fp", "kind": "tcp", "addr": "127.0.0.1:1", "open": 4, "accepted": 9}],
                         "upstreams": [{"feature": "rev", "name": "b", "members": [
                             {"addr": "10.0.0.1:80", "healthy": True, "active": 2},
                             {"addr": "10.0.0.2:80", "healthy": False, "active": 0}]}]})
    s = samples(st.render())
    assert s[("wmproxy_open_connections", (("listener", "fp tcp 127.0.0.1:1"),))] == 4
    assert s[("wmproxy_accepted_connections_total", (("listener", "fp tcp 127.0.0.1:1"),))] == 9
    assert s[("wmproxy_upstream_member_up", (("feature", "rev"), ("group", "b"), ("member", "10.0.0.2:80")))] == 0
    assert s[("wmproxy_upstream_member_active", (("feature", "rev"), ("group", "b"), ("member", "10.0.0.1:80")))] == 2
    assert s[("wmproxy_tunnel_clients", ())] == 2 and s[("wmproxy_uptime_seconds", ())] == 7


def test_splice_meters_both_directions() -> None:
    """A Splice given a meter counts bytes read from the client leg as in, the other as out."""
    from twisted.internet.task import Clock

    st = Stats()
    sp = Splice(Clock(), meter=st.meter("x"))
    sp.received(0, b"abc")
    sp.received(1, b"hello")
    assert st.totals()["bytes_in"] == 3 and st.totals()["bytes_out"] == 5


def test_hot_path_is_cheap() -> None:
    """One counted request costs well under 5 µs (cached labelled children)."""
    import timeit

    st = Stats()
    st.request("forward", "http", "", 200)
    per_call = min(timeit.repeat(lambda: st.request("forward", "http", "", 200), number=20000, repeat=3)) / 20000
    assert per_call < 5e-6, per_call


def worker_text(requests: float, up: int, uptime: float) -> str:
    st = Stats()
    for _ in range(int(requests)):
        st.request("forward", "http", "", 200)
    st.reload(True)
    st.set_live(lambda: {"uptime": uptime, "listeners": [{"name": "fp", "kind": "tcp", "addr": "a", "open": 1,
                                                          "accepted": 2}],
                         "upstreams": [{"feature": "rev", "name": "b", "members": [{"addr": "m", "healthy": bool(up),
                                                                                     "active": 1}]}]})
    return st.render().decode()


def test_merge_metrics_sums_workers() -> None:
    """Counters and connection gauges add up, health takes the minimum, reloads and uptime are the supervisor's."""
    own = Stats()
    own.reload(True)
    own.set_live(lambda: {"uptime": 100.0})
    merged = samples(merge_metrics([worker_text(3, 1, 5.0), worker_text(4, 0, 6.0)], own.render().decode(),
                                   workers=2, restarts=1))
    assert merged[("wmproxy_requests_total", (("feature", "forward"), ("location", ""), ("server", "http"),
                                              ("status", "200")))] == 7
    assert merged[("wmproxy_open_connections", (("listener", "fp tcp a"),))] == 2
    assert merged[("wmproxy_upstream_member_up", (("feature", "rev"), ("group", "b"), ("member", "m")))] == 0
    assert merged[("wmproxy_upstream_member_active", (("feature", "rev"), ("group", "b"), ("member", "m")))] == 2
    assert merged[("wmproxy_reloads_total", (("result", "ok"),))] == 1
    assert merged[("wmproxy_uptime_seconds", ())] == 100
    assert merged[("wmproxy_workers", ())] == 2 and merged[("wmproxy_worker_restarts_total", ())] == 1


def test_merge_status_adds_up() -> None:
    """Listener counts add up per address, a member is healthy only if healthy in every worker."""
    def doc(pid: int, open_: int, healthy: bool) -> dict[str, Any]:
        return {"pid": pid, "listeners": [{"name": "fp", "kind": "tcp", "addr": "a", "bound": "a", "open": open_,
                                           "accepted": 10, "refused": 0}],
                "connections": {"open": open_, "accepted": 10, "retired_open": 0},
                "upstreams": [{"feature": "rev", "name": "b", "members": [{"addr": "m", "healthy": healthy,
                                                                           "state": "up" if healthy else "failed",
                                                                           "active": 1, "fails": 0}]}],
                "tunnel_clients": [{"name": f"c{pid}"}], "features": {"forward": {"connections": open_}},
                "counters": {"requests": 5.0, "bytes_in": 1.0, "bytes_out": 2.0, "reloads": 9.0}}

    own = {"pid": 1, "listeners": [{"name": "control API", "kind": "tcp", "addr": "c", "open": 1, "accepted": 1}],
           "connections": {"open": 1, "accepted": 1, "retired_open": 0}, "counters": {"reloads": 2.0}}
    out = merge_status(own, [{"index": 0}, {"index": 1}], [doc(10, 2, True), doc(11, 3, False), None])
    assert out["listeners"][0]["open"] == 5 and out["listeners"][0]["accepted"] == 20
    assert out["listeners"][1]["name"] == "control API"
    assert out["connections"]["open"] == 6
    member = out["upstreams"][0]["members"][0]
    assert member["healthy"] is False and member["healthy_in"] == 1 and member["active"] == 2
    assert [c["worker"] for c in out["tunnel_clients"]] == [10, 11]
    assert out["counters"] == {"requests": 10.0, "bytes_in": 2.0, "bytes_out": 4.0, "reloads": 2.0}
    assert out["workers"] == [{"index": 0}, {"index": 1}] and out["pid"] == 1
