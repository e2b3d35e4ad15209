"""Bulk throughput of the tunnel against our direct stream relay, alternating runs (issue #6).

    .venv/bin/python -m bench.tunnel_bulk [--size 1G] [--rounds 5] [--dir up,down]
        [--tunnel NAME=SRC ...] [--latency] [--profile DIR]

Each contender moves ``--size`` bytes through one TCP connection to a local bulk service: ``up``
sends them (public side -> private side of the tunnel), ``down`` receives them.  Contenders:

* ``relay``: our stream relay (``[[stream.server]]``, :class:`wmproxy_tw.relay.Splice`),
* ``tunnel:NAME``: tunnel server + client (``map_tcp_bind``) run from the sources in ``SRC``
  (a directory holding ``wmproxy_tw``, e.g. a ``git archive`` of an older commit; default: this
  checkout), so before/after builds run side by side.

Rounds alternate the contenders (order rotated each round); the report gives per-contender
medians of throughput, the ratio tunnel/relay per round (median), and CPU seconds per GB of
every process (server, client, relay).  ``--latency`` adds wrk -c 1 through ``map_http`` vs
the origin directly (median p50, the difference is the added latency).  ``--profile DIR``
records py-spy (raw, collapsed stacks) of each tunnel process during one extra transfer.
Timing is reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .peers import Ctx
from .procs import Proc, free_port
from .scenarios import TUNNEL_DOMAIN, TcpRelay
from .scenarios import Tunnel as TunnelScenario

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BLOCK = 1024 * 1024
DOMAIN = TUNNEL_DOMAIN
TWISTD = "from twisted.scripts.twistd import run; run()"


# ----------------------------------------------------------------- the bulk service


def serve(port: int) -> None:
    """'U': read to EOF, answer the count (8 bytes); 'D' + size (8 bytes): send that many bytes."""
    import socketserver

    payload = memoryview(bytes(range(256)) * (BLOCK // 256))

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            head = _recv_exact(sock, 1)
            if head == b"U":
                buf = bytearray(BLOCK)
                total = 0
                while n := sock.recv_into(buf):
                    total += n
                sock.sendall(struct.pack("!Q", total))
            elif head == b"D":
                (size,) = struct.unpack("!Q", _recv_exact(sock, 8))
                while size > 0:
                    step = min(size, BLOCK)
                    sock.sendall(payload[:step])
                    size -= step
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(BLOCK):
                    pass

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server(("127.0.0.1", port), Handler) as server:
        server.serve_forever()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def transfer(port: int, size: int, direction: str) -> float:
    """Seconds to move ``size`` bytes through ``port`` (checks the count)."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        if direction == "up":
            payload = memoryview(bytes(range(256)) * (BLOCK // 256))
            sock.sendall(b"U")
            left = size
            while left > 0:
                step = min(left, BLOCK)
                sock.sendall(payload[:step])
                left -= step
            sock.shutdown(socket.SHUT_WR)
            (got,) = struct.unpack("!Q", _recv_exact(sock, 8))
        else:
            sock.sendall(b"D" + struct.pack("!Q", size))
            buf = bytearray(BLOCK)
            got = 0
            while n := sock.recv_into(buf):
                got += n
    if got != size:
        raise RuntimeError(f"{direction}: {got} of {size} bytes arrived")
    return time.perf_counter() - start


# ----------------------------------------------------------------- processes


def cpu_seconds(proc: Proc) -> tuple[float, float]:
    """(user, system) CPU seconds of the program's processes."""
    user = system = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in proc.pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / tick
        system += int(fields[12]) / tick
    return user, system


def peak_rss_kib(proc: Proc) -> int:
    peak = 0
    for pid in proc.pids():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak


CPROFILE: list[Path] = []


def start_ours(work: Path, name: str, body: str, ports: tuple[int, ...], src: Path, cprofile: bool = False,
               extra_env: dict[str, str] | None = None) -> Proc:
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "wmproxy.toml"
    conf.write_text('disable_control = true\ndefault_level = "warn"\n\n' + body)
    env = dict(os.environ, PYTHONPATH=str(src), **(extra_env or {}))
    argv = [str(REPO / ".venv" / "bin" / "python"), "-c", TWISTD, "-n", "--pidfile=", "wmproxy", "-c", str(conf)]
    if cprofile:
        CPROFILE.append(d / "cprofile.out")
        argv[1:3] = [str(HERE / "cprof.py"), str(d / "cprofile.out")]
    p = Proc(name, argv, d, ports, env=env)
    p.start(timeout=30)
    return p


def scenario_ctx(work: Path, service: int, origin: int | None) -> Ctx:
    """The bench context the scenarios' configs need: the bulk service stands in for iperf3."""
    return Ctx(repo=REPO, work=work, quick=False, origin_port=origin or free_port(), iperf_port=service)


class Tunnel:
    """Tunnel server + client with the ``tunnel_tcp``/``tunnel_http`` scenarios' configs."""

    def __init__(self, work: Path, name: str, src: Path, service: int, origin: int | None,
                 cprofile: bool = False, env: dict[str, str] | None = None) -> None:
        self.name = name
        sc = TunnelScenario(scenario_ctx(work, service, origin))
        configs = sc.ours_configs()
        server, ports = configs["ours-tunnel-server"]
        client, _ = configs["ours-tunnel-client"]
        self.tcp_port, self.http_port = sc.p("ours-tcp"), sc.p("ours-http")
        self.server = start_ours(work, f"{name}-server", server, ports, src, cprofile, env)
        self.client = start_ours(work, f"{name}-client", client, (), src, cprofile, env)
        self.procs = {"server": self.server, "client": self.client}
        deadline = time.monotonic() + 20
        while True:  # registered once a transfer goes through
            try:
                transfer(self.tcp_port, 1024, "up")
                break
            except (OSError, RuntimeError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: the client did not register within 20s") from None
                time.sleep(0.2)


def start_relay(work: Path, service: int) -> tuple[int, Proc]:
    """Our stream relay (the ``tcp_relay_1`` scenario's config) in front of the bulk service."""
    sc = TcpRelay(scenario_ctx(work, service, None), 1)
    body, ports = sc.ours_configs()["ours"]
    return ports[0], start_ours(work, "relay", body, ports, REPO)


def wrk_p50(port: int, seconds: int) -> float:
    out = subprocess.run(["wrk", "-t1", "-c1", f"-d{seconds}s", "--latency", "-H", f"Host: {DOMAIN}",
                          f"http://127.0.0.1:{port}/1k"], capture_output=True, text=True, timeout=seconds + 30,
                         check=False).stdout
    sys.path.insert(0, str(REPO))
    from bench.parse import parse_wrk

    return parse_wrk(out)["p50"]


# ----------------------------------------------------------------- main


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="up,down", help="up, down, both (default) or none")
    ap.add_argument("--tunnel", action="append", default=[], help="NAME=SRC[@VAR=VALUE,...] (default: new=this checkout)")
    ap.add_argument("--no-relay", action="store_true")
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--profile", type=Path)
    ap.add_argument("--cprofile", action="store_true", help="run the tunnel ends under cProfile (call counts)")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--perf", action="store_true", help="profile with perf (kernel and C) instead of py-spy")
    args = ap.parse_args()
    size = parse_size(args.size)
    directions = [d for d in args.dir.split(",") if d in ("up", "down")]
    tunnels_src = [t.split("=", 1) for t in args.tunnel] or [["new", str(REPO)]]

    work = Path(tempfile.mkdtemp(prefix="tunnel-bulk-"))
    service_port = free_port()
    service = Proc("bulk", [sys.executable, "-m", "bench.tunnel_bulk", "serve", str(service_port)], work,
                   (service_port,), env=dict(os.environ, PYTHONPATH=str(REPO)))
    service.workdir.mkdir(exist_ok=True)
    service.start()
    procs: list[Proc] = [service]
    origin = None
    try:
        if args.latency:
            origin_port = free_port()
            www = work / "www"
            www.mkdir()
            (www / "1k").write_bytes(bytes(range(256)) * 4)
            conf = work / "nginx.conf"
            conf.write_text(f"""daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 1024; }}
http {{ access_log off; server {{ listen 127.0.0.1:{origin_port}; root {www}; }} }}
""")
            ngx = Proc("origin", ["nginx", "-p", str(work), "-c", str(conf)], work, (origin_port,))
            ngx.start()
            procs.append(ngx)
            origin = origin_port
        contenders: dict[str, tuple[int, dict[str, Proc]]] = {}
        if not args.no_relay:
            relay_port, relay = start_relay(work, service_port)
            procs.append(relay)
            contenders["relay"] = (relay_port, {"relay": relay})
        tunnels = {}
        for name, spec in tunnels_src:
            src, _, env_text = spec.partition("@")
            env = dict(kv.split("=", 1) for kv in env_text.split(",") if kv)
            t = Tunnel(work, name, Path(src).resolve(), service_port, origin, args.cprofile, env)
            procs += [t.server, t.client]
            tunnels[name] = t
            contenders[f"tunnel:{name}"] = (t.tcp_port, t.procs)
        names = list(contenders)
        for direction in directions:
            for port, _ in contenders.values():  # warm-up
                transfer(port, min(size, 64 * BLOCK), direction)
            speed: dict[str, list[float]] = {n: [] for n in names}
            cpu: dict[str, dict[str, list[float]]] = {n: {k: [] for k in contenders[n][1]} for n in names}
            sys_cpu: dict[str, dict[str, list[float]]] = {n: {k: [] for k in contenders[n][1]} for n in names}
            ratios: dict[str, list[float]] = {n: [] for n in names if n != "relay"}
            for rnd in range(args.rounds):
                order = names[rnd % len(names):] + names[:rnd % len(names)]
                this: dict[str, float] = {}
                for n in order:
                    port, ps = contenders[n]
                    before = {k: cpu_seconds(p) for k, p in ps.items()}
                    secs = transfer(port, size, direction)
                    gb = size / 1e9
                    for k, p in ps.items():
                        user, system = cpu_seconds(p)
                        cpu[n][k].append((user - before[k][0]) / gb)
                        sys_cpu[n][k].append((system - before[k][1]) / gb)
                    this[n] = size * 8 / secs / 1e9
                    speed[n].append(this[n])
                for n in ratios:
                    if "relay" in this:
                        ratios[n].append(this[n] / this["relay"])
                print(f"[{direction} round {rnd + 1}] " + "  ".join(f"{n} {this[n]:.2f}" for n in names)
                      + " Gbit/s", flush=True)
            print(f"\n== {direction}: {size / 2**20:.0f} MiB per transfer, {args.rounds} rounds, medians ==")
            for n in names:
                cpus = "  ".join(f"{k} {statistics.median(v):.2f}+{statistics.median(sys_cpu[n][k]):.2f}"
                                 for k, v in cpu[n].items())
                extra = f"  ratio/relay {statistics.median(ratios[n]):.2f}" if ratios.get(n) else ""
                print(f"{n:14} {statistics.median(speed[n]):6.2f} Gbit/s{extra}   CPU s/GB user+sys: {cpus}")
        for n in names:
            peaks = "  ".join(f"{k} {peak_rss_kib(p) / 1024:.0f}" for k, p in contenders[n][1].items())
            print(f"peak RSS MiB {n}: {peaks}")
        if args.latency and origin:
            direct, through = [], {n: [] for n in tunnels}
            for _ in range(args.rounds):
                direct.append(wrk_p50(origin, 3))
                for n, t in tunnels.items():
                    through[n].append(wrk_p50(t.http_port, 3))
            d = statistics.median(direct)
            print(f"\nwrk -c1 p50 direct origin {d * 1e6:.0f} us")
            for n, v in through.items():
                m = statistics.median(v)
                print(f"wrk -c1 p50 via tunnel:{n} {m * 1e6:.0f} us (added {(m - d) * 1e6:.0f} us)")
        if args.profile:
            profile(args.profile, tunnels, size, directions, args.native, args.perf)
    finally:
        for p in procs:
            p.stop()
    for path in CPROFILE:
        import io
        import pstats

        if path.exists():
            buf = io.StringIO()
            pstats.Stats(str(path), stream=buf).sort_stats("tottime").print_stats(40)
            print(f"\n== cProfile {path.parent.name} ==\n" + buf.getvalue())


def profile(out: Path, tunnels: dict[str, Tunnel], size: int, directions: list[str], native: bool,
            perf: bool) -> None:
    sys.path.insert(0, str(REPO))
    from bench.parse import collapsed_top

    spy = REPO / ".venv" / "bin" / "py-spy"
    out.mkdir(parents=True, exist_ok=True)
    for name, t in tunnels.items():
        for direction in directions:
            if perf:
                perf_profile(out, name, t, size, direction)
                continue
            recs = []
            for role, p in t.procs.items():
                f = out / f"{name}-{direction}-{role}.txt"
                recs.append((role, f, subprocess.Popen(
                    [str(spy), "record", *(["--native"] if native else ["--nonblocking"]), "-r", "200", "-f", "raw", "-o", str(f),
                     "--pid", str(p.pids()[0])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            time.sleep(1.0)
            transfer(t.tcp_port, size, direction)
            for role, f, r in recs:
                r.send_signal(2)
                r.wait(30)
                print(f"\n== py-spy tunnel:{name} {direction} {role} ==")
                for func, self_pct, total_pct in collapsed_top(f.read_text(), 25):
                    print(f"{self_pct:6.1f} {total_pct:7.1f}  {func}")


def perf_profile(out: Path, name: str, t: Tunnel, size: int, direction: str) -> None:
    recs = []
    for role, p in t.procs.items():
        f = out / f"{name}-{direction}-{role}.perf"
        recs.append((role, f, subprocess.Popen(["perf", "record", "-F", "499", "-o", str(f), "-p", str(p.pids()[0])],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    time.sleep(1.0)
    transfer(t.tcp_port, size, direction)
    for role, f, r in recs:
        r.send_signal(2)
        r.wait(60)
        rep = subprocess.run(["perf", "report", "-i", str(f), "--stdio", "--no-children", "--sort", "sym"],
                             capture_output=True, text=True, check=False).stdout
        rows = [x for x in rep.splitlines() if x.strip() and not x.startswith("#")][:35]
        print(f"\n== perf tunnel:{name} {direction} {role} ==")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
