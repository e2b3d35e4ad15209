"""tcp2ws / tcp2wss / ws2tcp on real loopback sockets (SPEC §7), with websockify and websockets."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import protocol, reactor

from ..helpers import Running, bound_port, deferLater, run_python, spawn, start_proxy
from .test_stream import ROUND_TRIP, _open_clients, _stop, echo

pytestmark = pytest.mark.integration


class WsEcho(WebSocketServerProtocol):
    """A plain autobahn echo server (not our code): every message back as it came."""

    def onConnect(self, request: Any) -> None:
        self.factory.requests.append(request)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


def ws_echo_server(tls: Any = None) -> tuple[Any, Any]:
    f = WebSocketServerFactory(reactor=reactor)
    f.protocol = WsEcho
    f.requests = []
    f.noisy = False
    f.setProtocolOptions(maxFramePayloadSize=0, maxMessagePayloadSize=0)
    if tls is not None:
        return reactor.listenSSL(0, f, tls, interface="127.0.0.1"), f
    return reactor.listenTCP(0, f, interface="127.0.0.1"), f


async def _ws_chain(extra_tcp2ws: str = "", extra_ws2tcp: str = "") -> tuple[Any, Any, int]:
    """TCP client → tcp2ws → ws2tcp → TCP echo; returns (service, echo port, tcp2ws port)."""
    up = echo()
    back = await start_proxy(f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "ws2tcp"\n'
                             f'proxy_url = "tcp://127.0.0.1:{up.getHost().port}"\n{extra_ws2tcp}\n')
    front = await start_proxy(f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "tcp2ws"\n'
                              f'proxy_url = "ws://127.0.0.1:{bound_port(back)}/"\n{extra_tcp2ws}\n')
    return (front, back), up, bound_port(front)


@pytest_twisted.ensureDeferred
async def test_seed_article_configs_end_to_end() -> None:
    """The article's tcp2ws (to a WebSocket echo) and ws2tcp (to a TCP echo) configs work, ports aside."""
    wsport, wsf = ws_echo_server()
    tcp_up = echo()
    text = textwrap.dedent(f"""
        [stream]
        [[stream.server]]
        bind_addr = "127.0.0.1:0"
        proxy_url = "ws://127.0.0.1:{wsport.getHost().port}/"
        bind_mode = "tcp2ws"

        [[stream.server]]
        bind_addr = "127.0.0.1:0"
        up_name = "ws1"
        proxy_url = "tcp://127.0.0.1:{tcp_up.getHost().port}"
        bind_mode = "ws2tcp"
    """)
    svc = await start_proxy(text)
    try:
        clients = await _open_clients(bound_port(svc, index=0), [b"through tcp2ws"])
        clients[0].transport.write(b"through tcp2ws")
        assert await clients[0].done == b"through tcp2ws"
        assert wsf.requests[0].path == "/" and wsf.requests[0].protocols == []
        script = textwrap.dedent(f"""
            import asyncio, websockets
            async def main():
                async with websockets.connect("ws://127.0.0.1:{bound_port(svc, index=1)}/") as ws:
                    await ws.send(b"through ws2tcp")
                    print((await ws.recv()).decode(), ws.subprotocol)
            asyncio.run(main())
        """)
        out, err, code = await run_python("-c", script)
        assert code == 0, err
        assert out.split() == [b"through", b"ws2tcp", b"None"]
    finally:
        await _stop(svc, wsport, tcp_up)


@pytest_twisted.ensureDeferred
async def test_chain_100mb_byte_identical() -> None:
    """100 MB through TCP → tcp2ws → ws2tcp → echo and back arrive byte-identical."""
    svcs, up, port = await _ws_chain()
    try:
        n = 100 * 1024 * 1024
        out, err, code = await run_python("-c", ROUND_TRIP, str(port), str(n), "noshut")
        assert code == 0, err
        assert out.split() == [str(n).encode(), b"True"]
    finally:
        await _stop(*svcs, up)


@pytest_twisted.ensureDeferred
async def test_tcp2ws_host_path_and_domain() -> None:
    """tcp2ws keeps the URL's path and query, and sends domain as the Host header."""
    wsport, wsf = ws_echo_server()
    svc = await start_proxy(f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "tcp2ws"\n'
                            f'proxy_url = "ws://127.0.0.1:{wsport.getHost().port}/tunnel/a?k=v"\n'
                            'domain = "wmproxy.com"\n')
    try:
        clients = await _open_clients(bound_port(svc), [b"x"])
        clients[0].transport.write(b"x")
        assert await clients[0].done == b"x"
        req = wsf.requests[0]
        assert req.path == "/tunnel/a" and req.params == {"k": ["v"]}
        assert req.headers["host"] == f"wmproxy.com:{wsport.getHost().port}"
    finally:
        await _stop(svc, wsport)


@pytest_twisted.ensureDeferred
async def test_tcp2wss_verifies_the_server(tmp_path: Path) -> None:
    """wss with the right CA and name works; an unknown CA is refused (TCP client closed)."""
    from twisted.internet import ssl

    from ..tlsutil import make_cert

    cert, key = make_cert(tmp_path, "wmproxy.test")
    pem = ssl.PrivateCertificate.loadPEM(Path(cert).read_text() + Path(key).read_text())
    wsport, _wsf = ws_echo_server(pem.options())
    base = (f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "tcp2wss"\n'
            f'proxy_url = "ws://127.0.0.1:{wsport.getHost().port}/"\ndomain = "wmproxy.test"\n')
    good = await start_proxy(base + f'proxy_ssl_ca = "{cert}"\n')
    bad = await start_proxy(base)
    try:
        clients = await _open_clients(bound_port(good), [b"secret"])
        clients[0].transport.write(b"secret")
        assert await clients[0].done == b"secret"
        clients = await _open_clients(bound_port(bad), [b"secret"])
        clients[0].transport.write(b"secret")
        assert await clients[0].done == b""
    finally:
        await _stop(good, bad, wsport)


WEBSOCKETS_CLIENT = textwrap.dedent("""
    import asyncio, json, sys, websockets
    async def main():
        url, protos = sys.argv[1], sys.argv[2:] or None
        try:
            async with websockets.connect(url, subprotocols=protos, max_size=None) as ws:
                await ws.send(b"\\x00\\x01binary\\xff")
                got = await ws.recv()
                await ws.send("text goes as bytes")
                got2 = await ws.recv()
                print(json.dumps([ws.subprotocol, got.hex(), got2.hex()]))
        except websockets.exceptions.InvalidStatus as e:
            print(json.dumps(["status", e.response.status_code]))
    asyncio.run(main())
""")


@pytest_twisted.ensureDeferred
async def test_ws2tcp_websockify_binary_subprotocol_and_plain_clients() -> None:
    """A websockets client offering 'binary' gets it selected; one offering nothing gets none."""
    up = echo()
    svc = await start_proxy(f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "ws2tcp"\n'
                            f'proxy_url = "127.0.0.1:{up.getHost().port}"\n')
    url = f"ws://127.0.0.1:{bound_port(svc)}/"
    try:
        out, err, code = await run_python("-c", WEBSOCKETS_CLIENT, url, "binary")
        assert code == 0, err
        assert json.loads(out) == ["binary", b"\x00\x01binary\xff".hex(), b"text goes as bytes".hex()]
        out, err, code = await run_python("-c", WEBSOCKETS_CLIENT, url)
        assert code == 0, err
        assert json.loads(out)[0] is None
        out, err, code = await run_python("-c", WEBSOCKETS_CLIENT, url, "chat", "superchat")
        assert code != 0 or json.loads(out)[0] is None  # never a protocol the client did not offer
    finally:
        await _stop(svc, up)


@pytest_twisted.ensureDeferred
async def test_ws2tcp_path_domain_and_upstream_errors() -> None:
    """Wrong path → 404, wrong Host or deny_ip → 403, an unreachable upstream → 502, all in the handshake."""
    up = echo()
    svc = await start_proxy(f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "ws2tcp"\n'
                            f'proxy_url = "127.0.0.1:{up.getHost().port}"\npath = "/ws"\ndomain = "localhost"\n'
                            '[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "ws2tcp"\n'
                            'proxy_url = "127.0.0.1:1"\n'
                            '[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "ws2tcp"\n'
                            'proxy_url = "127.0.0.1:1"\ndeny_ip = "127.0.0.1"\n')
    p0, p1, p2 = (bound_port(svc, index=i) for i in range(3))
    try:
        out, _e, _c = await run_python("-c", WEBSOCKETS_CLIENT, f"ws://localhost:{p0}/nope")
        assert json.loads(out) == ["status", 404]
        out, _e, _c = await run_python("-c", WEBSOCKETS_CLIENT, f"ws://127.0.0.1:{p0}/ws")
        assert json.loads(out) == ["status", 403]
        out, err, code = await run_python("-c", WEBSOCKETS_CLIENT, f"ws://localhost:{p0}/ws")
        assert code == 0 and json.loads(out)[0] is None, err
        out, _e, _c = await run_python("-c", WEBSOCKETS_CLIENT, f"ws://127.0.0.1:{p1}/")
        assert json.loads(out) == ["status", 502]
        out, _e, _c = await run_python("-c", WEBSOCKETS_CLIENT, f"ws://127.0.0.1:{p2}/")
        assert json.loads(out) == ["status", 403]
    finally:
        await _stop(svc, up)


async def _websockify(listen_port: int, target_port: int) -> tuple[Any, Running]:
    """websockify (the Debian package's program) as a WebSocket → TCP server."""
    exe = shutil.which("websockify")
    assert exe, "websockify is not installed (make test-deps)"
    proc = spawn([exe, f"127.0.0.1:{listen_port}", f"127.0.0.1:{target_port}"])
    transport = proc.transport
    for _ in range(200):
        if b"proxying from" in (proc.out + proc.err).lower():
            break
        await deferLater(0.02)
    return transport, proc


@pytest_twisted.ensureDeferred
async def test_tcp2ws_talks_to_websockify_server() -> None:
    """Our tcp2ws in front of websockify (as the WebSocket server) relays 5 MB both ways."""
    from .test_twistd import free_port

    up = echo()
    ws_port = free_port()
    transport, proc = await _websockify(ws_port, up.getHost().port)
    svc = await start_proxy(f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "tcp2ws"\n'
                            f'proxy_url = "ws://127.0.0.1:{ws_port}/"\n')
    try:
        n = 5 * 1024 * 1024
        out, err, code = await run_python("-c", ROUND_TRIP, str(bound_port(svc)), str(n), "noshut")
        assert code == 0, err
        assert out.split() == [str(n).encode(), b"True"], (proc.out + proc.err)[-2000:]
    finally:
        transport.signalProcess("TERM")
        await proc.ended
        await _stop(svc, up)


@pytest_twisted.ensureDeferred
async def test_websockify_own_client_through_ws2tcp() -> None:
    """websockify's own WebSocket client class (binary subprotocol) talks through our ws2tcp.

    websockify 0.10's client builds its frame mask with ``bytes += int`` (a
    TypeError on Python 3); the script mends that one line and uses the rest
    (handshake, subprotocol check, framing) as shipped.
    """
    up = echo()
    svc = await start_proxy(f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "ws2tcp"\n'
                            f'proxy_url = "127.0.0.1:{up.getHost().port}"\n')
    script = textwrap.dedent(f"""
        import os, select
        from websockify import websocket

        class WebSocket(websocket.WebSocket):
            def _sendmsg(self, opcode, msg):
                return self._send(self._encode_hybi(opcode, msg, os.urandom(4)))

        ws = WebSocket()
        ws.connect("ws://127.0.0.1:{bound_port(svc)}/", protocols=["binary"])
        ws.sendmsg(b"from websockify")
        got = None
        while got is None:
            select.select([ws], [], [], 5)
            got = ws.recvmsg()
        print(ws.protocol, got.decode())
        ws.shutdown(1000)
    """)
    try:
        out, err, code = await _system_python(script)
        assert code == 0, err
        assert out.split() == [b"binary", b"from", b"websockify"]
    finally:
        await _stop(svc, up)


async def _system_python(script: str) -> tuple[bytes, bytes, int]:
    from ..helpers import run

    return await run("/usr/bin/python3", "-c", script)



RAW_WS = textwrap.dedent("""
    # argv: port mode — a raw RFC 6455 client: "big" announces a 100 MB frame and sends
    # what it can; "stall" completes the handshake and then never reads.
    import base64, os, socket, struct, sys
    port, mode = int(sys.argv[1]), sys.argv[2]
    s = socket.socket()
    if mode == "stall":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port)); s.settimeout(10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(("GET / HTTP/1.1\\r\\nHost: x\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
               f"Sec-WebSocket-Key: {key}\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n").encode())
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        head += s.recv(1)
    assert b" 101 " in head.split(b"\\r\\n")[0], head
    if mode == "stall":
        sys.stdin.read()  # hold the connection, reading nothing, until told to stop
        sys.exit(0)
    n = 100 * 1024 * 1024
    s.sendall(bytes([0x82, 0x80 | 127]) + struct.pack("!Q", n) + b"\\0\\0\\0\\0")
    chunk = b"\\0" * 65536
    try:
        for _ in range(n // len(chunk)):
            s.sendall(chunk)
    except OSError:
        pass
    buf = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            buf += d
            if len(buf) >= 4 and buf[0] & 0x0F == 8:
                break
    except OSError:
        pass
    # the first frame the server sent must be its close frame
    assert buf[0] == 0x88, buf[:16]
    print(struct.unpack("!H", buf[2:4])[0])
""")


@pytest_twisted.ensureDeferred
async def test_oversized_frame_is_closed_with_1009() -> None:
    """A peer announcing and sending a 100 MB frame (limit 1 MiB) gets close code 1009."""
    up = echo()
    svc = await start_proxy(f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "ws2tcp"\n'
                            f'proxy_url = "127.0.0.1:{up.getHost().port}"\nmax_message_size = "1m"\n')
    try:
        out, err, code = await run_python("-c", RAW_WS, str(bound_port(svc)), "big")
        assert code == 0, err
        assert out.strip() == b"1009"
    finally:
        await _stop(svc, up)


class Firehose(protocol.Protocol):
    """Writes as fast as its transport lets it (a streaming producer); counts what it wrote."""

    produced = 0

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.paused = False
        self._pump()

    def _pump(self) -> None:
        while not self.paused and self.transport is not None and self.connected:
            Firehose.produced += 65536
            self.transport.write(b"x" * 65536)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self.paused = True


async def _assert_production_stops() -> None:
    """The firehose wrote something, then (within a second) stopped: it is paused, memory is bounded."""
    await deferLater(1.0)
    first = Firehose.produced
    await deferLater(1.0)
    second = Firehose.produced
    assert first > 0
    # kernel buffers of both sockets plus one transport buffer of each side, nothing more
    assert second - first <= 256 * 1024, (first, second)
    assert second < 32 * 1024 * 1024, second


@pytest_twisted.ensureDeferred
async def test_websocket_peer_that_stops_reading_pauses_tcp() -> None:
    """A WebSocket client that never reads stops the TCP upstream: what it produced stays bounded."""
    Firehose.produced = 0
    f = protocol.Factory.forProtocol(Firehose)
    f.noisy = False
    hose = reactor.listenTCP(0, f, interface="127.0.0.1")
    svc = await start_proxy(f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "ws2tcp"\n'
                            f'proxy_url = "127.0.0.1:{hose.getHost().port}"\n')
    holder = spawn([sys.executable, "-c", RAW_WS, str(bound_port(svc)), "stall"])
    proc = holder.transport
    try:
        await _assert_production_stops()
    finally:
        proc.closeStdin()
        await holder.ended
        await _stop(svc, hose)


class StalledWs(WebSocketServerProtocol):
    """A WebSocket server that reads nothing once open."""

    def onOpen(self) -> None:
        self.transport.pauseProducing()


@pytest_twisted.ensureDeferred
async def test_tcp2ws_pauses_tcp_client_when_websocket_server_stops_reading() -> None:
    """tcp2ws towards a WebSocket server that stops reading: the TCP client is paused, memory bounded."""
    wsf = WebSocketServerFactory(reactor=reactor)
    wsf.protocol = StalledWs
    wsf.noisy = False
    wsport = reactor.listenTCP(0, wsf, interface="127.0.0.1")
    svc = await start_proxy(f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "tcp2ws"\n'
                            f'proxy_url = "ws://127.0.0.1:{wsport.getHost().port}/"\n')
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    Firehose.produced = 0
    client = Firehose()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", bound_port(svc)), client)
    try:
        await _assert_production_stops()
    finally:
        client.transport.abortConnection()
        await _stop(svc, wsport)


@pytest_twisted.ensureDeferred
async def test_twistd_ws_proxy_quick_mode() -> None:
    """`twistd -n wmproxy ws-proxy --mode ws2tcp -b ADDR -t HOST:PORT` serves a WebSocket client."""
    from .test_twistd import TWISTD, free_port

    up = echo()
    port = free_port()

    argv = [TWISTD, "-n", "--pidfile=", "wmproxy", "ws-proxy", "--mode", "ws2tcp",
            "-b", f"127.0.0.1:{port}", "-t", f"127.0.0.1:{up.getHost().port}", "--no-control"]
    proc = spawn(argv)
    transport = proc.transport
    try:
        for _ in range(300):
            if b"listening on" in proc.out + proc.err:
                break
            await deferLater(0.02)
        out, err, code = await run_python("-c", WEBSOCKETS_CLIENT, f"ws://127.0.0.1:{port}/", "binary")
        assert code == 0, err + proc.out + proc.err
        assert json.loads(out)[0] == "binary"
    finally:
        transport.signalProcess("TERM")
        await proc.ended
        await _stop(up)


class BigSender(WebSocketServerProtocol):
    """Sends one 2 MiB message once open; records the close code it gets."""

    def onOpen(self) -> None:
        self.sendMessage(b"z" * (2 * 1024 * 1024), isBinary=True)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.closed.callback(self.remoteCloseCode)


@pytest_twisted.ensureDeferred
async def test_tcp2ws_closes_an_oversized_message_with_1009() -> None:
    """tcp2ws (limit 1 MiB) answers a 2 MiB message from the server with close 1009 and closes TCP."""
    from twisted.internet.defer import Deferred

    wsf = WebSocketServerFactory(reactor=reactor)
    wsf.protocol = BigSender
    wsf.noisy = False
    wsf.closed = Deferred()
    wsport = reactor.listenTCP(0, wsf, interface="127.0.0.1")
    svc = await start_proxy(f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "tcp2ws"\n'
                            f'proxy_url = "ws://127.0.0.1:{wsport.getHost().port}/"\nmax_message_size = "1m"\n')
    try:
        clients = await _open_clients(bound_port(svc), [b"x"])
        assert await wsf.closed == 1009
        assert await clients[0].done == b""
    finally:
        await _stop(svc, wsport)
