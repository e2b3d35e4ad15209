"""``make soak``: one ``twistd wmproxy`` with every capability under mixed load for SOAK_S seconds
(default 600), checking every answer; then requests per kind, errors (must be 0) and the RSS growth
after warm-up (must stay under 5 %).  Loopback only.  Never part of ``make test``.

The instance under test serves: a reverse proxy to an nginx origin (with an access log), a
file_server, the forward proxy (absolute-form HTTP, CONNECT, SOCKS5), a TCP stream listener, a
tcp2ws listener chained into a ws2tcp listener, and a tunnel server; a second ``twistd`` is the
tunnel client publishing the origin as ``soak.test``.  Every path ends at the same nginx origin
(or the same folder, for file_server), so each body is compared byte for byte with the file.

    SOAK_S=60 python -m bench.soak        # exit status 0 only with no error and growth < 5 %
"""

from __future__ import annotations

import asyncio
import gzip
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from .peers import Ctx, origin, ours
from .procs import Proc, free_port, raise_nofile

CONCURRENCY = 16
WARMUP = 0.10  # share of the run before the start RSS is taken
MAX_GROWTH = 5.0  # percent
JOB_TIMEOUT = 60.0
DOMAIN = "soak.test"

#: name → size; small files often, big ones rarely (weights), a text file for on-the-fly gzip.
FILES = {"empty.bin": 0, "tiny.bin": 100, "4k.bin": 4096, "64k.bin": 65_543, "300k.bin": 300_001,
         "1m.bin": 1_048_589, "4m.bin": 4 * 1_048_576 + 5, "text.txt": 200_000}
WEIGHTS = {"empty.bin": 2, "tiny.bin": 10, "4k.bin": 10, "64k.bin": 6, "300k.bin": 3, "1m.bin": 1,
           "4m.bin": 0.2, "text.txt": 3}
KINDS = {"reverse": 3, "files": 3, "forward": 2, "connect": 1, "socks5": 1, "stream": 1, "ws_chain": 1,
         "tunnel": 1}


def make_files(www: Path) -> dict[str, bytes]:
    rng = random.Random(20261125)
    out = {}
    for name, size in FILES.items():
        data = rng.randbytes(size // 2 + 1).hex().encode()[:size] if name.endswith(".txt") else rng.randbytes(size)
        (www / name).write_bytes(data)
        out[name] = data
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# ------------------------------------------------------------------------------------ HTTP client

class Bad(Exception):
    """An answer that is not what the origin holds."""


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise Bad(f"not an HTTP response: {lines[0][:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return status, headers, b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return status, headers, bytes(body)
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise Bad("chunk not followed by CRLF")
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    return status, headers, await reader.read()


@dataclass
class Load:
    """The shared state of the load generator."""

    ports: dict[str, int]
    files: dict[str, bytes]
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    stopping: bool = False

    def pick(self, rng: random.Random) -> str:
        return rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]

    def request(self, path: str, host: str, extra: str = "") -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: soak\r\n{extra}\r\n".encode()

    async def gets(self, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   rng: random.Random, target: Callable[[str], tuple[str, str]], n: int) -> None:
        """``n`` keep-alive GETs of random files, each body checked against the file."""
        for _ in range(n):
            name = self.pick(rng)
            path, host = target(name)
            writer.write(self.request(path, host))
            status, _h, body = await read_response(reader)
            self.check(kind, name, status, body)

    def check(self, kind: str, name: str, status: int, body: bytes, expect: bytes | None = None,
              want: int = 200) -> None:
        expect = self.files[name] if expect is None else expect
        if status != want:
            raise Bad(f"{name}: status {status}, expected {want}")
        if body != expect:
            raise Bad(f"{name}: {len(body)} bytes, expected {len(expect)} (or different bytes)")
        self.counts[kind] += 1
        self.bytes_in += len(body)

    # -- the kinds -------------------------------------------------------------------
    async def reverse(self, rng: random.Random) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", self.ports["reverse"])
        try:
            await self.gets("reverse", r, w, rng, lambda n: (f"/{n}", "soak"), rng.randint(1, 8))
        finally:
            await close(w)

    async def files_(self, rng: random.Random) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", self.ports["reverse"])
        try:
            for _ in range(rng.randint(1, 8)):
                name = self.pick(rng)
                data = self.files[name]
                roll = rng.random()
                if name == "text.txt" and roll < 0.5:
                    w.write(self.request(f"/files/{name}", "soak", "Accept-Encoding: gzip\r\n"))
                    status, h, body = await read_response(r)
                    if h.get("content-encoding") != "gzip":
                        raise Bad(f"{name}: not gzipped ({h.get('content-encoding')})")
                    self.check("files", name, status, gzip.decompress(body))
                elif len(data) > 10 and roll < 0.25:
                    a = rng.randrange(len(data) - 1)
                    b = rng.randrange(a, min(len(data), a + 100_000))
                    w.write(self.request(f"/files/{name}", "soak", f"Range: bytes={a}-{b}\r\n"))
                    status, _h, body = await read_response(r)
                    self.check("files", name, status, body, data[a:b + 1], want=206)
                else:
                    w.write(self.request(f"/files/{name}", "soak"))
                    status, _h, body = await read_response(r)
                    self.check("files", name, status, body)
        finally:
            await close(w)

    async def forward(self, rng: random.Random) -> None:
        o = self.ports["origin"]
        r, w = await asyncio.open_connection("127.0.0.1", self.ports["forward"])
        try:
            await self.gets("forward", r, w, rng, lambda n: (f"http://127.0.0.1:{o}/{n}", f"127.0.0.1:{o}"),
                            rng.randint(1, 8))
        finally:
            await close(w)

    async def connect(self, rng: random.Random) -> None:
        o = self.ports["origin"]
        r, w = await asyncio.open_connection("127.0.0.1", self.ports["forward"])
        try:
            w.write(f"CONNECT 127.0.0.1:{o} HTTP/1.1\r\nHost: 127.0.0.1:{o}\r\n\r\n".encode())
            head = await r.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise Bad(f"CONNECT answered {head[:40]!r}")
            await self.gets("connect", r, w, rng, lambda n: (f"/{n}", "origin"), rng.randint(1, 8))
        finally:
            await close(w)

    async def socks5(self, rng: random.Random) -> None:
        o = self.ports["origin"]
        r, w = await asyncio.open_connection("127.0.0.1", self.ports["forward"])
        try:
            w.write(b"\x05\x01\x00")
            if await r.readexactly(2) != b"\x05\x00":
                raise Bad("SOCKS5 greeting refused")
            w.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + o.to_bytes(2, "big"))
            reply = await r.readexactly(10)
            if reply[:2] != b"\x05\x00":
                raise Bad(f"SOCKS5 CONNECT answered {reply!r}")
            await self.gets("socks5", r, w, rng, lambda n: (f"/{n}", "origin"), rng.randint(1, 8))
        finally:
            await close(w)

    async def _plain(self, kind: str, port: str, host: str, rng: random.Random) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", self.ports[port])
        try:
            await self.gets(kind, r, w, rng, lambda n: (f"/{n}", host), rng.randint(1, 8))
        finally:
            await close(w)

    async def stream(self, rng: random.Random) -> None:
        await self._plain("stream", "stream", "origin", rng)

    async def ws_chain(self, rng: random.Random) -> None:
        await self._plain("ws_chain", "tcp2ws", "origin", rng)

    async def tunnel(self, rng: random.Random) -> None:
        await self._plain("tunnel", "map_http", DOMAIN, rng)

    # -- driving -----------------------------------------------------------------------
    async def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        jobs: dict[str, Callable[[random.Random], Awaitable[None]]] = {
            "reverse": self.reverse, "files": self.files_, "forward": self.forward, "connect": self.connect,
            "socks5": self.socks5, "stream": self.stream, "ws_chain": self.ws_chain, "tunnel": self.tunnel}
        names, weights = list(KINDS), list(KINDS.values())
        while not self.stopping:
            kind = rng.choices(names, weights)[0]
            try:
                await asyncio.wait_for(jobs[kind](rng), JOB_TIMEOUT)
            except (Bad, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                    ValueError) as e:
                self.errors[f"{kind}: {type(e).__name__}: {e}"[:200]] += 1


async def close(w: asyncio.StreamWriter) -> None:
    w.close()
    try:
        await w.wait_closed()
    except OSError:
        pass


async def wait_for_tunnel(port: int, seconds: float = 30.0) -> None:
    """Until the tunnel client has published DOMAIN (the origin answers through it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"GET /tiny.bin HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
            status, _h, _b = await read_response(r)
            await close(w)
            if status == 200:
                return
        except (OSError, asyncio.IncompleteReadError, Bad):
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the tunnel client did not publish {DOMAIN} within {seconds:.0f}s")


# ------------------------------------------------------------------------------------ the run

def main_config(p: dict[str, int], www: Path, work: Path) -> str:
    return f"""
[proxy]
bind = "127.0.0.1:{p['forward']}"
center_addr = "127.0.0.1:{p['center']}"
map_http_bind = "127.0.0.1:{p['map_http']}"
tokens = ["soak-token"]

[http]
access_log = "acc main"
[http.log_format]
main = "{{client_ip}} {{method}} {{url}} {{status}} {{body_bytes_sent}} {{request_time}} [{{request_completion}}]"
[http.log_names]
acc = "{work}/access.log info"

[[http.server]]
bind_addr = "127.0.0.1:{p['reverse']}"
[[http.server.location]]
rule = "/files/"
file_server = {{ root = "{www}", prefix = "/files" }}
[[http.server.location]]
proxy_url = "http://127.0.0.1:{p['origin']}"

[stream]
[[stream.server]]
bind_addr = "127.0.0.1:{p['stream']}"
proxy_url = "tcp://127.0.0.1:{p['origin']}"
[[stream.server]]
bind_addr = "127.0.0.1:{p['tcp2ws']}"
bind_mode = "tcp2ws"
proxy_url = "ws://127.0.0.1:{p['ws2tcp']}/soak"
[[stream.server]]
bind_addr = "127.0.0.1:{p['ws2tcp']}"
bind_mode = "ws2tcp"
proxy_url = "tcp://127.0.0.1:{p['origin']}"
path = "/soak"
"""


def client_config(p: dict[str, int]) -> str:
    return f"""
[proxy]
server = "127.0.0.1:{p['center']}"
token = "soak-token"
[[proxy.mappings]]
name = "origin"
mode = "http"
local_addr = "127.0.0.1:{p['origin']}"
domain = "{DOMAIN}"
"""


def log_problems(proc: Proc) -> list[str]:
    text = proc.log.read_text(errors="replace") if proc.log.exists() else ""
    return [line for line in text.splitlines() if "Traceback" in line or "Unhandled" in line or "[-] error" in line
            or "CRITICAL" in line]


async def soak(seconds: float, work: Path) -> int:
    www = work / "www"
    www.mkdir(parents=True)
    www.chmod(0o755)
    files = make_files(www)
    names = ("origin", "forward", "center", "map_http", "reverse", "stream", "tcp2ws", "ws2tcp")
    ports = {n: free_port() for n in names}
    ctx = Ctx(repo=Path(__file__).resolve().parents[1], work=work, quick=False, www=www,
              venv=Path(sys.executable).parent.parent)
    procs: list[Proc] = []
    try:
        procs.append(origin(ctx, ports["origin"]))
        main = ours(ctx, "wmproxy", main_config(ports, www, work),
                    tuple(ports[n] for n in names if n != "origin"))
        procs.append(main)
        client = ours(ctx, "tunnel-client", client_config(ports), ())
        procs.append(client)
        await wait_for_tunnel(ports["map_http"])
        assert main.popen is not None and client.popen is not None
        main_pid, client_pid = main.popen.pid, client.popen.pid

        load = Load(ports, files)
        print(f"soak: {seconds:.0f} s, {CONCURRENCY} concurrent clients, loopback only; "
              f"wmproxy pid {main_pid}, tunnel client pid {client_pid}, work dir {work}", flush=True)
        workers = [asyncio.create_task(load.worker(i)) for i in range(CONCURRENCY)]
        start = time.monotonic()
        step = max(5.0, seconds / 20)
        next_report, warm_at = step, seconds * WARMUP
        rss_start: dict[str, int] = {}
        last_total, last_t = 0, 0.0
        while True:
            now = time.monotonic() - start
            if now >= seconds:
                break
            if not rss_start and now >= warm_at:
                rss_start = {"main": rss_kib(main_pid), "client": rss_kib(client_pid)}
                print(f"  {now:6.0f}s  warm-up done: RSS wmproxy {rss_start['main'] / 1024:.1f} MiB, "
                      f"tunnel client {rss_start['client'] / 1024:.1f} MiB", flush=True)
            if now >= next_report:
                total = sum(load.counts.values())
                rate = (total - last_total) / max(now - last_t, 1e-9)
                print(f"  {now:6.0f}s  {total:8d} requests ({rate:6.0f}/s)  errors {sum(load.errors.values())}"
                      f"  RSS wmproxy {rss_kib(main_pid) / 1024:.1f} MiB  client {rss_kib(client_pid) / 1024:.1f} MiB",
                      flush=True)
                last_total, last_t = total, now
                next_report += step
            if not (main.alive() and client.alive()):
                load.errors["a wmproxy process died"] += 1
                break
            await asyncio.sleep(0.5)
        rss_end = {"main": rss_kib(main_pid), "client": rss_kib(client_pid)} if main.alive() and client.alive() else {}
        load.stopping = True
        _done, pending = await asyncio.wait(workers, timeout=JOB_TIMEOUT + 5)
        for t in pending:
            t.cancel()
            load.errors["a client job did not finish"] += 1
        elapsed = time.monotonic() - start
    finally:
        for p in reversed(procs):
            p.stop()
    for p in procs[1:]:
        for line in log_problems(p)[:5]:
            load.errors[f"{p.name} log: {line[:160]}"] += 1

    total = sum(load.counts.values())
    print(f"\nsoak finished after {elapsed:.0f} s: {total} requests ({total / elapsed:.0f}/s), "
          f"{load.bytes_in / 1e9:.2f} GB of checked bodies")
    print("requests per kind:")
    for kind in KINDS:
        print(f"  {kind:10s} {load.counts[kind]:9d}")
    nerr = sum(load.errors.values())
    print(f"errors: {nerr}")
    for msg, n in load.errors.most_common(10):
        print(f"  {n:5d} × {msg}")
    ok = nerr == 0
    for key, label in (("main", "wmproxy (all features)"), ("client", "tunnel client")):
        if not rss_start or not rss_end:
            print(f"RSS {label}: not measured (run too short or process gone)")
            ok = False
            continue
        a, b = rss_start[key], rss_end[key]
        growth = (b - a) * 100.0 / a
        print(f"RSS {label}: start {a / 1024:.1f} MiB (after {warm_at:.0f} s warm-up), end {b / 1024:.1f} MiB, "
              f"growth {growth:+.2f}%")
        if growth >= MAX_GROWTH:
            ok = False
    print(f"result: {'PASS' if ok else 'FAIL'} (errors must be 0, RSS growth under {MAX_GROWTH:g}%)")
    return 0 if ok else 1


def main() -> int:
    seconds = float(os.environ.get("SOAK_S", "600"))
    raise_nofile(20000)
    work = Path(tempfile.mkdtemp(prefix="wmproxy-soak-"))
    work.chmod(0o755)
    code = 1
    try:
        code = asyncio.run(soak(seconds, work))
        return code
    finally:
        if code == 0:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"(logs kept in {work})")


if __name__ == "__main__":
    sys.exit(main())
