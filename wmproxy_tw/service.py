"""The running proxy: features built from a Config, bound, reloaded, drained.

Read ``docs/architecture.md`` first.  In short: each capability's package has
a ``build(ctx, config) -> [IFeature]`` function listed in :data:`BUILDERS`;
:class:`ProxyService` binds the listeners they ask for, swaps them on
:meth:`ProxyService.reload` and drains them on a graceful stop.  Adding a
capability is one line in :data:`BUILDERS` (and removing its section from
:func:`_unsupported`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from . import __version__
from .config import Config, ConfigError, Loaded, load_config
from .control import feature as control_feature
from .control.api import IController, ReloadError
from .feature import BuildContext, IFeature, ListenSpec
from . import fleet
from .forward import feature as forward_feature
from . import stream as stream_feature
from . import reverse
from .tunnel import build as tunnel_feature
from .listen import ListenerRegistry, StartupError, diff
from .observe.stats import Stats

__all__ = ["BUILDERS", "ProxyService", "ReloadError", "build_features", "plan", "reread", "resolve_workers"]

_log = Logger()

Builder = Callable[[BuildContext, Config], list[IFeature]]

#: One entry per capability: ``build(ctx, config) -> [IFeature]``.
BUILDERS: list[Builder] = [
    fleet.build,  # first: sets ctx.fleet for the features that share state through Redis
    forward_feature.build,
    stream_feature.build,
    tunnel_feature.build,
    reverse.build,
]

#: After shutdown_timeout, how long aborted connections get to report they are gone.
ABORT_GRACE = 2.0


def _unsupported(config: Config) -> list[str]:
    """Sections that parse but are not served yet: refused, never ignored."""
    out = reverse.unsupported(config)
    if resolve_workers(config) > 1:
        if config.fleet is not None:
            out.append("[fleet] with workers > 1")
        p = config.proxy
        if p is not None and (p.center_addr or p.server is not None):
            # a tunnel client attaches to one process: the other workers could not reach it
            out.append("a tunnel server or client (proxy.center_addr / proxy.server) with workers > 1")
    return out


def build_features(ctx: BuildContext, config: Config, controller: Optional[IController] = None,
                   control: bool = True, serve: bool = True) -> tuple[list[IFeature], list[ListenSpec]]:
    """Every feature of ``config`` and the listeners they want; raise StartupError.

    ``control``: include the control API; ``serve``: include the proxy features
    (the supervisor of worker processes serves only the control API).
    """
    missing = _unsupported(config)
    if missing:
        raise StartupError("not supported yet: " + ", ".join(missing))
    features: list[IFeature] = [f for build in BUILDERS for f in build(ctx, config)] if serve else []
    if control:
        features += control_feature.build(ctx, config, controller)
    names: dict[str, IFeature] = {}
    seen: dict[tuple[str, Any], ListenSpec] = {}
    specs: list[ListenSpec] = []
    for f in features:
        if f.name in names:
            raise StartupError(f"two features are named {f.name!r}: feature names must be unique")
        names[f.name] = f
        for spec in f.listeners():
            other = seen.get(spec.key)
            if other is not None and spec.addr.port:  # port 0: each gets its own port (tests)
                where = f"udp {spec.addr}" if spec.kind == "udp" else str(spec.addr)
                raise StartupError(f"{spec.name}: {where} is already used by {other.name}")
            seen[spec.key] = spec
            specs.append(spec)
    return features, specs


def plan(config: Config, control: bool = True) -> list[str]:
    """Check what can't start (before binding) and describe the listeners."""
    features, specs = build_features(BuildContext(reactor=None), config, control=control)
    # features may say what they do beyond listening (e.g. a tunnel client dialling out)
    notes = [line for f in features for line in getattr(f, "plan_notes", lambda: [])()]
    return notes + [s.describe() for s in specs]


def reread(current: Loaded, stats: Stats) -> Loaded:
    """The file ``current`` came from, read and validated again; ReloadError (counted) if unusable."""
    path = current.path
    if path is None or not Path(path).is_file():
        stats.reload(False)
        raise ReloadError([f"started without a configuration file ({path}): nothing to reload"])
    try:
        return load_config(path)
    except ConfigError as e:
        stats.reload(False)
        _log.warn("reload of {path} refused: {errors}", path=path, errors="; ".join(e.errors))  # noqa: G010
        raise ReloadError(e.errors) from None


def resolve_workers(config: Config) -> int:
    """``workers = N | "auto"`` as a number of processes."""
    w = config.workers
    return max(1, os.cpu_count() or 1) if w == "auto" else int(w)


@implementer(IController)
class ProxyService(service.MultiService):
    """Owns the listeners and features of the running configuration.

    ``control`` (default True) serves the control API from this process;
    worker processes run without it (their supervisor serves it), and the
    supervisor runs one with ``serve=False`` (the control API only).
    ``stopper`` is what ``POST /stop`` and the stop signals call: ``tap``
    sets it to ``reactor.stop`` (which stops this service gracefully);
    without it, the service only drains itself.
    """

    def __init__(self, reactor: Any, loaded: Loaded, *, stats: Optional[Stats] = None,
                 reuse_port: bool = False, control: bool = True, serve: bool = True,
                 role: str = "single") -> None:
        super().__init__()
        self.reactor = reactor
        self.loaded = loaded
        self.stats = stats if stats is not None else Stats()
        self.registry = ListenerRegistry(reactor, reuse_port=reuse_port)
        self.features: list[IFeature] = []
        self.with_control = control
        self.serve = serve
        self.role = role  # "single" | "worker" | "supervisor"
        self.controller: IController = self
        self.stopper: Optional[Callable[[], Any]] = None
        self.started_at = reactor.seconds()
        self.loaded_at = self.started_at
        self.reloads = 0
        self._stopping: Optional[Deferred[Any]] = None
        self._stop_requested = False
        self._abort_now: Optional[Callable[[], None]] = None
        self.stats.set_live(self.status)

    @property
    def config(self) -> Config:
        return self.loaded.config

    def _build(self, loaded: Loaded) -> tuple[list[IFeature], list[ListenSpec]]:
        ctx = BuildContext(self.reactor, self.stats, controller=self.controller)
        return build_features(ctx, loaded.config, self.controller, control=self.with_control, serve=self.serve)

    # -- start ----------------------------------------------------------------
    def bind_all(self) -> None:
        """Build every feature and bind its listeners; raise StartupError."""
        features, specs = self._build(self.loaded)
        for spec in specs:
            self.registry.open(spec)
        self.features = features

    def abandon(self) -> None:
        """Close what was bound after a start-up failure."""
        for kind, addr in list(self.registry.listeners):
            self.registry.close(kind, addr)

    def startService(self) -> None:
        super().startService()
        for f in self.features:
            f.start()

    # -- reload -----------------------------------------------------------------
    def reload(self, loaded: Loaded, record: bool = True) -> dict[str, Any]:
        """Apply ``loaded`` or change nothing: raise :class:`ReloadError`.

        Unchanged listeners keep their sockets (their dispatch gets the new
        feature's factory), removed ones close, added ones open; a new
        listener that cannot bind fails the reload and closes those this
        reload already opened.  Connections in flight keep their old objects.
        ``record``: count it in ``wmproxy_reloads_total`` (a supervisor's
        roll-back is not counted).
        """
        try:
            summary = self._reload(loaded)
        except ReloadError as e:
            if record:
                self.stats.reload(False)
            _log.warn("reload of {path} refused: {errors}", path=loaded.path, errors="; ".join(e.errors))  # noqa: G010
            raise
        if record:
            self.stats.reload(True)
        return summary

    def _reload(self, loaded: Loaded) -> dict[str, Any]:
        if self._stopping is not None:
            raise ReloadError(["stopping: reload refused"])
        if self.role == "single" and resolve_workers(loaded.config) > 1:
            raise ReloadError([f"workers: changing from 1 to {loaded.config.workers} worker processes "
                               "needs a restart"])
        try:
            features, specs = self._build(loaded)
        except StartupError as e:
            raise ReloadError([str(e)]) from None
        old = {f.name: f for f in self.features}
        for f in features:
            if f.name in old:
                f.carry_state_from(old[f.name])
        wanted = {s.key: s for s in specs}
        change = diff(self.registry.listeners, wanted)
        opened = []
        try:
            for key in change.open:
                self.registry.open(wanted[key])
                opened.append(key)
        except StartupError as e:
            for key in opened:
                self.registry.close(*key)
            raise ReloadError([str(e)]) from None
        # committed: from here on nothing refuses
        for key in change.keep:
            self.registry.update(wanted[key])
        if self.running:
            for f in features:
                f.start()
        for f in self.features:
            f.stop()
        for key in change.close:
            self.registry.close(*key)
        self.features = features
        self.loaded = loaded
        self.loaded_at = self.reactor.seconds()
        self.reloads += 1

        def names(keys: tuple[Any, ...]) -> list[str]:
            return [f"{kind} {addr}" for kind, addr in keys]

        summary = {"config": loaded.path, "hash": loaded.source_hash, "kept": names(change.keep),
                   "opened": names(change.open), "closed": names(change.close), "warnings": list(loaded.warnings)}
        _log.info("reloaded {path}: kept {k}, opened {o}, closed {c} listeners", path=loaded.path,
                  k=len(change.keep), o=len(change.open), c=len(change.close))
        return summary

    def reload_from_source(self) -> dict[str, Any]:
        """Re-read the configuration file the service runs from and apply it."""
        return self.reload(reread(self.loaded, self.stats))

    # -- stop ---------------------------------------------------------------------
    def request_stop(self) -> None:
        """A stop signal or ``POST /stop``: stop the process (or just this service).

        A second request while draining aborts the connections still open.
        """
        if self._stop_requested:
            if self._abort_now is not None:
                _log.info("second stop request: aborting open connections now")
                self._abort_now()
            return
        self._stop_requested = True
        if self.stopper is not None:
            self.stopper()
        else:
            self.graceful_stop()

    def graceful_stop(self) -> Deferred[Any]:
        """Stop accepting, drain up to ``shutdown_timeout``, then abort the rest."""
        if self._stopping is not None:
            return _chain(self._stopping)
        timeout = self.config.shutdown_timeout
        done: Deferred[Any] = Deferred()
        self._stopping = done
        n = self.registry.open_connections()
        _log.info("stopping: no new connections; waiting up to {t}s for {n} open connection(s)", t=timeout, n=n)
        closed = self.registry.close_all()
        self.registry.close_connections(drained_only=False)  # control API connections: close now
        extra = [d for f in self.features if (d := f.drain()) is not None]
        for f in self.features:
            f.stop()
        waiting = DeferredList([closed, self.registry.idle(), *extra], consumeErrors=True)
        timer = self.reactor.callLater(timeout, lambda: abort(True))

        def finish(_: Any = None) -> None:
            if timer.active():
                timer.cancel()
            self._abort_now = None
            if not done.called:
                _log.info("stopped")
                done.callback(None)

        def abort(timed_out: bool) -> None:
            self._abort_now = None
            if done.called:
                return
            left = self.registry.close_connections(abort=True)
            for f in self.features:
                f.abort()
            _log.warn("{why}: aborted {n} connection(s)", n=left,  # noqa: G010
                      why=f"shutdown_timeout ({timeout}s) passed" if timed_out else "stop requested twice")
            self.reactor.callLater(ABORT_GRACE, finish)

        self._abort_now = lambda: abort(False)
        waiting.addCallback(finish)
        return _chain(done)

    def stopService(self) -> Deferred[Any]:
        return DeferredList([maybeDeferred(super().stopService), self.graceful_stop()], consumeErrors=True)

    def reopen_logs(self) -> None:
        for f in self.features:
            f.reopen_logs()

    # -- observing ------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The ``/status`` document (also the source of the live metrics)."""
        now = self.reactor.seconds()
        reg = self.registry
        listeners = [lst.snapshot() for lst in reg.listeners.values()]
        retired = sum(lst.dispatch.open for lst in reg.retired if lst.dispatch is not None)
        upstreams = [dict(g.snapshot(), feature=f.name) for f in self.features for g in f.groups()]
        clients = [dict(c, feature=f.name) for f in self.features for c in f.tunnel_clients()]
        return {
            "pid": os.getpid(),
            "version": __version__,
            "role": self.role,
            "uptime": round(now - self.started_at, 3),
            "stopping": self._stopping is not None,
            "config": {"path": self.loaded.path, "hash": self.loaded.source_hash,
                       "age": round(now - self.loaded_at, 3), "reloads": self.reloads},
            "listeners": listeners,
            "connections": {"open": reg.open_connections(), "retired_open": retired,
                            "accepted": sum(x["accepted"] for x in listeners)},
            "upstreams": upstreams,
            "tunnel_clients": clients,
            "features": {f.name: f.snapshot() for f in self.features},
            "fleet": next((f.fleet_status() for f in self.features if hasattr(f, "fleet_status")), None),
            "counters": self.stats.totals(),
        }

    # -- IController (the control API) --------------------------------------------
    def control_status(self) -> Any:
        """/status; with [fleet], after asking Redis for the live nodes (the last list if it can't answer)."""
        fleet = next((f for f in self.features if hasattr(f, "nodes")), None)
        if fleet is None:
            return self.status()
        return fleet.nodes().addErrback(lambda _f: None).addCallback(lambda _: self.status())

    def control_metrics(self) -> bytes:
        return self.stats.render()

    def control_config(self) -> Config:
        return self.config

    def control_reload(self) -> dict[str, Any]:
        return self.reload_from_source()

    def control_stop(self) -> None:
        self.request_stop()


def _chain(d: Deferred[Any]) -> Deferred[Any]:
    """A new Deferred that fires (with None) when ``d`` does; ``d``'s result is left alone."""
    out: Deferred[Any] = Deferred()

    def fire(result: Any) -> Any:
        out.callback(None)
        return result

    d.addBoth(fire)
    return out
