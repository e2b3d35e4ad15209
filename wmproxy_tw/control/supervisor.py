"""``workers = N``: a supervisor process and N workers sharing every listener.

The process twistd runs becomes the supervisor.  It serves only the control
API (a :class:`~wmproxy_tw.service.ProxyService` with ``serve=False`` whose
controller is the supervisor) and starts N worker processes
(:mod:`.worker`), each running the proxy features with ``SO_REUSEPORT``
sockets on the same addresses: the kernel spreads new connections between
them.  The two talk over the workers' stdin/stdout (:mod:`.channel`); a
worker's stderr lines are logged by the supervisor, prefixed with its pid.

* Start-up (``preflight``, before twistd daemonizes): the configuration is
  planned in full, every address is test-bound with ``SO_REUSEPORT`` (so a
  port in use fails twistd with one line, as in single-process mode) and the
  control API is bound.  Port 0 is refused: workers would each get another.
* A worker that dies is restarted, after 0.5 s doubling to 30 s while it
  keeps dying within a minute.
* Reload: the supervisor validates the file, applies it to its own control
  listener, then to the first worker; if that one refuses (e.g. a port it
  cannot bind), the control listener is rolled back and the reload fails with
  the worker's messages: nothing changed.  Otherwise the other workers
  follow; one that refuses is restarted (it starts on the new configuration).
  A worker that starts later runs the supervisor's current configuration.
  A changed ``workers`` count starts or stops workers to match.
* Stop: every worker is asked to stop gracefully (they drain for
  ``shutdown_timeout``); any still alive 5 s after that is killed.
* ``/status`` and ``/metrics`` ask every ready worker (2 s timeout) and merge
  (:func:`merge_status`, :func:`merge_metrics`).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import wmproxy_tw

from ..config import Config, Loaded
from ..feature import BuildContext
from ..listen import StartupError
from .api import IController, ReloadError
from .channel import JsonLines, encode

__all__ = ["Supervisor", "WorkerProcess", "merge_status", "merge_metrics"]

_log = Logger()

CALL_TIMEOUT = 2.0  # a worker's answer to status/metrics
RELOAD_TIMEOUT = 30.0
KILL_AFTER = 5.0  # seconds past shutdown_timeout before a worker is killed
MAX_ERR_LINE = 64 * 1024


class WorkerGone(Exception):
    """The worker ended before answering."""


@dataclass
class Slot:
    """One worker position; its process is replaced when it dies."""

    index: int
    proc: Optional["WorkerProcess"] = None
    restarts: int = 0
    deaths: list[float] = field(default_factory=list)
    last_exit: Optional[str] = None
    retiring: bool = False  # being stopped because `workers` shrank


class WorkerProcess(ProcessProtocol):
    """The supervisor's end of one worker process."""

    def __init__(self, sup: "Supervisor", slot: Slot) -> None:
        self.sup = sup
        self.slot = slot
        self.pid: Optional[int] = None
        self.ready = False
        self.config_hash = ""
        self.started_at = sup.reactor.seconds()
        self.ended: Deferred[str] = Deferred()
        self._decoder = JsonLines()
        self._err = bytearray()
        self._pending: dict[int, Deferred[dict[str, Any]]] = {}
        self._next = 0
        self._gone = False

    # -- process events ------------------------------------------------------
    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        loaded = self.sup.loaded
        self.config_hash = loaded.source_hash
        self.transport.write(encode({"op": "start", "index": self.slot.index,  # type: ignore[union-attr]
                                     "name": loaded.path or "<config>.toml", "text": loaded.text}))

    def outReceived(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except ValueError as e:
            _log.error("worker {pid}: unreadable output ({e}): restarting it", pid=self.pid, e=e)
            self.terminate()
            return
        for m in messages:
            if "event" in m:
                self.sup._event(self, m)
            else:
                d = self._pending.pop(m.get("id", -1), None)
                if d is not None and not d.called:
                    d.callback(m)

    def errReceived(self, data: bytes) -> None:
        self._err += data
        while True:
            end = self._err.find(b"\n")
            if end < 0:
                if len(self._err) > MAX_ERR_LINE:
                    end = len(self._err)
                else:
                    break
            line = bytes(self._err[:end]).decode("utf-8", "replace").rstrip()
            del self._err[:end + 1]
            if line:
                self._relay_log(line)

    def _relay_log(self, line: str) -> None:
        line = line.removeprefix("- ")  # the worker's log has no time stamps: ours are enough
        if "#critical]" in line or "#error]" in line:
            _log.error("worker {pid}: {line}", pid=self.pid, line=line)
        elif "#warn]" in line:
            _log.warn("worker {pid}: {line}", pid=self.pid, line=line)  # noqa: G010
        else:
            _log.info("worker {pid}: {line}", pid=self.pid, line=line)

    def processEnded(self, reason: Failure) -> None:
        if self._err:
            self._relay_log(bytes(self._err).decode("utf-8", "replace").rstrip())
            self._err.clear()
        self._gone = True
        self.ready = False
        value = reason.value
        code, sig = getattr(value, "exitCode", None), getattr(value, "signal", None)
        how = f"exit status {code}" if code is not None else f"signal {sig}"
        pending, self._pending = self._pending, {}
        for d in pending.values():
            if not d.called:
                d.errback(WorkerGone(f"worker {self.pid} ended ({how})"))
        self.sup._ended(self, how, code == 0)
        self.ended.callback(how)

    # -- requests ---------------------------------------------------------------
    def call(self, op: str, timeout: float = CALL_TIMEOUT, **kw: Any) -> Deferred[dict[str, Any]]:
        """Send a request; the Deferred fires with the reply (or fails)."""
        if self._gone or self.transport is None:
            return _failed(WorkerGone(f"worker {self.pid} is not running"))
        self._next += 1
        mid = self._next
        d: Deferred[dict[str, Any]] = Deferred()
        self._pending[mid] = d
        self.transport.write(encode(dict(kw, id=mid, op=op)))
        d.addTimeout(timeout, self.sup.reactor)
        return d

    def tell(self, op: str) -> None:
        """A message without reply."""
        if not self._gone and self.transport is not None:
            self.transport.write(encode({"op": op}))

    def terminate(self, sig: str = "TERM") -> None:
        if not self._gone and self.transport is not None:
            try:
                self.transport.signalProcess(sig)
            except OSError:
                pass  # it ended meanwhile: processEnded follows

    @property
    def alive(self) -> bool:
        return not self._gone


@implementer(IController)
class Supervisor(service.Service):
    """Starts, watches and drives the worker processes; serves the control API."""

    def __init__(self, reactor: Any, loaded: Loaded, count: int, python: str = sys.executable) -> None:
        from ..service import ProxyService

        self.reactor = reactor
        self.loaded = loaded
        self.count = count
        self.python = python
        self.control = ProxyService(reactor, loaded, serve=False, role="supervisor")
        self.control.controller = self
        self.stats = self.control.stats
        self.slots: list[Slot] = []
        self.stopper: Optional[Any] = None
        self.stopping = False
        self._stop_requested = False
        self.spawned = 0

    # -- start ------------------------------------------------------------------
    def preflight(self) -> None:
        """Plan everything, test-bind every address, bind the control API; raise StartupError."""
        _check_shareable(self.loaded.config)
        self.control.bind_all()

    def abandon(self) -> None:
        self.control.abandon()

    def startService(self) -> None:
        super().startService()
        self.control.startService()
        for i in range(self.count):
            slot = Slot(i)
            self.slots.append(slot)
            self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        if self.stopping or slot.retiring:
            return
        proto = WorkerProcess(self, slot)
        slot.proc = proto
        env = dict(os.environ)
        root = str(Path(wmproxy_tw.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        argv = [self.python, "-m", "wmproxy_tw.control.worker", "--index", str(slot.index)]
        self.reactor.spawnProcess(proto, self.python, argv, env=env, childFDs={0: "w", 1: "r", 2: "r"})
        self.spawned += 1

    def _event(self, proc: WorkerProcess, m: dict[str, Any]) -> None:
        if m["event"] == "ready":
            proc.ready = True
            _log.info("worker {index} ready (pid {pid})", index=proc.slot.index, pid=proc.pid)
            if m.get("hash") != self.loaded.source_hash:
                # started before a reload: bring it up to date
                self._reload_one(proc, self.loaded)
        elif m["event"] == "failed":
            _log.error("worker {index} (pid {pid}) could not start: {why}", index=proc.slot.index,
                       pid=proc.pid, why=m.get("error"))

    def _ended(self, proc: WorkerProcess, how: str, clean: bool) -> None:
        slot = proc.slot
        slot.last_exit = how
        if slot.proc is proc:
            slot.proc = None
        if self.stopping:
            _log.info("worker {index} (pid {pid}) stopped ({how})", index=slot.index, pid=proc.pid, how=how)
            return
        if slot.retiring:
            _log.info("worker {index} (pid {pid}) retired ({how})", index=slot.index, pid=proc.pid, how=how)
            if slot in self.slots:
                self.slots.remove(slot)
            return
        now = self.reactor.seconds()
        slot.deaths = [t for t in slot.deaths if now - t < 60.0] + [now]
        delay = min(30.0, 0.5 * 2 ** (len(slot.deaths) - 1))
        slot.restarts += 1
        _log.warn("worker {index} (pid {pid}) ended ({how}): restarting in {delay}s",  # noqa: G010
                  index=slot.index, pid=proc.pid, how=how, delay=delay)
        self.reactor.callLater(delay, self._spawn, slot)

    def _ready(self) -> list[WorkerProcess]:
        return [s.proc for s in self.slots if s.proc is not None and s.proc.ready and not s.retiring]

    # -- IController ----------------------------------------------------------------
    def control_config(self) -> Config:
        return self.loaded.config

    def control_status(self) -> Deferred[Any]:
        procs = self._ready()
        answers = [p.call("status").addCallbacks(lambda m: m.get("body"), lambda _f: None) for p in procs]
        d: Deferred[Any] = gatherResults(answers)
        d.addCallback(lambda docs: merge_status(self.control.status(), self._worker_rows(procs, docs), docs))
        return d

    def _worker_rows(self, answered: list[WorkerProcess], docs: list[Optional[dict[str, Any]]]) -> list[dict[str, Any]]:
        by_proc = dict(zip((id(p) for p in answered), docs, strict=True))
        now = self.reactor.seconds()
        rows = []
        for slot in self.slots:
            p = slot.proc
            doc = by_proc.get(id(p)) if p is not None else None
            state = "stopped" if p is None else ("ready" if p.ready else "starting")
            if p is not None and p.ready and doc is None:
                state = "no answer"
            conns = (doc or {}).get("connections", {})
            rows.append({"index": slot.index, "pid": p.pid if p else None, "state": state,
                         "uptime": round(now - p.started_at, 3) if p else 0.0, "restarts": slot.restarts,
                         "last_exit": slot.last_exit, "open": conns.get("open", 0),
                         "accepted": conns.get("accepted", 0)})
        return rows

    def control_metrics(self) -> Deferred[Any]:
        procs = self._ready()
        answers = [p.call("metrics").addCallbacks(lambda m: m.get("body") or "", lambda _f: "") for p in procs]
        d: Deferred[Any] = gatherResults(answers)

        def merge(texts: list[str]) -> bytes:
            alive = sum(1 for s in self.slots if s.proc is not None)
            restarts = sum(s.restarts for s in self.slots)
            return merge_metrics(texts, self.stats.render().decode(), workers=alive, restarts=restarts)

        d.addCallback(merge)
        return d

    def control_reload(self) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._reload())

    async def _reload(self) -> dict[str, Any]:
        from ..service import reread

        loaded = reread(self.loaded, self.stats)
        path = loaded.path
        try:
            _check_shareable(loaded.config, probe=False)
        except StartupError as e:
            self.stats.reload(False)
            raise ReloadError([str(e)]) from None
        old = self.loaded
        summary = self.control.reload(loaded, record=False)  # the control listener; raises ReloadError
        procs = self._ready()
        results: list[dict[str, Any]] = []
        if procs:
            first = await self._call_reload(procs[0], loaded)
            if not first.get("ok"):
                try:
                    self.control.reload(old, record=False)
                except ReloadError as e:
                    _log.error("could not restore the control API listener: {errors}", errors="; ".join(e.errors))
                self.stats.reload(False)
                errors = first.get("errors") or ["the worker refused the new configuration"]
                _log.warn("reload of {path} refused: {errors}", path=path, errors="; ".join(errors))  # noqa: G010
                raise ReloadError(errors)
            results.append({"pid": procs[0].pid, "ok": True})
            body = first.get("body") or {}
            for k in ("kept", "opened", "closed"):
                summary[k] = list(body.get(k, [])) + summary[k]
        self.loaded = loaded  # workers (re)started from now on get this one
        rest = [self._reload_one(p, loaded) for p in procs[1:]]
        for p, r in zip(procs[1:], await gatherResults(rest), strict=True):
            results.append({"pid": p.pid, "ok": bool(r.get("ok")), "errors": r.get("errors", [])})
        self._resize(_workers(loaded.config))
        self.stats.reload(True)
        _log.info("reloaded {path} in {n} worker(s)", path=path, n=len(procs))
        return dict(summary, workers=results)

    def _call_reload(self, proc: WorkerProcess, loaded: Loaded) -> Deferred[dict[str, Any]]:
        d = proc.call("reload", timeout=RELOAD_TIMEOUT, name=loaded.path or "<config>.toml", text=loaded.text)
        return d.addErrback(lambda f: {"ok": False, "errors": [f"worker {proc.pid}: {f.getErrorMessage()}"]})

    def _reload_one(self, proc: WorkerProcess, loaded: Loaded) -> Deferred[dict[str, Any]]:
        """Reload a worker that must follow; restart it if it refuses."""

        def check(reply: dict[str, Any]) -> dict[str, Any]:
            if not reply.get("ok"):
                _log.error("worker {pid} refused the configuration the others run ({errors}): restarting it",
                           pid=proc.pid, errors="; ".join(reply.get("errors", [])))
                proc.terminate()
            return reply

        return self._call_reload(proc, loaded).addCallback(check)

    def _resize(self, count: int) -> None:
        active = [s for s in self.slots if not s.retiring]
        for slot in active[count:]:
            slot.retiring = True
            if slot.proc is not None:
                slot.proc.call("stop").addErrback(lambda _f: None)
            else:
                self.slots.remove(slot)
        for _ in range(len(active), count):
            slot = Slot(max((s.index for s in self.slots), default=-1) + 1)
            self.slots.append(slot)
            self._spawn(slot)
        self.count = count

    def control_stop(self) -> None:
        self.request_stop()

    def request_stop(self) -> None:
        if self._stop_requested:
            # a second request: workers abort what they still drain
            for s in self.slots:
                if s.proc is not None:
                    s.proc.call("stop").addErrback(lambda _f: None)
            return
        self._stop_requested = True
        if self.stopper is not None:
            self.stopper()
        else:
            self.stopService()

    def reopen_logs(self) -> None:
        for s in self.slots:
            if s.proc is not None:
                s.proc.tell("reopen_logs")

    def stopService(self) -> Deferred[Any]:
        if self.stopping:
            return succeed(None)
        self.stopping = True
        super().stopService()
        procs = [s.proc for s in self.slots if s.proc is not None]
        _log.info("stopping {n} worker(s)", n=len(procs))
        for p in procs:
            p.call("stop").addErrback(lambda _f: None)
        grace = self.loaded.config.shutdown_timeout + KILL_AFTER
        def kill() -> None:
            for p in procs:
                p.terminate("KILL")

        killer = self.reactor.callLater(grace, kill)

        def done(_: Any) -> Deferred[Any]:
            if killer.active():
                killer.cancel()
            return self.control.stopService()

        return DeferredList([p.ended for p in procs]).addCallback(done)


def _workers(config: Config) -> int:
    from ..service import resolve_workers

    return resolve_workers(config)


def _check_shareable(config: Config, probe: bool = True) -> None:
    """Every listener on a fixed port, and (``probe``) bindable with SO_REUSEPORT."""
    from ..service import build_features

    _features, specs = build_features(BuildContext(reactor=None), config, control=False)
    for spec in specs:
        if spec.addr.port == 0:
            raise StartupError(f"{spec.name}: workers = {config.workers} needs fixed ports, not {spec.addr}")
    if not probe:
        return
    for spec in specs:
        family = socket.AF_INET6 if spec.addr.is_ipv6 else socket.AF_INET
        kind = socket.SOCK_STREAM if spec.kind == "tcp" else socket.SOCK_DGRAM
        with socket.socket(family, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((spec.addr.host, spec.addr.port))
            except OSError as e:
                raise StartupError(f"{spec.name}: cannot listen on {spec.addr}: {(e.strerror or str(e)).lower()}") from None


def _failed(exc: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(exc)
    return d


# ---------------------------------------------------------------- merging


def merge_status(own: dict[str, Any], workers: list[dict[str, Any]],
                 docs: Iterable[Optional[dict[str, Any]]]) -> dict[str, Any]:
    """One /status for the whole process group.

    ``own`` is the supervisor's status (its control listener, config, uptime);
    ``docs`` the workers' (None: no answer).  Listener and connection counts
    add up; an upstream member is healthy only if every worker finds it so
    (``healthy_in`` says in how many); tunnel clients are listed with their
    worker's pid; counters add up (reloads are the supervisor's).
    """
    answered: list[dict[str, Any]] = [d for d in docs if d]
    docs = answered
    out = dict(own)
    listeners: dict[tuple[str, str], dict[str, Any]] = {}
    for doc in docs:
        for lst in doc.get("listeners", []):
            key = (lst["kind"], lst["addr"])
            cur = listeners.get(key)
            if cur is None:
                listeners[key] = dict(lst)
            else:
                for k in ("open", "accepted", "refused"):
                    cur[k] = cur.get(k, 0) + lst.get(k, 0)
    out["listeners"] = list(listeners.values()) + list(own.get("listeners", []))
    conns = dict(own.get("connections", {}))
    for doc in docs:
        for k, v in doc.get("connections", {}).items():
            conns[k] = conns.get(k, 0) + v
    out["connections"] = conns
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for doc in docs:
        for g in doc.get("upstreams", []):
            key = (g.get("feature", ""), g["name"])
            cur = groups.get(key)
            if cur is None:
                cur = groups[key] = dict(g, members=[dict(m, healthy_in=int(bool(m.get("healthy"))))
                                                      for m in g.get("members", [])])
                continue
            by_addr = {m["addr"]: m for m in cur["members"]}
            for m in g.get("members", []):
                mine = by_addr.get(m["addr"])
                if mine is None:
                    continue
                mine["active"] = mine.get("active", 0) + m.get("active", 0)
                mine["fails"] = mine.get("fails", 0) + m.get("fails", 0)
                mine["healthy_in"] += int(bool(m.get("healthy")))
                if not m.get("healthy") and mine.get("healthy"):
                    mine["healthy"] = False
                    mine["state"] = m.get("state", "failed")
    out["upstreams"] = list(groups.values())
    out["tunnel_clients"] = [dict(c, worker=doc.get("pid")) for doc in docs for c in doc.get("tunnel_clients", [])]
    features: dict[str, list[Any]] = {}
    for doc in docs:
        for name, snap in doc.get("features", {}).items():
            features.setdefault(name, []).append(dict(snap, worker=doc.get("pid")))
    out["features"] = features
    counters = {k: 0.0 for k in ("requests", "bytes_in", "bytes_out")}
    for doc in docs:
        for k in counters:
            counters[k] += doc.get("counters", {}).get(k, 0.0)
    counters["reloads"] = own.get("counters", {}).get("reloads", 0.0)
    out["counters"] = counters
    out["workers"] = workers
    return out


#: Taken from the supervisor only (each worker has its own copy).
_SUPERVISOR_ONLY = {"wmproxy_reloads", "wmproxy_uptime_seconds"}
#: Merged with min() instead of a sum.
_MIN_FAMILIES = {"wmproxy_upstream_member_up"}


def merge_metrics(worker_texts: Iterable[str], own_text: str, workers: int = 0, restarts: int = 0) -> bytes:
    """One Prometheus exposition for the process group.

    Counters, histograms and most gauges add up across workers (same name and
    labels); ``*_created`` timestamps take the earliest; member health takes
    the minimum (up only if up everywhere); reloads and uptime come from the
    supervisor, which adds ``wmproxy_workers`` and ``wmproxy_worker_restarts_total``.
    """
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}

    def add(text: str, skip: set[str]) -> None:
        for fam in text_string_to_metric_families(text):
            if fam.name in skip:
                continue
            _typ, _doc, samples = families.setdefault(fam.name, (fam.type, fam.documentation, {}))
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in samples:
                    samples[key] = s.value
                elif s.name.endswith("_created") or fam.name in _MIN_FAMILIES:
                    samples[key] = min(samples[key], s.value)
                else:
                    samples[key] += s.value

    for text in worker_texts:
        if text:
            add(text, _SUPERVISOR_ONLY)
    from_workers = set(families)
    # the supervisor's own: reloads, uptime, and whatever no worker reported (no worker ready)
    own = [f for f in text_string_to_metric_families(own_text)
           if f.name in _SUPERVISOR_ONLY or f.name not in from_workers]
    metrics: list[Metric] = []
    for name, (typ, doc, samples) in families.items():
        m = Metric(name, doc, typ)
        for (sname, labels), value in samples.items():
            m.add_sample(sname, dict(labels), value)
        metrics.append(m)
    metrics.extend(own)
    metrics.append(GaugeMetricFamily("wmproxy_workers", "Worker processes running.", value=workers))
    metrics.append(CounterMetricFamily("wmproxy_worker_restarts", "Worker processes restarted.", value=restarts))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(metrics))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)
