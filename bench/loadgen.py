"""Small load generators the stock tools lack (run as a subprocess, prints JSON).

``rate``: requests/s where every request is a new connection through a proxy:
HTTP CONNECT or SOCKS5 CONNECT (or direct), then ``GET PATH HTTP/1.0`` to the
origin, read to EOF.  ``idle``: open N connections, use each once (so the
relay or keep-alive state is real), report, hold them until stdin closes.

    python -m bench.loadgen rate --mode connect --port P --target 127.0.0.1:O -c 16 -d 5
    python -m bench.loadgen idle --mode http --port P -n 10000
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import resource
import sys
import time


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def handshake(mode: str, target: tuple[str, int]) -> bytes:
    host, port = target
    if mode == "connect":
        return f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    if mode == "socks5":
        return b"\x05\x01\x00"
    return b""


def socks5_request(target: tuple[str, int]) -> bytes:
    host, port = target
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()
        return b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big")
    kind = b"\x01" if ip.version == 4 else b"\x04"
    return b"\x05\x01\x00" + kind + ip.packed + port.to_bytes(2, "big")


def socks5_reply_len(buf: bytes) -> int | None:
    """Length of a complete SOCKS5 CONNECT reply at the start of buf, None if incomplete."""
    if len(buf) < 5:
        return None
    atyp = buf[3]
    n = {1: 4 + 4 + 2, 4: 4 + 16 + 2, 3: 4 + 1 + buf[4] + 2}.get(atyp)
    if n is None:
        raise ValueError(f"bad SOCKS5 reply {buf[:10]!r}")
    return n if len(buf) >= n else None


class Op(asyncio.Protocol):
    """One request over one new connection; the steps depend on the mode."""

    def __init__(self, mode: str, target: tuple[str, int], request: bytes, keep: bool,
                 done: asyncio.Future[bool]) -> None:
        self.mode, self.target, self.request, self.keep, self.done = mode, target, request, keep, done
        self.buf = bytearray()
        self.state = "greet" if mode == "socks5" else ("connect" if mode == "connect" else "response")
        self.transport: asyncio.Transport | None = None
        self.body_left: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        first = handshake(self.mode, self.target)
        self.transport.write(first if first else self.request)

    def _fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(why))
        if self.transport:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        t = self.transport
        assert t is not None
        if self.state == "greet":
            if len(self.buf) < 2:
                return
            if bytes(self.buf[:2]) != b"\x05\x00":
                return self._fail(f"SOCKS5 greeting refused: {bytes(self.buf[:2])!r}")
            del self.buf[:2]
            self.state = "socks"
            t.write(socks5_request(self.target))
        if self.state == "socks":
            n = socks5_reply_len(bytes(self.buf))
            if n is None:
                return
            if self.buf[1] != 0:
                return self._fail(f"SOCKS5 CONNECT failed: code {self.buf[1]}")
            del self.buf[:n]
            self.state = "response"
            t.write(self.request)
            return
        if self.state == "connect":
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buf.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                return self._fail(f"CONNECT refused: {bytes(self.buf[:40])!r}")
            del self.buf[:end + 4]
            self.state = "response"
            t.write(self.request)
            return
        if self.state == "response":
            if self.keep:
                self._keepalive_progress()
            elif len(self.buf) > 64:
                del self.buf[64:]  # the status line is all we check; don't keep bodies

    def _keepalive_progress(self) -> None:
        if self.body_left is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            if not head.startswith(b"http/1.1 200"):
                return self._fail(f"bad response: {bytes(self.buf[:40])!r}")
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            self.body_left = length - (len(self.buf) - end - 4)
            self.buf.clear()
        else:
            self.body_left -= len(self.buf)
            self.buf.clear()
        if self.body_left <= 0 and not self.done.done():
            self.state = "idle"
            self.done.set_result(True)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self.state == "response" and not self.keep and self.buf.startswith(b"HTTP/1.") and b" 200 " in self.buf[:16]:
            self.done.set_result(True)
        else:
            self.done.set_exception(RuntimeError(f"closed in state {self.state}: {bytes(self.buf[:60])!r} {exc or ''}"))


def _request(path: str, host: str, keep: bool) -> bytes:
    if keep:
        return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    return f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()


async def one(loop: asyncio.AbstractEventLoop, args: argparse.Namespace, target: tuple[str, int], keep: bool,
              ) -> tuple[asyncio.BaseTransport, Op]:
    done: asyncio.Future[bool] = loop.create_future()
    req = _request(args.path, args.host or f"{target[0]}:{target[1]}", keep)
    transport, proto = await loop.create_connection(lambda: Op(args.mode, target, req, keep, done),
                                                    "127.0.0.1", args.port)
    await asyncio.wait_for(done, args.timeout)
    return transport, proto


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def rate(args: argparse.Namespace) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    target = _target(args.target)
    stop_at = time.monotonic() + args.duration
    counts = {"ops": 0, "errors": 0}
    first_error: list[str] = []

    async def worker() -> None:
        while time.monotonic() < stop_at:
            try:
                t, _ = await one(loop, args, target, keep=False)
                t.close()
                counts["ops"] += 1
            except (TimeoutError, OSError, RuntimeError) as e:
                counts["errors"] += 1
                if not first_error:
                    first_error.append(f"{type(e).__name__}: {e}")
                if counts["errors"] > 1000 and counts["errors"] > counts["ops"]:
                    return

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    secs = time.monotonic() - t0
    out: dict[str, object] = {"ops": counts["ops"], "errors": counts["errors"], "secs": secs,
                              "rps": counts["ops"] / secs}
    if first_error:
        out["first_error"] = first_error[0]
    return out  # type: ignore[return-value]


async def idle(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    target = _target(args.target) if args.target else ("127.0.0.1", args.port)
    held: list[asyncio.BaseTransport] = []
    errors = 0
    first_error = ""
    sem = asyncio.Semaphore(args.concurrency)

    async def open_one() -> None:
        nonlocal errors, first_error
        async with sem:
            try:
                t, _ = await one(loop, args, target, keep=True)
                held.append(t)
            except (TimeoutError, OSError, RuntimeError) as e:
                errors += 1
                first_error = first_error or f"{type(e).__name__}: {e}"

    t0 = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(args.count)))
    report = {"open": len(held), "errors": errors, "secs": time.monotonic() - t0}
    if first_error:
        report["first_error"] = first_error
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    await loop.run_in_executor(None, sys.stdin.read)
    for t in held:
        t.abort()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen")
    ap.add_argument("what", choices=["rate", "idle"])
    ap.add_argument("--mode", choices=["connect", "socks5", "http", "direct"], default="direct")
    ap.add_argument("--port", type=int, required=True, help="where to connect (the proxy, or the server)")
    ap.add_argument("--target", default="", help="host:port the proxy should reach (connect/socks5)")
    ap.add_argument("--path", default="/1k")
    ap.add_argument("--host", default="", help="Host header (default: the target)")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("-d", "--duration", type=float, default=5.0)
    ap.add_argument("-n", "--count", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args(argv)
    if args.mode == "http":
        args.mode = "direct"
    _raise_nofile()
    if args.what == "rate":
        sys.stdout.write(json.dumps(asyncio.run(rate(args))) + "\n")
    else:
        asyncio.run(idle(args))


if __name__ == "__main__":
    main()
