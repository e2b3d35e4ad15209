"""THE Redis connection of a fleet node: one per process, Twisted-native (txredisapi).

Everything in :mod:`wmproxy_tw.fleet` that talks to Redis goes through one
:class:`RedisManager`.  It never blocks the reactor and never makes a caller
wait for a connection: while Redis is away, commands fail at once with
:class:`RedisUnavailable` and callers apply their own fallback (a shared
``limit_req`` zone decides locally, a heartbeat skips a beat).

Public API::

    url = parse_redis_url("rediss://:pw@10.0.0.5:6380/0")   # config.grammar.RedisURL
    redis = RedisManager(reactor, url, password=None, tls_ca=None)
    redis.start()                    # connect (lazily: nothing happens at construction)
    redis.available                  # True while the command connection is ready
    redis.on_change(cb)              # cb(available: bool) at every outage and recovery
    redis.off_change(cb)
    await redis.when_available(5.0)  # for one-shot users (the CLI); RedisUnavailable on timeout
    await redis.execute("SET", k, v, "PX", 10000)   # any command → its reply
    SCRIPT = Script(LUA_SOURCE)      # module-level: text + SHA1
    await redis.run(SCRIPT, keys=[...], args=[...]) # EVALSHA; NOSCRIPT → EVAL (which caches it)
    await redis.publish(channel, message)           # → number of receivers
    await redis.subscribe(channel, cb)  # cb(channel: str, message: str); kept over reconnects;
                                        # fires when Redis confirmed it
    redis.unsubscribe(channel, cb)
    await redis.stop()               # close both connections, cancel every timer
    redis.load(SCRIPT)               # register a script without running it (loaded at each connect)
    redis.url, redis.outages         # RedisURL (str() has no password); outages seen so far
    redis.users                      # the features sharing this manager (the last to stop closes it)

Behaviour:

* Two connections at most: the command connection (opened by :meth:`start`)
  and a subscriber connection (opened by the first :meth:`subscribe`); each is
  re-opened after a loss with a jittered exponential backoff
  (``min_delay`` → ``max_delay``), forever, until :meth:`stop`.
* An outage is logged once, as a warning, when it begins (the first failed
  connect or the loss of a ready connection), and its end once, with its
  length; nothing per request or per retry.
* Registered scripts (every :class:`Script` passed to :meth:`run` or
  :meth:`load`) are loaded with ``SCRIPT LOAD`` on each (re)connect; a
  ``NOSCRIPT`` reply (a ``SCRIPT FLUSH``, a failover) falls back to ``EVAL``
  once and the script is cached again.
* Every command has a reply deadline (``reply_timeout``): a Redis that hangs
  is an outage like one that is gone (the connection is aborted).
* ``redis://`` is plain TCP, ``rediss://`` TLS verified against the system
  CAs or ``tls_ca`` (:func:`wmproxy_tw.tls.client_creator`).  ``AUTH``
  (password, optionally a user name), ``SELECT db`` and a ``PING`` answer
  come before the connection counts as available.
* The reactor is injected (``IReactorTCP`` + ``IReactorTime``); txredisapi's
  own connection factories (which use the global reactor) are not used:
  only its protocol classes.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config.grammar import RedisURL, parse_redis_url

__all__ = ["RedisManager", "RedisUnavailable", "Script", "parse_redis_url", "RedisURL"]

_log = Logger()


class RedisUnavailable(Exception):
    """Redis cannot be used right now (not connected, connection lost, no reply in time)."""


class Script:
    """A Lua script: its source and its SHA1 (what ``EVALSHA`` names)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"<Script {self.sha[:10]}>"


class _Hooks:
    """Mixed into txredisapi's protocols: report the loss to the link, use the injected clock."""

    link: "_Link"

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)  # type: ignore[misc]  # fails the commands in flight
        self.link.lost(self, why)


class _CommandProtocol(_Hooks, txredisapi.RedisProtocol):  # type: ignore[misc, valid-type]
    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        """RESP in one join (txredisapi's builds it piece by piece: about a third of the
        client-side cost of a shared limit_req check in a profile).  Same bytes."""
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, str):
                b = a.encode()
            elif isinstance(a, (bytes, bytearray, memoryview)):
                b = bytes(a)
            else:  # numbers
                b = (format(a, "f") if isinstance(a, float) else str(a)).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(parts)


class _SubscriberProtocol(_Hooks, txredisapi.SubscriberProtocol):  # type: ignore[misc, valid-type]
    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.link.manager._deliver(channel, message)


class _LinkFactory(Factory):
    """What txredisapi's protocols expect of their factory (auth/select failures)."""

    noisy = False
    isLazy = False

    def __init__(self, link: "_Link") -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> Any:
        m = self.link.manager
        proto = self.link.protocol_class(charset="utf-8", replyTimeout=m.reply_timeout,
                                         password=m.password, dbid=m.url.db or None,
                                         username=m.url.username)
        proto.factory = self
        proto.link = self.link
        proto.callLater = m.reactor.callLater  # txredisapi's class attribute is the global reactor's
        return proto

    def stopTrying(self) -> None:
        pass  # the link decides about retries

    def connectionError(self, message: str) -> None:
        self.link.error = message


class _Link:
    """One connection kept open: connect, hand the ready protocol over, re-connect after a loss."""

    def __init__(self, manager: "RedisManager", protocol_class: type, name: str) -> None:
        self.manager = manager
        self.protocol_class = protocol_class
        self.name = name
        self.proto: Any = None  # the ready protocol (AUTH/SELECT done), or None
        self.error: Optional[str] = None  # set by txredisapi when AUTH/SELECT fails
        self.running = False
        self._connecting: Optional[defer.Deferred[Any]] = None
        self._pending: Any = None  # a connected protocol not ready yet
        self._timer: Any = None
        self._delay = manager.min_delay

    def start(self) -> None:
        if not self.running:
            self.running = True
            self._connect()

    def _connect(self) -> None:
        self._timer = None
        if not self.running:
            return
        self.error = None
        d = self.manager._endpoint().connect(_LinkFactory(self))
        self._connecting = d
        d.addCallback(self._connected)
        d.addErrback(self._failed)

    def _connected(self, proto: Any) -> Any:
        self._connecting = None
        self._pending = proto
        _no_delay(proto.transport)
        # whenConnected fires after AUTH/SELECT; a failure there closes the connection (→ lost)
        return proto.whenConnected().addCallback(self._ready)

    def _ready(self, proto: Any) -> None:
        if self._pending is not proto or not self.running:
            return
        self._pending = None
        self.proto = proto
        self._delay = self.manager.min_delay
        self.manager._link_ready(self)

    def _failed(self, f: Failure) -> None:
        self._connecting = None
        if not self.running:
            return
        self.manager._link_down(self, f.getErrorMessage() if not f.check(defer.CancelledError) else "connect cancelled")
        self._retry()

    def lost(self, proto: Any, why: Failure) -> None:
        if proto is self._pending:
            self._pending = None
        elif proto is self.proto:
            self.proto = None
        else:
            return
        if not self.running:
            return
        reason = self.error or why.getErrorMessage()
        self.manager._link_down(self, reason)
        self._retry()

    def _retry(self) -> None:
        if self._timer is None and self.running:
            delay = self._delay * (0.5 + random.random() / 2)  # noqa: S311 (jitter, not security)
            self._delay = min(self._delay * 2, self.manager.max_delay)
            self._timer = self.manager.reactor.callLater(delay, self._connect)

    def reset(self) -> None:
        """Drop the connection (if any); it is opened again as after a loss."""
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.abortConnection()

    def stop(self) -> defer.Deferred[None]:
        """Close without re-connecting; fires when the connection is gone."""
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._connecting is not None:
            self._connecting.cancel()
        waits = []
        for proto in (self.proto, self._pending):
            if proto is not None and proto.transport is not None:
                waits.append(proto.whenDisconnected())
                proto.transport.loseConnection()
        self.proto = self._pending = None
        return defer.DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)


class RedisManager:
    """The Redis connection of this process (see the module docstring)."""

    def __init__(self, reactor: Any, url: Union[RedisURL, str], *, password: Optional[str] = None,
                 tls_ca: Optional[str] = None, connect_timeout: float = 2.0, reply_timeout: float = 2.0,
                 min_delay: float = 0.05, max_delay: float = 1.0) -> None:
        self.reactor = reactor
        self.url = parse_redis_url(url) if isinstance(url, str) else url
        self.password = password if password is not None else self.url.password
        self.tls_ca = tls_ca
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.available = False
        #: The started features sharing this connection (a reload hands it over: the new
        #: feature starts before the old one stops; the last one to stop closes it).
        self.users: list[Any] = []
        self.outages = 0  # outages seen (for /status and tests)
        self._down_since: Optional[float] = None  # start of the current outage
        self._started = False
        self._commands = _Link(self, _CommandProtocol, "commands")
        self._subscriber = _Link(self, _SubscriberProtocol, "subscriber")
        self._scripts: dict[str, Script] = {}
        self._channels: dict[str, list[Callable[[str, str], None]]] = {}
        self._confirming: dict[str, list[defer.Deferred[None]]] = {}  # subscribe() waiting for Redis
        self._listeners: list[Callable[[bool], None]] = []
        self._waiters: list[defer.Deferred[None]] = []

    def __repr__(self) -> str:
        return f"<RedisManager {self.url} {'available' if self.available else 'unavailable'}>"

    # -- life -------------------------------------------------------------------
    def start(self) -> None:
        """Start connecting (and re-connecting after any loss, until :meth:`stop`)."""
        if self._started:
            return
        self._started = True
        self._commands.start()
        if self._channels:
            self._subscriber.start()

    def stop(self) -> defer.Deferred[None]:
        """Close the connections; nothing is retried after this."""
        self._started = False
        self.available = False
        waiters, self._waiters = self._waiters, []
        waiters += [d for ds in self._confirming.values() for d in ds]
        self._confirming.clear()
        for w in waiters:
            w.errback(RedisUnavailable(f"Redis at {self.url}: stopped"))
        return defer.DeferredList([self._commands.stop(), self._subscriber.stop()],
                                  consumeErrors=True).addCallback(lambda _: None)

    def _endpoint(self) -> Any:
        ep: Any = HostnameEndpoint(self.reactor, self.url.host, self.url.port, timeout=self.connect_timeout)
        if self.url.tls:
            from ..tls import client_creator

            ep = wrapClientTLS(client_creator(self.url.host, self.tls_ca), ep)
        return ep

    # -- availability -------------------------------------------------------------
    def on_change(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(available)`` at each change (outage begins / ends)."""
        self._listeners.append(callback)

    def off_change(self, callback: Callable[[bool], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def when_available(self, timeout: Optional[float] = None) -> defer.Deferred[None]:
        """Fires when the command connection is ready (at once if it is)."""
        if self.available:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(lambda _d: self._waiters.remove(_d) if _d in self._waiters else None)
        self._waiters.append(d)
        if timeout is not None:
            d.addTimeout(timeout, self.reactor, onTimeoutCancel=lambda _r, t: Failure(
                RedisUnavailable(f"Redis at {self.url}: not reachable within {t:g}s")))
        return d

    def _link_ready(self, link: _Link) -> None:
        if link is self._subscriber:
            if self._channels:
                self._subscribe(link.proto, list(self._channels))
            return
        # a PING answered (over TLS: the handshake is done) and the scripts loaded (EVALSHA then
        # hits) before the connection counts as available
        proto = link.proto
        calls = [proto.execute_command("PING")] + [proto.script_load(s.source) for s in self._scripts.values()]
        d = defer.DeferredList(calls, consumeErrors=True)
        d.addCallback(lambda results: self._announce(link) if results[0][0] and link.proto is proto else None)

    def _announce(self, link: _Link) -> None:
        if self.available:
            return
        self.available = True
        if self._down_since is not None:
            _log.info("fleet: Redis at {url} is back after {s:.1f}s", url=str(self.url),
                      s=self.reactor.seconds() - self._down_since)
            self._down_since = None
        else:
            _log.info("fleet: connected to Redis at {url}", url=str(self.url))
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(None)
        self._notify(True)

    def _link_down(self, link: _Link, reason: str) -> None:
        if link is not self._commands:
            return  # the command connection speaks for both
        was = self.available
        self.available = False
        if self._down_since is None:
            self._down_since = self.reactor.seconds()
            self.outages += 1
            _log.warn("fleet: Redis at {url} unavailable ({reason}); retrying in the background, "  # noqa: G010
                      "nodes decide locally meanwhile", url=str(self.url), reason=reason)
        if was:
            # the subscriber connection may be as dead as this one without noticing (it only
            # reads): open it again along with the command connection
            self._subscriber.reset()
            self._notify(False)

    def _notify(self, available: bool) -> None:
        for cb in list(self._listeners):
            try:
                cb(available)
            except Exception:
                _log.failure("fleet: Redis availability listener failed")

    # -- commands ---------------------------------------------------------------
    def execute(self, *args: Any) -> defer.Deferred[Any]:
        """Run one command; fails with :class:`RedisUnavailable` when Redis can't be used now,
        with ``txredisapi.ResponseError`` when Redis answers an error."""
        proto = self._commands.proto
        if proto is None or not self.available:
            return defer.fail(RedisUnavailable(f"Redis at {self.url}: not connected"))
        try:
            d = proto.execute_command(*args)
        except txredisapi.ConnectionError as e:
            return defer.fail(RedisUnavailable(f"Redis at {self.url}: {e}"))
        return d.addErrback(_unavailable, self.url)

    def load(self, script: Script) -> None:
        """Register ``script`` (loaded now if connected, and on every re-connect)."""
        if script.sha in self._scripts:
            return
        self._scripts[script.sha] = script
        if self.available:
            self.execute("SCRIPT", "LOAD", script.source).addErrback(lambda _f: None)  # EVALSHA falls back anyway

    def run(self, script: Script, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> defer.Deferred[Any]:
        """``EVALSHA``; on ``NOSCRIPT``, ``EVAL`` (which caches the script in Redis again)."""
        self.load(script)
        n = len(keys)
        d = self.execute("EVALSHA", script.sha, n, *keys, *args)

        def noscript(f: Failure) -> Any:
            if f.check(txredisapi.ResponseError) and str(f.value).startswith("NOSCRIPT"):
                return self.execute("EVAL", script.source, n, *keys, *args)
            return f

        return d.addErrback(noscript)

    def publish(self, channel: str, message: str) -> defer.Deferred[int]:
        """``PUBLISH`` on the command connection: the number of subscribers that got it."""
        return self.execute("PUBLISH", channel, message)

    # -- pub/sub ----------------------------------------------------------------
    def subscribe(self, channel: str, callback: Callable[[str, str], None]) -> defer.Deferred[None]:
        """Call ``callback(channel, message)`` for each message on ``channel`` (re-subscribed
        after a reconnect; messages published during an outage are lost, as Redis does).

        The Deferred fires once Redis confirmed the subscription (now or after the next
        connect): publish what you expect answers to only after it fired.
        """
        new = channel not in self._channels
        self._channels.setdefault(channel, []).append(callback)
        proto = self._subscriber.proto
        if not new and proto is not None and channel not in self._confirming:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._confirming.setdefault(channel, []).append(d)
        if self._started:
            self._subscriber.start()
            if new and proto is not None:
                self._subscribe(proto, [channel])
        return d

    def _subscribe(self, proto: Any, channels: list[str]) -> None:
        def confirmed(_: Any) -> None:
            for c in channels:
                for d in self._confirming.pop(c, []):
                    d.callback(None)

        proto.subscribe(channels).addCallbacks(confirmed, lambda _f: None)  # a loss re-subscribes all

    def unsubscribe(self, channel: str, callback: Callable[[str, str], None]) -> None:
        callbacks = self._channels.get(channel, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks and channel in self._channels:
            del self._channels[channel]
            proto = self._subscriber.proto
            if proto is not None:
                proto.unsubscribe(channel).addErrback(lambda _f: None)

    def _deliver(self, channel: Any, message: Any) -> None:
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        message = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
        for cb in list(self._channels.get(channel, [])):
            try:
                cb(channel, message)
            except Exception:
                _log.failure("fleet: subscriber of {channel} failed", channel=channel)


def _no_delay(transport: Any) -> None:
    """TCP_NODELAY (as Redis clients do): a command waiting for Nagle is latency added to a request."""
    tcp = transport if hasattr(transport, "setTcpNoDelay") else getattr(transport, "transport", None)  # TLS: below
    if tcp is not None and hasattr(tcp, "setTcpNoDelay"):
        tcp.setTcpNoDelay(True)


def _unavailable(f: Failure, url: RedisURL) -> Failure:
    """A lost connection or a reply deadline is :class:`RedisUnavailable`; Redis's own errors pass."""
    if f.check(txredisapi.ConnectionError, txredisapi.TimeoutError):
        return Failure(RedisUnavailable(f"Redis at {url}: {f.getErrorMessage()}"))
    return f
