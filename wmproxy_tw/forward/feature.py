"""The forward proxy as a feature of the service (the first example of one)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from twisted.internet.defer import Deferred

from ..config.grammar import Address, is_loopback_host
from ..config.model import Config, Proxy
from ..feature import BuildContext, Feature, IFeature, ListenSpec
from ..listen import StartupError
from .server import ForwardFactory

__all__ = ["ForwardFeature", "build"]


def build(ctx: BuildContext, config: Config) -> list[IFeature]:
    """``[proxy] bind``: one forward proxy serving every bind address."""
    p = config.proxy
    if p is None or not p.bind or p.server is not None:
        return []  # with `server`, bind is chained to the parent by the tunnel client
    for addr in p.bind:
        if p.username is None and not is_loopback_host(addr.host) and not p.allow_open_proxy:
            raise StartupError(
                f"proxy.bind: refusing to run an unauthenticated proxy on {addr} (not loopback): "
                "set username/password, or allow_open_proxy = true if you really mean it"
            )
    # the proxy's own listeners are not targets (loops), nor is the control API
    own = p.bind + (() if config.disable_control else (config.control,))
    return [ForwardFeature(ctx, p, own)]


class ForwardFeature(Feature):
    """HTTP proxy, CONNECT and SOCKS5 on each ``[proxy] bind`` address."""

    name = "forward"

    def __init__(self, ctx: BuildContext, cfg: Proxy, own_listeners: tuple[Address, ...] = ()) -> None:
        super().__init__()
        assert cfg.bind
        self.cfg = cfg
        self.factory = ForwardFactory(ctx.reactor, cfg, own_listeners=own_listeners or cfg.bind, stats=ctx.stats)

    def listeners(self) -> Iterable[ListenSpec]:
        p = self.cfg
        assert p.bind
        what = f"forward proxy ({' '.join(sorted(p.flag))})"
        auth = " with auth" if p.username else ""
        return [ListenSpec("tcp", addr, "forward proxy", factory=self.factory, max_connections=p.max_connections,
                           description=f"{what} on {addr}{auth}") for addr in p.bind]

    def snapshot(self) -> dict[str, Any]:
        modes: dict[str, int] = {}
        for proto in self.factory.active:
            modes[proto.mode] = modes.get(proto.mode, 0) + 1
        return {"connections": len(self.factory.active), "by_mode": modes}

    def stop(self) -> None:
        super().stop()
        self.factory.stop()

    def drain(self) -> Optional[Deferred[Any]]:
        self.factory.drain()
        return None
