"""`twistd wmproxy` as an operator runs it: exit codes, one-line errors, daemon mode."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from ..helpers import ENV, TWISTD, Running, deferLater, free_port, http_call, origin, run, spawn, wait_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


async def twistd(*args: str) -> tuple[bytes, bytes, int]:
    return await run(TWISTD, *args)


def _write(tmp_path: Path, text: str, name: str = "conf.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest_twisted.ensureDeferred
async def test_bad_value_exits_1_with_one_line(tmp_path: Path) -> None:
    """bind = "nonsense" → exit 1, one line naming proxy.bind, no traceback."""
    out, err, code = await twistd("-n", "--pidfile=", "wmproxy", "-c", _write(tmp_path, '[proxy]\nbind = "nonsense"\n'))
    assert code == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "proxy.bind" in lines[0] and "nonsense" in lines[0]
    assert b"Traceback" not in out + err


@pytest_twisted.ensureDeferred
async def test_typo_warns_with_nearest_name(tmp_path: Path) -> None:
    """bind_adr is warned about, naming bind_addr; --check still exits 0."""
    path = _write(tmp_path, '[proxy]\nbind = "127.0.0.1:18090"\nbind_adr = ":1"\n')
    out, err, code = await twistd("wmproxy", "--check", "-c", path)
    assert code == 0, err
    assert b"bind_adr" in err and b"bind_addr" in err
    assert b"forward proxy" in out and b"127.0.0.1:18090" in out


@pytest_twisted.ensureDeferred
async def test_missing_file_and_open_proxy_refused(tmp_path: Path) -> None:
    """An unreadable file and an unauthenticated non-loopback bind both exit 1 with one line."""
    _o, err, code = await twistd("wmproxy", "--check", "-c", str(tmp_path / "nope.toml"))
    assert code == 1 and b"cannot read" in err and b"Traceback" not in err
    path = _write(tmp_path, '[proxy]\nbind = "0.0.0.0:18091"\n')
    _o, err, code = await twistd("wmproxy", "--check", "-c", path)
    assert code == 1 and b"allow_open_proxy" in err and len(err.strip().splitlines()) == 1


@pytest_twisted.ensureDeferred
async def test_unsupported_section_is_refused(tmp_path: Path) -> None:
    """[fleet] with worker processes (not served yet) is refused at start-up, never silently ignored."""
    path = _write(tmp_path, 'workers = 2\n[proxy]\nbind = "127.0.0.1:0"\n[fleet]\nredis = "redis://127.0.0.1:6379/0"\n')
    _o, err, code = await twistd("wmproxy", "--check", "-c", path)
    assert code == 1 and b"not supported yet: [fleet] with workers > 1" in err
    path = _write(tmp_path, 'workers = 2\n[proxy]\ncenter_addr = "127.0.0.1:18092"\ntoken = "t"\n')
    _o, err, code = await twistd("wmproxy", "--check", "-c", path)
    assert code == 1 and b"a tunnel server or client (proxy.center_addr / proxy.server) with workers > 1" in err


@pytest_twisted.ensureDeferred
async def test_port_in_use_exits_1(tmp_path: Path) -> None:
    """A port already in use → exit 1 with 'cannot listen', no traceback."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        path = _write(tmp_path, f'disable_control = true\n[proxy]\nbind = "127.0.0.1:{port}"\n')
        out, err, code = await twistd("-n", "--pidfile=", "wmproxy", "-c", path)
        assert code == 1
        assert b"cannot listen" in err and b"Traceback" not in out + err
    finally:
        blocker.close()


@pytest_twisted.ensureDeferred
async def test_proxy_subcommand_serves_in_foreground(tmp_path: Path) -> None:
    """`twistd -n wmproxy proxy -b ADDR --user --pass` serves; SIGTERM stops it cleanly."""
    port = free_port()
    web = origin()
    proc = Running()
    reactor.spawnProcess(proc, TWISTD, [TWISTD, "-n", "--pidfile=", "wmproxy", "proxy", "-b", f"127.0.0.1:{port}",
                                        "--user", "u", "--pass", "p", "--no-control"], env=ENV, path=str(tmp_path))
    try:
        await wait_port(port)
        url = f"http://127.0.0.1:{web.getHost().port}/sub"
        out, err, code = await run("curl", "-sS", "-x", f"http://u:p@127.0.0.1:{port}", url)
        assert code == 0 and b"/sub" in out, err
        out, _e, _c = await run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{port}", url)
        assert out == b"407"
    finally:
        code = await proc.stop()
        await web.stopListening()
    assert code == 0, proc.err  # a graceful stop exits 0 (twistd does not re-raise SIGTERM)
    assert b"Traceback" not in proc.err


@pytest_twisted.ensureDeferred
async def test_daemon_mode_writes_pidfile(tmp_path: Path) -> None:
    """Without -n, twistd daemonizes: the pidfile names a live process that serves."""
    port = free_port()
    path = _write(tmp_path, f'disable_control = true\n[proxy]\nbind = "127.0.0.1:{port}"\n')
    pidfile = tmp_path / "w.pid"
    _o, err, code = await twistd(f"--pidfile={pidfile}", f"--logfile={tmp_path / 'w.log'}", "wmproxy", "-c", path)
    assert code == 0, err
    pid = int(pidfile.read_text())
    try:
        await wait_port(port)
        web = origin()
        out, err, code = await run("curl", "-sS", "-x", f"socks5h://127.0.0.1:{port}",
                                   f"http://127.0.0.1:{web.getHost().port}/daemon")
        await web.stopListening()
        assert code == 0 and b"/daemon" in out, err
    finally:
        os.kill(pid, 15)
    for _ in range(100):
        if not pidfile.exists():
            break
        await deferLater(0.1)
    assert not pidfile.exists()


@pytest_twisted.ensureDeferred
async def test_file_server_subcommand(tmp_path: Path) -> None:
    """`twistd -n wmproxy file-server -b ADDR -r ROOT --browse` serves files and listings; bad root → exit 1."""
    root = tmp_path / "www"
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello from disk\n")
    port = free_port()
    out, err, code = await twistd("wmproxy", "--check", "file-server", "-b", f"127.0.0.1:{port}", "-r", str(root))
    assert code == 0 and f"reverse proxy (http) on 127.0.0.1:{port}".encode() in out, err
    out, err, code = await twistd("wmproxy", "--check", "file-server", "-r", str(tmp_path / "nope"))
    assert code != 0 and b"is not a folder" in out + err
    proc = spawn([TWISTD, "-n", "--pidfile=", "wmproxy", "file-server", "-b", f"127.0.0.1:{port}",
                  "-r", str(root), "--browse", "--no-control"], cwd=tmp_path)
    try:
        await wait_port(port)
        out, err, code = await run("curl", "-sS", f"http://127.0.0.1:{port}/hello.txt")
        assert code == 0 and out == b"hello from disk\n", err
        out, err, code = await run("curl", "-sS", f"http://127.0.0.1:{port}/")
        assert code == 0 and b"hello.txt" in out and b"sub/" in out, err
        out, _e, _c = await run("curl", "-s", "--path-as-is", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://127.0.0.1:{port}/../../etc/passwd")
        assert out == b"400"
    finally:
        code = await proc.stop()
    assert code == 0, proc.err
    assert b"Traceback" not in proc.err


@pytest_twisted.ensureDeferred
async def test_quick_subcommands_place_or_drop_the_control_api(tmp_path: Path) -> None:
    """Two quick sub-commands run side by side: one with --control on a free port, one with --no-control."""
    (tmp_path / "a.txt").write_bytes(b"a\n")
    files, control, proxy = free_port(), free_port(), free_port()
    out, err, code = await twistd("wmproxy", "--check", "file-server", "-r", str(tmp_path),
                                  "--control", "127.0.0.1:1", "--no-control")
    assert code != 0 and b"--control and --no-control exclude each other" in out + err
    first = spawn([TWISTD, "-n", "--pidfile=", "wmproxy", "file-server", "-b", f"127.0.0.1:{files}",
                   "-r", str(tmp_path), "--control", f"127.0.0.1:{control}"], cwd=tmp_path)
    second = spawn([TWISTD, "-n", "--pidfile=", "wmproxy", "proxy", "-b", f"127.0.0.1:{proxy}",
                    "--no-control"], cwd=tmp_path)
    try:
        await wait_port(files)
        await wait_port(control)
        await wait_port(proxy)
        code, body = await http_call("GET", f"http://127.0.0.1:{control}/status")
        assert code == 200 and f"127.0.0.1:{files}".encode() in body, body
        out, err, code = await run("curl", "-sS", "-x", f"http://127.0.0.1:{proxy}", f"http://127.0.0.1:{files}/a.txt")
        assert code == 0 and out == b"a\n", err
    finally:
        codes = [await first.stop(), await second.stop()]
    assert codes == [0, 0], first.err + second.err
    assert f"control API listening on 127.0.0.1:{control}".encode() in first.out + first.err
    assert b"control API listening" not in second.out + second.err
