"""[stream] servers resolved at start-up: targets, plan lines, refusals; the ws-proxy quick mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from wmproxy_tw.config import load_config, load_text
from wmproxy_tw.listen import StartupError
from wmproxy_tw.service import plan
from wmproxy_tw.stream import resolve
from wmproxy_tw.tap import Options, WsProxyOptions

SEED = Path("/work/shared/wmproxy-configs/reverse.toml")


def _plan(text: str) -> list[str]:
    return plan(load_text(text, "t.toml").config, control=False)


def test_wmproxy_reverse_toml_stream_part_resolves() -> None:
    """wmproxy's reverse.toml [stream] servers resolve: group, tcp2ws URL, udp group, ws2tcp literal."""
    if not SEED.exists():
        pytest.skip("wmproxy's example configs are not here")
    stream = load_config(str(SEED)).config.stream
    assert stream is not None
    plans = resolve(stream)
    assert [p.mode for p in plans] == ["tcp", "tcp2ws", "udp", "ws2tcp"]
    assert plans[0].group.name == "server" and plans[2].group.name == "udp"
    assert str(plans[1].ws_url()) == "ws://127.0.0.1:8081/"
    assert plans[3].group.members[0].addr == ("127.0.0.1", 8082)  # up_name "ws1" names no group
    assert plans[2].cfg.client_timeout == 500


def test_plan_lines_name_modes_and_targets() -> None:
    """--check lines say mode, address and destination (and PROXY protocol use)."""
    lines = _plan('[stream]\n[[stream.upstream]]\nname = "g"\nserver = ["10.0.0.1:1", "10.0.0.2:2"]\n'
                  '[[stream.server]]\nbind_addr = "127.0.0.1:83"\nup_name = "g"\nsend_proxy_protocol = 2\n'
                  '[[stream.server]]\nbind_addr = "[::1]:85"\nbind_mode = "tcp2wss"\n'
                  'proxy_url = "ws://[::1]:8443/t"\ndomain = "wmproxy.com"\n')
    assert lines == [
        "stream tcp on 127.0.0.1:83 → upstream g (10.0.0.1:1, 10.0.0.2:2) (sends PROXY v2)",
        "stream tcp2wss on [::1]:85 → wss://wmproxy.com:8443/t (via [::1]:8443)",
    ]


@pytest.mark.parametrize("server,expect", [
    ('proxy_url = "tcp://nowhere"', "stream.server[0].proxy_url"),
    ('proxy_url = "http://127.0.0.1:80"', "bind_mode tcp needs tcp://"),
    ('proxy_url = "127.0.0.1:1"\naccept_proxy_protocol = true', "needs proxy_protocol_from"),
    ('proxy_url = "127.0.0.1:1"\nbind_mode = "udp"\nsend_proxy_protocol = "v1"', "only for bind_mode tcp and ws2tcp"),
    ('proxy_url = "127.0.0.1:1"\nbind_mode = "udp"\naccept_proxy_protocol = true\nproxy_protocol_from = "::1"',
     "not supported for bind_mode udp"),
])
def test_bad_servers_are_refused_with_their_key(server: str, expect: str) -> None:
    """A server that cannot work is refused at start-up with one line naming its key."""
    with pytest.raises(StartupError) as e:
        _plan(f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:1"\n{server}\n')
    assert expect in str(e.value)


def test_unknown_group_without_proxy_url_is_a_config_error() -> None:
    """up_name naming no group (and no proxy_url) is reported when the file is loaded."""
    from wmproxy_tw.config import ConfigError

    with pytest.raises(ConfigError, match=r"stream.server\[0\].up_name: no stream.upstream named 'nope'"):
        _plan('[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:1"\nup_name = "nope"\n')


def test_tcp2wss_with_unreadable_ca_fails_at_build() -> None:
    """An unreadable proxy_ssl_ca stops start-up with the file named, not at the first connection."""
    from twisted.internet.testing import MemoryReactorClock

    from wmproxy_tw.feature import BuildContext
    from wmproxy_tw.stream import build

    config = load_text('[[stream.server]]\nbind_addr = "127.0.0.1:1"\nbind_mode = "tcp2wss"\n'
                       'proxy_url = "wss://h:443/"\nproxy_ssl_ca = "/nonexistent/ca.pem"\n').config
    with pytest.raises(StartupError, match="/nonexistent/ca.pem"):
        build(BuildContext(MemoryReactorClock()), config)


def test_ws_proxy_quick_mode_builds_a_stream_server() -> None:
    """`ws-proxy --mode ws2tcp -b ADDR -t URL --path /p` is a [[stream.server]] of that mode."""
    opts = Options()
    opts.parseOptions(["ws-proxy", "--mode", "ws2tcp", "-b", "127.0.0.1:8086", "-t", "127.0.0.1:8082",
                       "--path", "/vnc"])
    s = opts.loaded.config.stream.server[0]  # type: ignore[union-attr]
    assert (s.bind_mode, str(s.bind_addr[0]), s.proxy_url, s.path) == ("ws2tcp", "127.0.0.1:8086",
                                                                          "127.0.0.1:8082", "/vnc")
    opts = Options()
    opts.parseOptions(["ws-proxy", "--mode", "tcp2ws", "-b", "127.0.0.1:8085", "-t", "wss://h/x",
                       "--domain", "d.example", "-k"])
    s = opts.loaded.config.stream.server[0]  # type: ignore[union-attr]
    assert (s.bind_mode, s.proxy_url, s.domain, s.proxy_ssl_verify) == ("tcp2ws", "wss://h/x", "d.example", False)


@pytest.mark.parametrize("argv", [
    ["--mode", "udp", "-b", "127.0.0.1:1", "-t", "x:1"],
    ["--mode", "tcp2ws", "-t", "ws://h/"],
])
def test_ws_proxy_bad_options_are_usage_errors(argv: list[str]) -> None:
    """A wrong --mode or a missing -b/-t is a usage error."""
    with pytest.raises(usage.UsageError):
        WsProxyOptions().parseOptions(argv)
