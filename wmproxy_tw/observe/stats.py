"""The one stats registry: what features count, what ``/metrics`` shows.

Features receive a :class:`Stats` (through their build context) and call a
handful of methods on the hot path; each costs one dict lookup and one
prometheus-client ``inc``/``observe`` (about 0.25 µs / 0.5 µs), because the
labelled children are cached per label tuple.  Label values must come from
the configuration (server names, locations, group names) or from small fixed
sets (status codes), never from client input, so the number of series stays
bounded.

Gauges that describe the current state (open connections, member health,
tunnel clients, uptime) are not pushed by anyone: they are read at scrape
time from the status snapshot the service provides (:meth:`Stats.set_live`),
so they cost nothing between scrapes and always agree with ``/status``.

Metric names (all prefixed ``wmproxy_``):

============================================ =========== ===================================
``requests_total{feature,server,location,status}`` counter  requests answered, by final status
``upstream_latency_seconds{feature,group,member}`` histogram time to the upstream's answer
``bytes_total{feature,direction}``                 counter   payload bytes, ``in`` from clients
``reloads_total{result}``                          counter   ``ok`` / ``failed``
``open_connections{listener}``                     gauge     accepted connections still open
``accepted_connections_total{listener}``           counter   connections accepted
``upstream_member_up{feature,group,member}``       gauge     1 healthy, 0 not
``upstream_member_active{feature,group,member}``   gauge     open connections to the member
``tunnel_clients``                                 gauge     connected tunnel clients
``uptime_seconds``                                 gauge     since the process started
============================================ =========== ===================================
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["Stats", "Meter", "NULL_STATS", "LATENCY_BUCKETS", "CONTENT_TYPE"]

#: Upstream latency buckets (seconds): 1 ms … 30 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: The Prometheus text exposition format, version 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

IN, OUT = 0, 1


class Meter:
    """Byte counters of one feature, ``in`` (from clients) and ``out`` (to clients).

    ``meter(side, n)`` matches :class:`wmproxy_tw.relay.Splice`'s sides: side 0
    is the client leg, so bytes read from it go ``in``.
    """

    __slots__ = ("_in", "_out")

    def __init__(self, counter_in: Any, counter_out: Any) -> None:
        self._in = counter_in.inc
        self._out = counter_out.inc

    def __call__(self, side: int, n: int) -> None:
        (self._in if side == IN else self._out)(n)

    def inbound(self, n: int) -> None:
        self._in(n)

    def outbound(self, n: int) -> None:
        self._out(n)


class Stats:
    """Counters and histograms of one process, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("wmproxy_requests", "Requests answered, by final status.",
                                 ["feature", "server", "location", "status"], registry=r)
        self._latency = Histogram("wmproxy_upstream_latency_seconds",
                                  "Time from the start of an upstream attempt to its answer "
                                  "(response head, or connection for tunnels).",
                                  ["feature", "group", "member"], buckets=LATENCY_BUCKETS, registry=r)
        self._bytes = Counter("wmproxy_bytes", "Payload bytes relayed; 'in' is from clients.",
                              ["feature", "direction"], registry=r)
        self._reloads = Counter("wmproxy_reloads", "Configuration reloads.", ["result"], registry=r)
        for result in ("ok", "failed"):
            self._reloads.labels(result)
        self._request_children: dict[tuple[str, str, str, str], Any] = {}
        self._latency_children: dict[tuple[str, str, str], Any] = {}
        self._meters: dict[str, Meter] = {}
        self._live: Optional[Callable[[], dict[str, Any]]] = None
        r.register(_LiveCollector(self))

    # -- hot path ---------------------------------------------------------------
    def request(self, feature: str, server: str, location: str, status: int | str) -> None:
        """One request answered with ``status``."""
        key = (feature, server, location, str(status))
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self._requests.labels(*key)
        child.inc()

    def upstream_latency(self, feature: str, group: str, member: str, seconds: float) -> None:
        """How long the upstream took to answer (or to accept, for tunnels)."""
        key = (feature, group, member)
        child = self._latency_children.get(key)
        if child is None:
            child = self._latency_children[key] = self._latency.labels(*key)
        child.observe(seconds)

    def meter(self, feature: str) -> Meter:
        """The byte counters of ``feature`` (keep it; calling it is the hot path)."""
        m = self._meters.get(feature)
        if m is None:
            m = self._meters[feature] = Meter(self._bytes.labels(feature, "in"), self._bytes.labels(feature, "out"))
        return m

    # -- rare events ----------------------------------------------------------
    def reload(self, ok: bool) -> None:
        self._reloads.labels("ok" if ok else "failed").inc()

    def set_live(self, snapshot: Optional[Callable[[], dict[str, Any]]]) -> None:
        """Where scrape-time gauges come from: a ``/status``-shaped dict."""
        self._live = snapshot

    # -- reading ----------------------------------------------------------------
    def render(self) -> bytes:
        """The Prometheus text exposition of everything."""
        return generate_latest(self.registry)

    def totals(self) -> dict[str, float]:
        """Process-wide sums for the dashboard's live counters."""
        out = {"requests": 0.0, "bytes_in": 0.0, "bytes_out": 0.0, "reloads": 0.0}
        # only the pushed metrics: the live collector reads /status, which reads this
        for metric in (*self._requests.collect(), *self._bytes.collect(), *self._reloads.collect()):
            for s in metric.samples:
                if s.name == "wmproxy_requests_total":
                    out["requests"] += s.value
                elif s.name == "wmproxy_bytes_total":
                    out["bytes_" + s.labels["direction"]] += s.value
                elif s.name == "wmproxy_reloads_total" and s.labels.get("result") == "ok":
                    out["reloads"] += s.value
        return out


class _LiveCollector:
    """Scrape-time gauges read from the service's status snapshot."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        snap_fn = self.stats._live
        if snap_fn is None:
            return
        snap = snap_fn()
        yield from live_metrics(snap)


def live_metrics(snap: dict[str, Any]) -> Iterator[Metric]:
    """Gauges for a ``/status`` snapshot (also used on the supervisor's merged status)."""
    open_c = GaugeMetricFamily("wmproxy_open_connections", "Accepted connections still open.", labels=["listener"])
    accepted = CounterMetricFamily("wmproxy_accepted_connections", "Connections accepted.", labels=["listener"])
    for lst in snap.get("listeners", []):
        label = f"{lst['name']} {lst['kind']} {lst['addr']}"
        open_c.add_metric([label], lst.get("open", 0))
        accepted.add_metric([label], lst.get("accepted", 0))
    retired = snap.get("connections", {}).get("retired_open", 0)
    open_c.add_metric(["(closed listeners)"], retired)
    yield open_c
    yield accepted
    up = GaugeMetricFamily("wmproxy_upstream_member_up", "1 when the member is usable, else 0.",
                           labels=["feature", "group", "member"])
    active = GaugeMetricFamily("wmproxy_upstream_member_active", "Open connections to the member.",
                               labels=["feature", "group", "member"])
    for group in snap.get("upstreams", []):
        for m in group.get("members", []):
            labels = [group.get("feature", ""), group.get("name", ""), m.get("addr", "")]
            up.add_metric(labels, 1 if m.get("healthy") else 0)
            active.add_metric(labels, m.get("active", 0))
    yield up
    yield active
    yield GaugeMetricFamily("wmproxy_tunnel_clients", "Connected tunnel clients.",
                            value=len(snap.get("tunnel_clients", [])))
    yield GaugeMetricFamily("wmproxy_uptime_seconds", "Seconds since the process started.",
                            value=snap.get("uptime", 0.0))


#: For code built without a service (unit tests, tools): counts into a private registry.
NULL_STATS = Stats()
