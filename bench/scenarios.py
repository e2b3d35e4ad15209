"""The scenarios of SPEC §11: what ours needs (its config), who it is compared with, how it is measured.

A scenario whose config ``twistd wmproxy --check`` refuses as "not supported
yet" is skipped with that note; the configs are written per SPEC §4/§6/§7/§8 so
the scenario runs as soon as the feature lands.
"""

from __future__ import annotations

import json
import math
import select
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import peers
from .parse import parse_ab, parse_iperf3, parse_wrk
from .peers import Ctx
from .procs import Proc, busy_seconds, children_cpu, free_port, run

# ----------------------------------------------------------------- running


@dataclass
class Running:
    """A started contender: its processes and the port a client talks to."""

    procs: list[Proc]
    port: int
    info: dict[str, object] = field(default_factory=dict)

    def memory_kib(self) -> int:
        return sum(p.memory_kib() for p in self.procs)


Measured = tuple[float, dict[str, float]]


def _secs(d: float) -> int:
    return max(1, math.ceil(d))


# ---------------------------------------------------------------- clients


def ab(url: str, duration: float, concurrency: int = 16, proxy: int | None = None) -> Measured:
    """ApacheBench without -k: a new connection per request."""
    argv = ["ab", "-q", "-r", "-s", "10", "-c", str(concurrency), "-t", str(_secs(duration)), "-n", "1000000"]
    if proxy:
        argv += ["-X", f"127.0.0.1:{proxy}"]
    _code, out, err = run(argv + [url], timeout=duration + 30)
    try:
        r = parse_ab(out)
    except ValueError as e:
        raise RuntimeError(f"ab: {(err.strip() or str(e))[-300:]}") from None
    if r["complete"] and r["failed"] > r["complete"] / 2:
        raise RuntimeError(f"ab: {r['failed']:.0f} of {r['complete']:.0f} requests failed")
    return r["rps"], {k: v for k, v in r.items() if k in ("failed", "non2xx", "complete")}


def wrk(url: str, duration: float, connections: int, headers: dict[str, str] | None = None,
        script: str | None = None) -> Measured:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{_secs(duration)}s", "--latency"]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    if script:
        argv += ["-s", script]
    _code, out, err = run(argv + [url], timeout=duration + 30)
    try:
        r = parse_wrk(out)
    except ValueError as e:
        raise RuntimeError(f"wrk: {(err.strip() or str(e))[-300:]}") from None
    if r.get("requests") and r["errors"] > r["requests"] / 2:
        raise RuntimeError(f"wrk: {r['errors']:.0f} errors for {r['requests']:.0f} requests")
    return r["rps"], {k: v for k, v in r.items() if k in ("errors", "read_errors", "p50", "p99")}


def iperf(port: int, duration: float, streams: int = 1, udp_rate: str | None = None) -> Measured:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(_secs(duration)), "-P", str(streams), "-J",
            "--connect-timeout", "5000"]
    if udp_rate:
        argv += ["-u", "-b", udp_rate, "-l", "1400"]
    _code, out, _err = run(argv, timeout=duration + 30)
    try:
        r = parse_iperf3(out)
    except ValueError as e:
        raise RuntimeError(str(e)[-300:]) from None
    if udp_rate:
        return r["bps"] / 1e6, {k: v for k, v in r.items() if k in ("lost_percent", "jitter_ms")}
    return r["bps"] / 1e9, {k: v for k, v in r.items() if k == "retransmits"}


def with_cpu(r: Running, fn: Callable[[], Measured]) -> Measured:
    """Run a measurement and add where the CPU went (from /proc): the contender's cores,
    the load generator's, the whole machine's, and the contender's CPU µs per request."""
    t0, p0, c0, b0 = time.monotonic(), sum(p.cpu_seconds() for p in r.procs), children_cpu(), busy_seconds()
    value, extras = fn()
    wall = time.monotonic() - t0
    proxy = sum(p.cpu_seconds() for p in r.procs) - p0
    extras = dict(extras, cores_proxy=proxy / wall, cores_client=(children_cpu() - c0) / wall,
                  cores_busy=(busy_seconds() - b0) / wall)
    if value > 0:
        extras["cpu_us"] = proxy / (value * wall) * 1e6
    return value, extras


def loadgen_rate(ctx: Ctx, mode: str, port: int, target: str, duration: float, concurrency: int = 16) -> Measured:
    argv = [ctx.python, "-m", "bench.loadgen", "rate", "--mode", mode, "--port", str(port), "--target", target,
            "-c", str(concurrency), "-d", str(duration)]
    _code, out, err = _run_in(ctx, argv, duration + 60)
    try:
        r = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"loadgen: {err.strip()[-300:]}") from None
    if r["ops"] == 0 or r["errors"] > r["ops"]:
        raise RuntimeError(f"{r['errors']} errors, {r['ops']} requests: {r.get('first_error', '')}")
    return r["rps"], {"errors": r["errors"]}


def _run_in(ctx: Ctx, argv: list[str], timeout: float) -> tuple[int, str, str]:
    try:
        r = subprocess.run(argv, capture_output=True, timeout=timeout, cwd=ctx.repo, check=False)
    except subprocess.TimeoutExpired:
        return -9, "", f"timed out after {timeout:.0f}s"
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def _hold(ctx: Ctx, mode: str, port: int, count: int, target: str, host: str) -> tuple[subprocess.Popen[str], dict]:
    argv = [ctx.python, "-m", "bench.loadgen", "idle", "--mode", mode, "--port", str(port), "-n", str(count),
            "-c", "64"]
    if target:
        argv += ["--target", target]
    if host:
        argv += ["--host", host]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ctx.repo)
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], 60 + count / 100)
    line = p.stdout.readline() if ready else ""
    if not line:
        p.kill()
        _, err = p.communicate()
        raise RuntimeError(f"idle loadgen: {err.strip()[-300:] or 'no report'}")
    return p, json.loads(line)


def _release(p: subprocess.Popen[str]) -> None:
    try:
        p.communicate(input="", timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()


def idle_memory(ctx: Ctx, running: Running, mode: str, count: int, target: str = "", host: str = "") -> Measured:
    """KiB per idle connection: memory of the contender's processes before and with `count` held open."""
    warm, _ = _hold(ctx, mode, running.port, 64, target, host)
    _release(warm)
    before = running.memory_kib()
    p, report = _hold(ctx, mode, running.port, count, target, host)
    try:
        if report["open"] < 0.95 * count:
            raise RuntimeError(f"only {report['open']} of {count} connections opened: {report.get('first_error', '')}")
        after = running.memory_kib()
    finally:
        _release(p)
    return (after - before) / report["open"], {"open": report["open"], "errors": report["errors"]}


# -------------------------------------------------------------- scenarios


class Scenario:
    """Base: ports on demand; ours started from `ours_configs`; peers from `start_peer`."""

    name = ""
    title = ""
    unit = "req/s"
    better = "higher"
    note = ""
    peers: tuple[str, ...] = ()
    fresh_per_round = False  # memory scenarios: restart each contender before each round

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.ports: dict[str, int] = {}

    def p(self, key: str, udp: bool = False) -> int:
        if key not in self.ports:
            self.ports[key] = free_port(udp_too=udp)
        return self.ports[key]

    @property
    def contenders(self) -> tuple[str, ...]:
        return ("ours", *self.peers)

    def ours_configs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Process name → (config body, ports it listens on)."""
        raise NotImplementedError

    def one(self, body: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The usual case: one process of ours, listening on the port called "ours"."""
        return {"ours": (body, (self.p("ours"),))}

    def start(self, who: str) -> Running:
        if who == "ours":
            configs = self.ours_configs()
            procs: list[Proc] = []
            try:
                for name, (body, ports) in configs.items():
                    procs.append(peers.ours(self.ctx, name, body, ports))
            except BaseException:
                for p in procs:
                    p.stop()
                raise
            self.ready(procs)
            return Running(procs, self.ours_port())
        return self.start_peer(who)

    def ours_port(self) -> int:
        return self.p("ours")

    def ready(self, procs: list[Proc]) -> None:
        """Wait until ours is really serving (beyond listening), when that takes more."""

    def start_peer(self, who: str) -> Running:
        raise NotImplementedError

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        raise NotImplementedError


# ..................................................... forward proxy (§3)


def _forward_body(port: int) -> str:
    return f"""[proxy]
bind = "127.0.0.1:{port}"
flag = "http https socks5"
"""


class Forward(Scenario):
    peers = ("pproxy", "proxy.py", "tinyproxy")

    def ours_configs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return self.one(_forward_body(self.p("ours")))

    def start_peer(self, who: str) -> Running:
        start: dict[str, Callable[[Ctx, int], Proc]] = {
            "pproxy": peers.pproxy, "proxy.py": peers.proxy_py, "tinyproxy": peers.tinyproxy, "dante": peers.dante}
        port = self.p(who)
        return Running([start[who](self.ctx, port)], port)

    @property
    def origin_url(self) -> str:
        return f"http://127.0.0.1:{self.ctx.origin_port}/1k"


class ForwardGet(Forward):
    name = "forward_get"
    title = "forward proxy GET 1 KiB, new connection per request (ab -c 16, no -k)"

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return with_cpu(r, lambda: ab(self.origin_url, duration, 16, proxy=r.port))


class ForwardKeepalive(Forward):
    name = "forward_get_keepalive"
    title = "forward proxy GET 1 KiB, keep-alive (wrk -c 50)"
    note = ("not comparable: pproxy parses only the first request of a keep-alive connection and "
            "pipes the rest blindly (SPEC §11)")

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        script = self.ctx.work / "absolute-uri.lua"
        script.write_text(f'wrk.path = "{self.origin_url}"\nwrk.headers["Host"] = "127.0.0.1:{self.ctx.origin_port}"\n')
        return with_cpu(r, lambda: wrk(f"http://127.0.0.1:{r.port}/", duration, 50, script=str(script)))


class ForwardConnect(Forward):
    name = "forward_connect"
    title = "HTTP CONNECT + GET 1 KiB, new tunnel per request (loadgen -c 16)"

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return loadgen_rate(self.ctx, "connect", r.port, f"127.0.0.1:{self.ctx.origin_port}", duration)


class ForwardSocks5(Forward):
    name = "forward_socks5"
    title = "SOCKS5 CONNECT + GET 1 KiB, new tunnel per request (loadgen -c 16)"
    peers = ("pproxy", "dante")

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return loadgen_rate(self.ctx, "socks5", r.port, f"127.0.0.1:{self.ctx.origin_port}", duration)


class IdleConnect(Forward):
    name = "idle_connect"
    unit = "KiB/conn"
    better = "lower"
    fresh_per_round = True

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.count = 1000 if ctx.quick else 5000
        self.title = f"memory per idle CONNECT tunnel ({self.count:,} open, each used once)"

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return idle_memory(self.ctx, r, "connect", self.count, target=f"127.0.0.1:{self.ctx.origin_port}")


# ..................................................... reverse proxy (§4)


def _reverse_body(ctx: Ctx, port: int) -> str:
    return f"""[http]

[[http.upstream]]
name = "origin"
server = [{{ addr = "127.0.0.1:{ctx.origin_port}" }}]

[[http.server]]
bind_addr = "127.0.0.1:{port}"

[[http.server.location]]
rule = "/"
proxy_url = "http://origin"
"""


class Reverse(Scenario):
    peers = ("nginx", "twisted")  # twisted: stock twisted.web.proxy.ReverseProxyResource (issue #3)

    def __init__(self, ctx: Ctx, connections: int) -> None:
        super().__init__(ctx)
        self.connections = connections
        self.name = f"reverse_c{connections}"
        self.title = f"reverse proxy to nginx origin, 1 KiB, keep-alive (wrk -c {connections})"

    def ours_configs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return self.one(_reverse_body(self.ctx, self.p("ours")))

    def start_peer(self, who: str) -> Running:
        if who == "haproxy":
            return Running([peers.haproxy(self.ctx, self.p(who), self.ctx.origin_port, mode="http")], self.p(who))
        if who == "twisted":
            return Running([peers.twisted_peer(self.ctx, "proxy", self.p(who), str(self.ctx.origin_port))],
                           self.p(who))
        return Running([peers.nginx_reverse(self.ctx, self.p(who))], self.p(who))

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return wrk(f"http://127.0.0.1:{r.port}/1k", duration, self.connections)


class IdleHttp(Reverse):
    unit = "KiB/conn"
    better = "lower"
    fresh_per_round = True
    peers = ("nginx", "haproxy")

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx, 0)
        # 10,000 as asked, unless `ulimit -n` can't be raised that far (HAProxy counts 2 fds a connection)
        self.count = 2000 if ctx.quick else min(10000, ctx.nofile // 2 - 100)
        self.name = "idle_http"
        self.title = f"memory per idle keep-alive HTTP connection to the reverse proxy ({self.count:,} open)"
        if self.count < 10000 and not ctx.quick:
            self.title += f", limited by ulimit -n {ctx.nofile}"

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return idle_memory(self.ctx, r, "http", self.count, host="127.0.0.1")


class Static(Scenario):
    peers = ("nginx", "twisted")  # twisted: stock twisted.web.static.File (issue #4)

    def __init__(self, ctx: Ctx, path: str) -> None:
        super().__init__(ctx)
        self.path = path
        self.name = f"static_{path.strip('/')}"
        self.title = f"file server, {'1 KiB' if path == '/1k' else '1 MiB'} file, keep-alive (wrk -c 50)"

    def ours_configs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        body = f"""[http]

[[http.server]]
bind_addr = "127.0.0.1:{self.p('ours')}"

[[http.server.location]]
rule = "/"
file_server = {{ root = "{self.ctx.www}" }}
"""
        return self.one(body)

    def start_peer(self, who: str) -> Running:
        if who == "twisted":
            return Running([peers.twisted_peer(self.ctx, "static", self.p(who), str(self.ctx.www))], self.p(who))
        return Running([peers.nginx_static(self.ctx, self.p(who))], self.p(who))

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return wrk(f"http://127.0.0.1:{r.port}{self.path}", duration, 50)


class Workers(Scenario):
    """What a second worker process buys on a CPU-bound path (issue #7).

    Both contenders are ours, on the same config: ``workers = 2`` against
    ``workers = 1`` (the ratio column is the speed-up).  The path is a reverse
    proxy location answering ``static_response`` over keep-alive, so the
    proxy's own CPU is all there is; one wrk thread keeps the load generator
    cheap.  The notes show where the CPU went (proxy cores, wrk cores, busy
    cores of the machine): on a 2-core machine the load generator shares the
    cores the workers need.
    """

    name = "workers"
    title = "workers = 2 vs 1: reverse static_response \"ok\", keep-alive (wrk -t1 -c50); ratio = speed-up"
    peers = ("1 worker",)

    def ours_configs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return self.one(self._body(self.p("ours")))

    @staticmethod
    def _body(port: int) -> str:
        return f"""[http]

[[http.server]]
bind_addr = "127.0.0.1:{port}"

[[http.server.location]]
rule = "/"
static_response = "ok"
"""

    def start(self, who: str) -> Running:
        workers = "2" if who == "ours" else "1"
        port = self.p(who)
        proc = peers.ours(self.ctx, f"ours-w{workers}", self._body(port), (port,), workers=workers)
        return Running([proc], port)

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return with_cpu(r, lambda: wrk(f"http://127.0.0.1:{r.port}/", duration, 50))


class TlsHandshake(Scenario):
    name = "tls_handshake"
    title = "TLS handshakes/s: HTTPS GET, new TLS connection per request (ab -c 8, ECDSA P-256)"
    peers = ("nginx",)

    def ours_configs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        body = f"""[http]

[[http.server]]
bind_ssl = "127.0.0.1:{self.p('ours')}"
cert = "{self.ctx.cert}"
key = "{self.ctx.key}"

[[http.server.location]]
rule = "/"
static_response = "ok"
"""
        return self.one(body)

    def start_peer(self, who: str) -> Running:
        return Running([peers.nginx_tls(self.ctx, self.p(who))], self.p(who))

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return ab(f"https://127.0.0.1:{r.port}/", duration, 8)


# .................................................... L4 forwarding (§6)


class TcpRelay(Scenario):
    unit = "Gbit/s"
    peers = ("socat", "haproxy", "nginx", "direct")

    def __init__(self, ctx: Ctx, streams: int) -> None:
        super().__init__(ctx)
        self.streams = streams
        self.name = f"tcp_relay_{streams}"
        self.title = f"TCP relay throughput (iperf3 -P {streams}); direct = loopback ceiling"

    def ours_configs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        body = f"""[stream]

[[stream.server]]
bind_addr = "127.0.0.1:{self.p('ours')}"
proxy_url = "tcp://127.0.0.1:{self.target}"
"""
        return self.one(body)

    @property
    def target(self) -> int:
        return self.ctx.iperf_port

    def start_peer(self, who: str) -> Running:
        port = self.p(who)
        if who == "direct":
            return Running([], self.target)
        if who == "socat":
            return Running(peers.socat(self.ctx, port, self.target), port)
        if who == "haproxy":
            return Running([peers.haproxy(self.ctx, port, self.target)], port)
        return Running([peers.nginx_stream(self.ctx, port, self.target)], port)

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return iperf(r.port, duration, self.streams)


class IdleTcpRelay(TcpRelay):
    unit = "KiB/conn"
    better = "lower"
    fresh_per_round = True
    peers = ("nginx", "haproxy")

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx, 1)
        self.count = 1000 if ctx.quick else 5000
        self.name = "idle_tcp_relay"
        self.title = f"memory per idle TCP relay ({self.count:,} open to the HTTP origin, each used once)"

    @property
    def target(self) -> int:
        return self.ctx.origin_port

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return idle_memory(self.ctx, r, "http", self.count, host="127.0.0.1")


class UdpRelay(Scenario):
    name = "udp_relay"
    unit = "Mbit/s"
    peers = ("socat", "nginx", "direct")

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.rate = "200M" if ctx.quick else "400M"
        self.title = f"UDP relay, received throughput at {self.rate}bit/s offered (iperf3 -u -l 1400); loss in rounds"

    def ours_configs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        port, target = self.p("ours", udp=True), self.ctx.iperf_port
        body = f"""[stream]

[[stream.upstream]]
name = "iperf-udp"
bind = "udp"
server = [{{ addr = "127.0.0.1:{target}" }}]

# iperf3's control connection (TCP) and its datagrams share the port.
[[stream.server]]
bind_addr = "127.0.0.1:{port}"
proxy_url = "tcp://127.0.0.1:{target}"

[[stream.server]]
bind_addr = "127.0.0.1:{port}"
bind_mode = "udp"
up_name = "iperf-udp"
timeout = "30s"
"""
        return {"ours": (body, (port,))}

    def start_peer(self, who: str) -> Running:
        port = self.p(who, udp=True)
        if who == "direct":
            return Running([], self.ctx.iperf_port)
        if who == "socat":
            return Running(peers.socat(self.ctx, port, self.ctx.iperf_port, udp=True), port)
        return Running([peers.nginx_stream(self.ctx, port, self.ctx.iperf_port, udp=True)], port)

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return iperf(r.port, duration, 1, udp_rate=self.rate)


# ........................................................ WebSocket (§7)


class WsChain(Scenario):
    name = "ws_chain"
    unit = "Gbit/s"
    title = "tcp2ws → ws2tcp chain (iperf3 -P 1): ours→ours vs ours→websockify; direct = ceiling"
    peers = ("websockify", "direct")

    def ours_configs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        front, back, wsfy_front = self.p("ours"), self.p("ours-ws2tcp"), self.p("ours-tcp2ws-websockify")
        iperf_port = self.ctx.iperf_port
        return {
            "ours-tcp2ws": (_tcp2ws(front, back), (front,)),
            "ours-ws2tcp": (f"""[stream]

[[stream.server]]
bind_addr = "127.0.0.1:{back}"
bind_mode = "ws2tcp"
proxy_url = "tcp://127.0.0.1:{iperf_port}"
""", (back,)),
            "ours-tcp2ws-websockify": (_tcp2ws(wsfy_front, self.p("websockify")), (wsfy_front,)),
        }

    def start(self, who: str) -> Running:
        if who == "ours":
            configs = self.ours_configs()
            procs = [peers.ours(self.ctx, n, *configs[n]) for n in ("ours-tcp2ws", "ours-ws2tcp")]
            return Running(procs, self.p("ours"))
        return self.start_peer(who)

    def start_peer(self, who: str) -> Running:
        if who == "direct":
            return Running([], self.ctx.iperf_port)
        wsfy = peers.websockify(self.ctx, self.p("websockify"), self.ctx.iperf_port)
        body, ports = self.ours_configs()["ours-tcp2ws-websockify"]
        try:
            front = peers.ours(self.ctx, "ours-tcp2ws-websockify", body, ports)
        except BaseException:
            wsfy.stop()
            raise
        return Running([front, wsfy], ports[0])

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return iperf(r.port, duration, 1)


def _tcp2ws(port: int, ws_port: int) -> str:
    return f"""[stream]

[[stream.server]]
bind_addr = "127.0.0.1:{port}"
bind_mode = "tcp2ws"
proxy_url = "ws://127.0.0.1:{ws_port}/"
"""


# ...................................................... NAT traversal (§8)

TUNNEL_DOMAIN = "bench.localhost"


def _serving_domain(port: int, seconds: float = 20.0) -> None:
    """Wait until 127.0.0.1:port answers 200 for the tunnel domain (the client has registered)."""
    import http.client

    deadline = time.monotonic() + seconds
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/1k", headers={"Host": TUNNEL_DOMAIN})
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port} did not serve the tunnel domain within {seconds:.0f}s")
        time.sleep(0.2)


def _web_mapping(ctx: Ctx) -> str:
    """The tunnel client's http mapping of the origin, on TUNNEL_DOMAIN."""
    return f"""
[[proxy.mappings]]
name = "web"
mode = "http"
local_addr = "127.0.0.1:{ctx.origin_port}"
domain = "{TUNNEL_DOMAIN}"
"""


class Tunnel(Scenario):
    peers = ("direct",)

    def ours_configs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        center, http_port, tcp_port = self.p("center"), self.p("ours-http"), self.p("ours-tcp")
        server = f"""[proxy]
mode = "server"
center_addr = "127.0.0.1:{center}"
username = "bench"
password = "bench"
map_http_bind = "127.0.0.1:{http_port}"
map_tcp_bind = "127.0.0.1:{tcp_port}"
"""
        client = f"""[proxy]
mode = "client"
server = "127.0.0.1:{center}"
username = "bench"
password = "bench"
{_web_mapping(self.ctx)}
[[proxy.mappings]]
name = "tcp"
mode = "tcp"
local_addr = "127.0.0.1:{self.ctx.iperf_port}"
"""
        return {"ours-tunnel-server": (server, (center, http_port, tcp_port)), "ours-tunnel-client": (client, ())}

    def ready(self, procs: list[Proc]) -> None:
        """The client has registered its mappings once the public HTTP port answers for its domain."""
        _serving_domain(self.p("ours-http"))

    def start_peer(self, who: str) -> Running:
        return Running([], 0)


class TunnelHttp(Tunnel):
    name = "tunnel_http"
    title = "tunnel map_http: GET 1 KiB through server+client, keep-alive (wrk -c 50) vs direct origin"

    def ours_port(self) -> int:
        return self.p("ours-http")

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        port = r.port or self.ctx.origin_port
        return wrk(f"http://127.0.0.1:{port}/1k", duration, 50, headers={"Host": TUNNEL_DOMAIN})


class TunnelTcp(Tunnel):
    name = "tunnel_tcp"
    unit = "Gbit/s"
    title = "tunnel map_tcp: iperf3 -P 1 through server+client vs direct"

    def ours_port(self) -> int:
        return self.p("ours-tcp")

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        return iperf(r.port or self.ctx.iperf_port, duration, 1)


# ............................................................ fleet tunnel (issue 10)

FLEET_SECRET = "bench-fleet-secret-0123456789"


class FleetHop(Scenario):
    """Two fleet nodes and a Redis; the client is attached to B: requests via A take the A→B hop."""

    name = "fleet_hop"
    unit = "ms"
    better = "lower"
    title = "fleet: median latency, GET 1 KiB via node A (A→B link hop) vs via node B holding the client (wrk -c 1)"
    note = "'ours' is node A (the hop), 'holder' is node B serving its own client; same processes"
    peers = ("holder",)

    def _node(self, name: str, http: int, center: int, link: int) -> str:
        return f"""[fleet]
redis = "redis://127.0.0.1:{self.p("redis")}/0"
node_id = "{name}"
advertise = "127.0.0.1:{link}"
secret = "{FLEET_SECRET}"
lease = "3s"

[proxy]
center_addr = "127.0.0.1:{center}"
username = "bench"
password = "bench"
map_http_bind = "127.0.0.1:{http}"
"""

    def ours_configs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        a = (self.p("a-http"), self.p("a-center"), self.p("a-link"))
        b = (self.p("b-http"), self.p("b-center"), self.p("b-link"))
        client = f"""[proxy]
server = "127.0.0.1:{b[1]}"
username = "bench"
password = "bench"
{_web_mapping(self.ctx)}"""
        return {"ours-fleet-a": (self._node("a", *a), a), "ours-fleet-b": (self._node("b", *b), b),
                "ours-fleet-client": (client, ())}

    def start(self, who: str) -> Running:
        if who != "ours":
            return Running([], self.p("b-http"))  # node B of ours' processes
        redis = _redis_server(self.ctx, self.p("redis"))
        try:
            running = super().start("ours")
        except BaseException:
            redis.stop()
            raise
        running.procs.append(redis)
        return running

    def ours_port(self) -> int:
        return self.p("a-http")

    def ready(self, procs: list[Proc]) -> None:
        """Both nodes answer for the client's domain (B directly, A through the directory)."""
        _serving_domain(self.p("b-http"))
        _serving_domain(self.p("a-http"))

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        rps, extras = wrk(f"http://127.0.0.1:{r.port}/1k", duration, 1, headers={"Host": TUNNEL_DOMAIN})
        return extras["p50"] * 1000, {"rps": rps, "p99_ms": extras.get("p99", 0.0) * 1000}
# ..................................................... fleet: shared limit_req (issue 10)


def _redis_server(ctx: Ctx, port: int) -> Proc:
    """A started redis-server of our own on 127.0.0.1:port, without persistence."""
    d = ctx.dir("redis-server")
    p = Proc("redis-server", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(d)], d, (port,))
    p.start(timeout=10)
    return p


def _limit_body(port: int, redis_port: int, shared: bool) -> str:
    # a rate nobody reaches: every request is checked and passes (the cost of the check, not of 503s)
    return f"""[fleet]
redis = "redis://127.0.0.1:{redis_port}/0"
node_id = "bench-{port}"
key_prefix = "bench:"

[http]
[http.limit_req_zone]
z = "{{client_ip}} rate=1000000r/s{' shared' if shared else ''}"

[[http.server]]
bind_addr = "127.0.0.1:{port}"
limit_req = "zone=z burst=1000000 nodelay"

[[http.server.location]]
rule = "/"
static_response = "ok\\n"
"""


class LimitReqShared(Scenario):
    """Median latency of a request through a ``shared`` limit_req zone (one EVALSHA to a local
    redis-server per request) against the same node with a local zone and without limit_req."""

    unit = "ms p50"
    better = "lower"
    peers = ("local", "none")
    note = "all three are ours with [fleet]; ratios shared/local and shared/none give the added latency"

    def __init__(self, ctx: Ctx, connections: int) -> None:
        super().__init__(ctx)
        self.connections = connections
        self.name = f"limit_req_shared_c{connections}"
        self.title = (f"limit_req shared (Redis, one EVALSHA per request) vs local zone vs none: "
                      f"median latency (wrk -c {connections})")

    def start(self, who: str) -> Running:
        if who != "ours":
            return self.start_peer(who)
        redis = self._redis()
        try:
            r = super().start("ours")
        except BaseException:
            redis.stop()
            raise
        r.procs.append(redis)
        return r

    def _redis(self) -> Proc:
        return _redis_server(self.ctx, self.p("redis"))

    def ours_configs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return self.one(_limit_body(self.p("ours"), self.p("redis"), shared=True))

    def start_peer(self, who: str) -> Running:
        body = _limit_body(self.p(who), self.p("redis"), shared=False)
        if who == "none":
            body = body.replace('limit_req = "zone=z burst=1000000 nodelay"\n', "")
        return Running([peers.ours(self.ctx, f"ours-{who}", body, (self.p(who),))], self.p(who))

    def measure(self, who: str, r: Running, duration: float) -> Measured:
        _rps, extras = wrk(f"http://127.0.0.1:{r.port}/", duration, self.connections)
        return extras["p50"] * 1000, dict(extras, rps=_rps)


# ------------------------------------------------------------------ table

FACTORIES: list[Callable[[Ctx], Scenario]] = [
    ForwardGet, ForwardKeepalive, ForwardConnect, ForwardSocks5,
    lambda c: Reverse(c, 50), lambda c: Reverse(c, 500),
    lambda c: Static(c, "/1k"), lambda c: Static(c, "/1m"),
    lambda c: TcpRelay(c, 1), lambda c: TcpRelay(c, 8), UdpRelay,
    WsChain, TunnelHttp, TunnelTcp, FleetHop,
    IdleHttp, IdleTcpRelay, IdleConnect,
    TlsHandshake, Workers, lambda c: LimitReqShared(c, 1), lambda c: LimitReqShared(c, 10),
]


def all_scenarios(ctx: Ctx) -> list[Scenario]:
    return [f(ctx) for f in FACTORIES]
