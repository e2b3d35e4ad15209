"""ProxyService on a memory reactor: reload keeps/closes/opens listeners, rolls back, carries state, drains."""

from __future__ import annotations

from typing import Any, Iterable

import pytest
from twisted.internet import error
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from wmproxy_tw import service as service_mod
from wmproxy_tw.balance import GroupSpec, MemberSpec, UpstreamGroup
from wmproxy_tw.config import Address, Config, load_text
from wmproxy_tw.control.api import ReloadError
from wmproxy_tw.feature import BuildContext, Feature, IFeature, ListenSpec
from wmproxy_tw.forward.server import ForwardFactory
from wmproxy_tw.listen import ListenerDiff, StartupError, diff
from wmproxy_tw.service import ProxyService, plan

pytestmark = pytest.mark.timeout(10)


class Port:
    def __init__(self, reactor: "Reactor", port: int, host: str) -> None:
        self.reactor, self.port, self.host = reactor, port, host
        self.stopped = False

    def stopListening(self) -> None:
        self.stopped = True
        self.reactor.closed.append(self.port)

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", self.host, self.port)


class Reactor(MemoryReactorClock):
    """listenTCP fails for ports in ``busy``; records opened and closed ports."""

    def __init__(self) -> None:
        super().__init__()
        self.busy: set[int] = set()
        self.opened: list[int] = []
        self.closed: list[int] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:  # type: ignore[override]
        if port in self.busy:
            raise error.CannotListenError(interface, port, OSError(98, "Address already in use"))
        self.opened.append(port)
        self.tcpServers.append((port, factory, backlog, interface))
        return Port(self, port, interface)


def conf(binds: str, extra: str = "") -> Any:
    return load_text(f'control = "127.0.0.1:9000"\nshutdown_timeout = "5s"\n{extra}\n[proxy]\nbind = "{binds}"\n',
                     "t.toml")


def started(text: Any) -> tuple[ProxyService, Reactor]:
    reactor = Reactor()
    svc = ProxyService(reactor, text)
    svc.bind_all()
    svc.startService()
    return svc, reactor


def ports(svc: ProxyService) -> set[int]:
    return {addr.port for (_k, addr) in svc.registry.listeners}


def test_diff_is_by_key() -> None:
    """diff() keeps common keys, closes the missing and opens the new, in order."""
    a, b, c = (("tcp", Address("127.0.0.1", p)) for p in (1, 2, 3))
    u = ("udp", Address("127.0.0.1", 2))
    assert diff([a, b], [b, c, u]) == ListenerDiff(keep=(b,), close=(a,), open=(c, u))
    assert diff([], [a]) == ListenerDiff((), (), (a,))


def test_reload_keeps_closes_opens() -> None:
    """1001+1002 → 1002+1003: 1002 keeps its socket with the new factory, 1001 closes, 1003 opens."""
    svc, reactor = started(conf("127.0.0.1:1001 127.0.0.1:1002"))
    kept = svc.registry.find("tcp", Address("127.0.0.1", 1002))
    assert kept is not None and kept.dispatch is not None
    old_factory = kept.dispatch.target
    old_proto = kept.dispatch.buildProtocol(None)  # a connection opened before the reload
    summary = svc.reload(conf("127.0.0.1:1002 127.0.0.1:1003"))
    assert ports(svc) == {1002, 1003, 9000}
    assert reactor.opened == [1001, 1002, 9000, 1003] and reactor.closed == [1001]
    assert svc.registry.find("tcp", Address("127.0.0.1", 1002)) is kept
    assert isinstance(kept.dispatch.target, ForwardFactory) and kept.dispatch.target is not old_factory
    assert old_proto.f is old_factory  # in flight: the old objects
    assert kept.dispatch.open == 1
    assert summary["kept"] == ["tcp 127.0.0.1:1002", "tcp 127.0.0.1:9000"]
    assert summary["opened"] == ["tcp 127.0.0.1:1003"] and summary["closed"] == ["tcp 127.0.0.1:1001"]
    assert svc.reloads == 1 and svc.stats.totals()["reloads"] == 1


def test_reload_bind_failure_rolls_back() -> None:
    """A new listener that cannot bind fails the reload; listeners it opened close; nothing else changes."""
    svc, reactor = started(conf("127.0.0.1:1001"))
    before = dict(svc.registry.listeners)
    features = list(svc.features)
    reactor.busy.add(1005)
    with pytest.raises(ReloadError) as info:
        svc.reload(conf("127.0.0.1:1001 127.0.0.1:1004 127.0.0.1:1005"))
    assert info.value.errors == ["forward proxy: cannot listen on 127.0.0.1:1005: address already in use"]
    assert reactor.closed == [1004]  # opened by the failed reload, then closed again
    assert svc.registry.listeners == before and svc.features == features
    assert svc.reloads == 0


def test_reload_invalid_plan_changes_nothing() -> None:
    """A config that cannot run (open proxy) is refused with its message; listeners unchanged."""
    svc, reactor = started(conf("127.0.0.1:1001"))
    with pytest.raises(ReloadError) as info:
        svc.reload(conf("0.0.0.0:1001"))
    assert "allow_open_proxy" in info.value.errors[0]
    assert reactor.closed == [] and ports(svc) == {1001, 9000}


def test_reload_moves_the_control_api() -> None:
    """A changed control address opens the new socket and closes the old (the control API is a feature)."""
    svc, reactor = started(conf("127.0.0.1:1001"))
    svc.reload(load_text('control = "127.0.0.1:9001"\n[proxy]\nbind = "127.0.0.1:1001"\n', "t.toml"))
    assert ports(svc) == {1001, 9001} and reactor.closed == [9000]
    svc.reload(load_text('disable_control = true\n[proxy]\nbind = "127.0.0.1:1001"\n', "t.toml"))
    assert ports(svc) == {1001}


def test_single_process_refuses_more_workers_on_reload() -> None:
    """workers = 1 → 2 cannot be done by a reload: refused with a clear message."""
    svc, _reactor = started(conf("127.0.0.1:1001"))
    with pytest.raises(ReloadError) as info:
        svc.reload(conf("127.0.0.1:1001", "workers = 2"))
    assert "needs a restart" in info.value.errors[0]


class GroupFeature(Feature):
    """A feature with one upstream group and a listener, to see state carried over."""

    name = "grp"
    instances: list["GroupFeature"] = []

    def __init__(self, ctx: BuildContext, port: int) -> None:
        super().__init__()
        spec = GroupSpec(name="backend", members=(MemberSpec(host="127.0.0.1", port=7001, max_fails=1),
                                                  MemberSpec(host="127.0.0.1", port=7002)))
        self.upstreams = [UpstreamGroup(spec, ctx.reactor)]
        self.port = port
        self.started = self.stopped = self.drained = 0
        GroupFeature.instances.append(self)

    def listeners(self) -> Iterable[ListenSpec]:
        return [ListenSpec("tcp", Address("127.0.0.1", self.port), "grp", factory=Factory.forProtocol(Protocol))]

    def start(self) -> None:
        self.started += 1

    def stop(self) -> None:
        self.stopped += 1

    def drain(self) -> None:
        self.drained += 1


@pytest.fixture
def with_group_feature(monkeypatch: pytest.MonkeyPatch) -> None:
    GroupFeature.instances = []

    def build(ctx: BuildContext, config: Config) -> list[IFeature]:
        port = config.model_extra.get("grp_port") if config.model_extra else None
        return [GroupFeature(ctx, port)] if port else []

    monkeypatch.setattr(service_mod, "BUILDERS", [*service_mod.BUILDERS, build])


def test_state_carries_over_by_name(with_group_feature: None) -> None:
    """Health of group members carries over to the new feature of the same name; old one stopped, new started."""
    svc, _reactor = started(conf("127.0.0.1:1001", "grp_port = 1100"))
    old = GroupFeature.instances[0]
    group = old.upstreams[0]
    group.report_failure(group.members[0])
    assert group.snapshot()["members"][0]["state"] == "failed"
    svc.reload(conf("127.0.0.1:1001", "grp_port = 1100"))
    new = GroupFeature.instances[1]
    assert new.upstreams[0] is not group
    assert new.upstreams[0].snapshot()["members"][0]["state"] == "failed"
    assert (old.started, old.stopped, new.started, new.stopped) == (1, 1, 1, 0)
    status = svc.status()
    assert [g["name"] for g in status["upstreams"]] == ["backend"] and status["upstreams"][0]["feature"] == "grp"


def test_plan_lists_listeners_and_refuses_duplicates(with_group_feature: None) -> None:
    """plan() describes each listener; two features on one address is a StartupError naming both."""
    assert plan(conf("127.0.0.1:1001").config) == ["forward proxy (http https socks5) on 127.0.0.1:1001",
                                                   "control API on 127.0.0.1:9000"]
    with pytest.raises(StartupError, match="grp: 127.0.0.1:1001 is already used by forward proxy"):
        plan(conf("127.0.0.1:1001", "grp_port = 1001").config)
    with pytest.raises(StartupError, match="not loopback"):
        plan(load_text('control = "0.0.0.0:9000"\n[proxy]\nbind = "127.0.0.1:1"\n', "t.toml").config)


class FakeTransport:
    def __init__(self, proto: Protocol) -> None:
        self.proto = proto
        self.closed = self.aborted = False

    def loseConnection(self) -> None:
        self.closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.proto.connectionLost(Failure(error.ConnectionAborted()))


def connect(svc: ProxyService, port: int) -> tuple[Protocol, FakeTransport]:
    listener = svc.registry.find("tcp", Address("127.0.0.1", port))
    assert listener is not None and listener.dispatch is not None
    proto = listener.dispatch.buildProtocol(None)
    assert proto is not None
    proto.transport = FakeTransport(proto)  # type: ignore[assignment]
    return proto, proto.transport  # type: ignore[return-value]


def test_graceful_stop_waits_for_connections(with_group_feature: None) -> None:
    """Stop closes every listener, drains features, closes control connections, then waits for the rest."""
    svc, reactor = started(conf("127.0.0.1:1001", "grp_port = 1100"))
    proto, transport = connect(svc, 1100)
    _ctl, ctl_transport = connect(svc, 9000)
    done: list[Any] = []
    svc.graceful_stop().addCallback(done.append)
    assert sorted(reactor.closed) == [1001, 1100, 9000]
    assert ctl_transport.closed and not transport.closed
    assert GroupFeature.instances[0].drained == 1 and GroupFeature.instances[0].stopped == 1
    reactor.advance(4)
    assert not done and svc.status()["connections"]["open"] == 2
    proto.connectionLost(Failure(error.ConnectionDone()))
    _ctl.connectionLost(Failure(error.ConnectionDone()))
    assert done == [None]
    with pytest.raises(ReloadError, match="stopping"):
        svc.reload(conf("127.0.0.1:1001"))


def test_graceful_stop_aborts_after_timeout(with_group_feature: None) -> None:
    """Connections still open after shutdown_timeout are aborted and the stop completes."""
    svc, reactor = started(conf("127.0.0.1:1001", "grp_port = 1100"))
    _proto, transport = connect(svc, 1100)
    done: list[Any] = []
    svc.graceful_stop().addCallback(done.append)
    reactor.advance(4.9)
    assert not transport.aborted
    reactor.advance(0.2)
    assert transport.aborted and done == [None]


def test_second_stop_request_aborts_now(with_group_feature: None) -> None:
    """request_stop twice: the second aborts open connections without waiting for the timeout."""
    svc, reactor = started(conf("127.0.0.1:1001", "grp_port = 1100"))
    _proto, transport = connect(svc, 1100)
    stops: list[int] = []
    svc.stopper = lambda: (stops.append(1), svc.graceful_stop())
    svc.request_stop()
    assert stops == [1] and not transport.aborted
    svc.request_stop()
    assert stops == [1] and transport.aborted
