"""Loading configuration files (SPEC §2): wmproxy's published examples, both key spellings,
inheritance http → server → location, and how problems are reported (and `--check`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wmproxy_tw.config import ConfigError, Loaded, load_config, load_text
from wmproxy_tw.config.grammar import Address, HeaderRule, Rate
from wmproxy_tw.config.load import keypath
from wmproxy_tw.config.model import LimitReq, RuleTable
from wmproxy_tw.tap import Options

WMPROXY_CONFIGS = Path(__file__).parents[2] / ".." / "shared" / "wmproxy-configs"
LOADABLE = ["client.toml", "client.yaml", "server.toml", "server.yaml", "reverse.toml"]
ALL_THREE = frozenset({"http", "https", "socks5"})


@pytest.fixture
def examples() -> Path:
    """The folder of wmproxy's example configurations, or skip when this checkout has none."""
    if not WMPROXY_CONFIGS.is_dir():
        pytest.skip(f"wmproxy example configs not found at {WMPROXY_CONFIGS.resolve()} "
                    "(expected <repo>/../shared/wmproxy-configs)")
    return WMPROXY_CONFIGS


def example(folder: Path, name: str) -> Loaded:
    return load_config(str(folder / name))


def errors_of(text: str, name: str = "t.toml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(text, name)
    return info.value.errors


# ------------------------------------------------------- wmproxy's own examples


def test_examples_folder_holds_only_known_files(examples: Path) -> None:
    """Every config file in the wmproxy examples folder is covered by a test below."""
    found = sorted(p.name for p in examples.iterdir() if p.suffix in (".toml", ".yaml", ".yml"))
    assert found == sorted([*LOADABLE, "reverse.yaml"])


@pytest.mark.parametrize("name", LOADABLE)
def test_wmproxy_example_loads(examples: Path, name: str) -> None:
    """Each of wmproxy's example files (except reverse.yaml) loads, naming itself as the source."""
    loaded = example(examples, name)
    assert loaded.path == str(examples / name)
    assert len(loaded.source_hash) == 64


@pytest.mark.parametrize("name", LOADABLE)
def test_wmproxy_example_dump_reloads_equal(examples: Path, name: str) -> None:
    """A loaded example dumped with model_dump() and read back gives an equal configuration."""
    config = example(examples, name).config
    again = load_text(yaml.safe_dump(config.model_dump(mode="json")), "dumped.yaml").config
    assert again == config


def test_reverse_yaml_old_schema_fails_clearly(examples: Path) -> None:
    """reverse.yaml (an old schema) is refused with one line naming the file and its stray keys."""
    with pytest.raises(ConfigError) as info:
        example(examples, "reverse.yaml")
    (line,) = info.value.errors
    assert line.startswith(str(examples / "reverse.yaml") + ": ")
    assert "nothing to serve" in line and "bind_addr" in line and "reverse" in line


def test_client_toml_meaning(examples: Path) -> None:
    """client.toml: forward proxy on 0.0.0.0:8090, tunnel to 127.0.0.1:8091 over TLS, two mappings."""
    loaded = example(examples, "client.toml")
    assert loaded.warnings == ()
    c = loaded.config
    assert c.control == Address("127.0.0.1", 8838)
    p = c.proxy
    assert p is not None
    assert p.bind == (Address("0.0.0.0", 8090),)
    assert p.server == (Address("127.0.0.1", 8091),) and p.attach_count == 1
    assert p.ts and p.two_way_tls and not p.tc
    assert (p.username, p.password) == ("wmproxy", "wmproxy")
    assert p.flag == ALL_THREE
    assert p.mode is None and p.center_addr is None
    web, tcp = p.mappings
    assert (web.name, web.mode, web.local_addr, web.domain) == ("web", "http", Address("127.0.0.1", 8080), "localhost")
    assert web.headers == (
        HeaderRule("request", "set", "x-forward-for", "{client_ip}"),
        HeaderRule("request", "add", "from", "$url"),
        HeaderRule("response", "add", "last-modified", "from proxy"),
        HeaderRule("response", "del", "etag"),
    )
    assert (tcp.name, tcp.mode, tcp.local_addr, tcp.domain, tcp.headers) == (
        "tcp", "tcp", Address("127.0.0.1", 8080), None, ())


def test_client_yaml_matches_toml_twin(examples: Path) -> None:
    """client.yaml means what client.toml means; its list-form header rules parse word by word."""
    toml_p = example(examples, "client.toml").config.proxy
    yaml_c = example(examples, "client.yaml").config
    yaml_p = yaml_c.proxy
    assert toml_p is not None and yaml_p is not None
    assert yaml_p.model_copy(update={"mappings": ()}) == toml_p.model_copy(update={"mappings": ()})
    assert yaml_c.control == Address("127.0.0.1", 8837)
    assert yaml_p.mappings[1] == toml_p.mappings[1]
    assert yaml_p.mappings[0].headers == (
        HeaderRule("request", "add", "x-forward-for", "{client_ip}"),
        HeaderRule("request", "add", "from", "{url}"),
        HeaderRule("response", "add", "key", "value"),
        HeaderRule("response", "del", "etag"),
        HeaderRule("response", "add", "last-modified", "aaaa"),
    )


def test_server_toml_bind_addr_is_center_addr(examples: Path) -> None:
    """server.toml: mode = "server" turns bind_addr into the tunnel listener (center_addr)."""
    loaded = example(examples, "server.toml")
    assert loaded.warnings == ()
    p = loaded.config.proxy
    assert p is not None
    assert p.mode == "server"
    assert p.bind is None
    assert p.center_addr == (Address("0.0.0.0", 8091),)
    assert p.map_http_bind == (Address("0.0.0.0", 8001),)
    assert p.map_tcp_bind == (Address("0.0.0.0", 8002),)
    assert p.map_https_bind == (Address("0.0.0.0", 8003),)
    assert p.tc and p.two_way_tls and not p.ts
    assert p.map_cert is None and p.map_key is None
    assert p.flag == ALL_THREE


def test_server_yaml_flag_7_and_empty_certs(examples: Path) -> None:
    """server.yaml: flag 7 is all three protocols; empty map_cert/map_key mean none; same as the TOML."""
    loaded = example(examples, "server.yaml")
    assert loaded.warnings == ()
    p = loaded.config.proxy
    assert p is not None
    assert p.flag == ALL_THREE
    assert p.map_cert is None and p.map_key is None
    assert loaded.config == example(examples, "server.toml").config


def test_reverse_toml_warns_only_about_http_aa(examples: Path) -> None:
    """reverse.toml: the stray `aa = "b"` under [http] is the one warning, with file and key path."""
    path = str(examples / "reverse.toml")
    assert example(examples, "reverse.toml").warnings == (f"{path}: http.aa: unknown key 'aa' ignored",)


def test_reverse_toml_http_meaning(examples: Path) -> None:
    """reverse.toml: proxy_pass → proxy_url, `brust` accepted, zones, logs and per-location features."""
    http = example(examples, "reverse.toml").config.http
    assert http is not None
    zone = http.limit_req_zone["limit"]
    assert (zone.key, zone.limit, zone.rate) == ("{client_ip}", 10 * 1024**2, Rate(1000, 1.0, "requests"))
    assert [u.name for u in http.upstream] == ["server", "ws"]
    assert http.upstream[0].server[0].addr == Address("127.0.0.1", 8080)
    assert http.upstream[0].server[0].fail_timeout == 30.0
    assert http.log_names["access"].level == "trace" and http.log_names["error"].level == "info"
    (srv,) = http.server
    assert srv.bind_addr == (Address("0.0.0.0", 82),) and srv.up_name == "soft.wm-proxy.com"
    assert srv.limit_req == LimitReq("limit", 1, False)
    files, ws, static = srv.location
    assert files.rule == "/root" and files.file_server is not None and files.file_server.browse
    assert files.proxy_url is None  # proxy_pass = "" means none
    assert files.rate_limit == Rate(4 * 1024**2, 1.0, "bytes")
    assert files.try_paths is not None
    assert (ws.rule, ws.is_ws, ws.proxy_url) == ("@ws", True, "http://ws")
    assert ws.headers == (HeaderRule("response", "add", "aaa", "bbb"),)
    assert static.static_response == "I'm Ok {client_ip}"


def test_reverse_toml_inheritance(examples: Path) -> None:
    """reverse.toml: http and server values reach every location; unset ones get the defaults."""
    http = example(examples, "reverse.toml").config.http
    assert http is not None
    (srv,) = http.server
    assert srv.max_read_buf == 1024000  # from [http]
    for loc in srv.location:
        assert loc.proxy_read_timeout == 10.0 and loc.proxy_connect_timeout == 10.0  # from the server
        assert loc.proxy_write_timeout == 10.0
        assert loc.max_read_buf == 1024000  # from [http], through the server
        assert loc.access_log is not None and loc.access_log.format == "main"
        assert loc.limit_req == LimitReq("limit", 1, False)
        assert loc.client_timeout == 60.0 and loc.max_headers == 100  # defaults
    files, _ws, static = srv.location
    assert files.headers == static.headers == srv.headers == (
        HeaderRule("request", "set", "x-forward-for", "{client_ip}"),
        HeaderRule("response", "add", "last-modified", "from proxy"),
    )


def test_reverse_toml_stream_meaning(examples: Path) -> None:
    """reverse.toml: stream `timeout` → client_timeout, bind modes, udp upstream, up_name links."""
    stream = example(examples, "reverse.toml").config.stream
    assert stream is not None
    assert [(u.name, u.bind) for u in stream.upstream] == [("server", "tcp"), ("ws", "tcp"), ("udp", "udp")]
    tcp, tcp2ws, udp, ws2tcp = stream.server
    assert (tcp.bind_addr, tcp.bind_mode, tcp.up_name, tcp.client_timeout) == (
        (Address("0.0.0.0", 83),), "tcp", "server", 600.0)
    assert (tcp2ws.bind_mode, tcp2ws.proxy_url) == ("tcp2ws", "ws://127.0.0.1:8081/")
    assert (udp.bind_mode, udp.up_name, udp.client_timeout) == ("udp", "udp", 500.0)
    assert (ws2tcp.bind_mode, ws2tcp.proxy_url) == ("ws2tcp", "tcp://127.0.0.1:8082")


# ------------------------------------------------------------ both spellings


def test_proxy_bind_addr_is_bind_outside_server_mode() -> None:
    """[proxy] bind_addr is `bind` unless mode = "server"; a bare port means all interfaces."""
    p = load_text('[proxy]\nbind_addr = "127.0.0.1:1080"\n').config.proxy
    assert p is not None and p.bind == (Address("127.0.0.1", 1080),) and p.center_addr is None
    p = load_text("[proxy]\nbind = 1080\nmode = 'client'\n").config.proxy
    assert p is not None and p.bind == (Address("0.0.0.0", 1080),)


def test_server_mode_keeps_explicit_center_addr() -> None:
    """In server mode an explicit center_addr wins and bind_addr stays the forward-proxy bind."""
    p = load_text('[proxy]\nmode = "server"\ncenter_addr = ":9000"\nbind_addr = "127.0.0.1:8090"\n').config.proxy
    assert p is not None
    assert p.center_addr == (Address("0.0.0.0", 9000),) and p.bind == (Address("127.0.0.1", 8090),)


@pytest.mark.parametrize("key", ["proxy_url", "reverse_proxy", "proxy_pass"])
def test_location_proxy_url_aliases(key: str) -> None:
    """proxy_url, reverse_proxy and proxy_pass are one key on locations (and servers)."""
    text = f'[[http.server]]\nbind_addr = ":80"\n{key} = "http://up"\n[[http.server.location]]\nrule = "/"\n' \
           f'{key} = "https://www.baidu.com"\n'
    srv = load_text(text).config.http.server[0]  # type: ignore[union-attr]
    assert srv.proxy_url == "http://up"
    assert srv.location[0].proxy_url == "https://www.baidu.com"


@pytest.mark.parametrize("key", ["timeout", "client_timeout"])
def test_stream_timeout_alias(key: str) -> None:
    """Stream `timeout` (wmproxy) and `client_timeout` are the same key, read as a duration."""
    text = f'[[stream.upstream]]\nname = "u"\nserver = ["127.0.0.1:1"]\n' \
           f'[[stream.server]]\nbind_addr = ":1"\nup_name = "u"\n{key} = "2min"\n'
    assert load_text(text).config.stream.server[0].client_timeout == 120.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ('"zone=z burst=5"', LimitReq("z", 5, False)),
        ('"zone=z brust=5"', LimitReq("z", 5, False)),
        ('"zone=z burst=2 nodelay"', LimitReq("z", 2, True)),
        ('"zone=z"', LimitReq("z", 0, False)),
        ("{zone = 'z', burst = 3, nodelay = true}", LimitReq("z", 3, True)),
    ],
)
def test_limit_req_forms(value: str, parsed: LimitReq) -> None:
    """limit_req takes `burst` or wmproxy's `brust`, optional nodelay, as a string or a table."""
    text = f'[http.limit_req_zone]\nz = "{{client_ip}} rate=10r/s"\n[[http.server]]\nbind_addr = ":80"\nlimit_req = {value}\n'
    assert load_text(text).config.http.server[0].limit_req == parsed  # type: ignore[union-attr]


# -------------------------------------------------------------- inheritance

INHERIT = """\
[http]
proxy_read_timeout = "5s"
client_max_body_size = "1m"
headers = ["+ x-from http"]

[[http.server]]
bind_addr = ":80"
proxy_read_timeout = "7s"

[[http.server.location]]
rule = "/a"

[[http.server.location]]
rule = "/b"
proxy_read_timeout = "500ms"
headers = ["- server"]

[[http.server]]
bind_addr = ":81"
"""


def test_inheritance_http_server_location() -> None:
    """A location's own value wins, else its server's, else [http]'s, else the default."""
    http = load_text(INHERIT).config.http
    assert http is not None
    first, second = http.server
    a, b = first.location
    assert first.proxy_read_timeout == 7.0 and a.proxy_read_timeout == 7.0 and b.proxy_read_timeout == 0.5
    assert a.client_max_body_size == b.client_max_body_size == 1024**2
    assert a.headers == (HeaderRule("response", "add", "x-from", "http"),)
    assert b.headers == (HeaderRule("response", "del", "server"),)
    assert a.proxy_connect_timeout == 10.0 and a.client_header_timeout == 10.0
    assert second.proxy_read_timeout == 5.0


def test_server_without_locations_gets_one_catch_all() -> None:
    """A server with no location gets one `/` location carrying the inherited values."""
    http = load_text(INHERIT).config.http
    assert http is not None
    (loc,) = http.server[1].location
    assert loc.rule == "/" and loc.proxy_read_timeout == 5.0 and loc.client_max_body_size == 1024**2
    assert loc.proxy_write_timeout == 60.0


def test_rule_table_and_match_names() -> None:
    """A rule may be a table (path/host/method…); `@NAME` rules refer to http.match_names."""
    text = ('[http.match_names]\napi = { path = "/api", method = "GET" }\n'
            '[[http.server]]\nbind_addr = ":80"\n'
            '[[http.server.location]]\nrule = "@api"\n'
            '[[http.server.location]]\nrule = { host = "~^www\\\\.", client_ip = "10.0.0.0/8" }\n')
    http = load_text(text).config.http
    assert http is not None
    assert http.match_names["api"] == RuleTable(path="/api", method="GET")
    table = http.server[0].location[1].rule
    assert isinstance(table, RuleTable) and table.host == "~^www\\." and "10.1.1.1" in table.client_ip  # type: ignore[operator]


# ------------------------------------------------------------ error reporting


def test_typo_warns_with_nearest_name() -> None:
    """An unknown key is a warning naming the file, its key path and the nearest valid key."""
    loaded = load_text('[proxy]\nbind_adr = "127.0.0.1:1"\n', "conf.toml")
    assert loaded.warnings == ("conf.toml: proxy.bind_adr: unknown key 'bind_adr' ignored; did you mean 'bind_addr'?",)


def test_unknown_key_deep_inside_is_found() -> None:
    """Unknown keys are found at any depth: locations, rule tables and named tables."""
    text = ('[http.match_names]\nx = { pth = "/a" }\n'
            '[[http.server]]\nbind_addr = ":80"\n[[http.server.location]]\nrule = "/"\nproxy_pas = "http://a"\n')
    warnings = load_text(text).warnings
    assert any("http.match_names.x.pth" in w and "'path'" in w for w in warnings)
    assert any("http.server[0].location[0].proxy_pas" in w and "'proxy_pass'" in w for w in warnings)


def test_bad_bind_names_proxy_bind() -> None:
    """bind = "nonsense" is one error naming the file, proxy.bind and the value."""
    (line,) = errors_of('[proxy]\nbind = "nonsense"\n', "my.toml")
    assert line.startswith("my.toml: proxy.bind: ") and "'nonsense'" in line and "ip:port" in line


def test_all_errors_reported_at_once() -> None:
    """Every invalid value in a file is reported, each with file name and full key path."""
    text = """\
control = "x"
workers = 0
[proxy]
bind = ":99999"
flag = 9
[http]
proxy_read_timeout = "soon"
[[http.server]]
bind_addr = ":80"
[[http.server]]
bind_addr = ":81"
[[http.server.location]]
rule = 5
[[http.server.location]]
rule = { path = "~((" }
headers = ["+ x"]
rate_limit = "10r/s"
allow_ip = "1.2.3"
[[http.upstream]]
name = "u"
server = ["nope"]
"""
    lines = errors_of(text, "many.toml")
    assert all(line.startswith("many.toml: ") for line in lines)
    paths = [line.split(": ")[1] for line in lines]
    assert sorted(paths) == sorted([
        "control", "workers", "proxy.bind", "proxy.flag", "http.proxy_read_timeout",
        "http.server[1].location[0].rule", "http.server[1].location[1].rule.path",
        "http.server[1].location[1].headers", "http.server[1].location[1].rate_limit",
        "http.server[1].location[1].allow_ip", "http.upstream[0].server[0].addr",
    ])


@pytest.mark.parametrize(
    ("text", "path", "says"),
    [
        ('[proxy]\nusername = "a"\n', "proxy", "username and password go together"),
        ('[[http.server]]\nbind_ssl = ":443"\n', "http.server[0]", "bind_ssl needs cert and key"),
        ('[[http.server]]\nroot = "/srv"\n', "http.server[0]", "needs bind_addr or bind_ssl"),
        ('[[proxy.mappings]]\nname = "w"\nmode = "http"\nlocal_addr = ":1"\n', "proxy.mappings[0]", "needs domain"),
        ('[[http.upstream]]\nname = "u"\nserver = []\n', "http.upstream[0].server", "at least 1 item"),
        ('[[http.upstream]]\nname = "u"\nserver = [":1"]\nlb = "hash"\n', "http.upstream[0]", "needs hash_key"),
        ('[[stream.server]]\nbind_addr = ":1"\n', "stream.server[0]", "needs up_name or proxy_url"),
        ('[[stream.server]]\nbind_addr = ":1"\nbind_mode = "tcp2ws"\nproxy_url = "tcp://a:1"\n',
         "stream.server[0]", "ws://"),
        ('[[http.server]]\nbind_addr = ":1"\n[[http.server.location]]\nrule = ""\n',
         "http.server[0].location[0].rule", "empty rule"),
        ('[[http.server]]\nbind_addr = ":1"\n[[http.server.location]]\ntry_paths = "{path} =999"\n',
         "http.server[0].location[0].try_paths", "bad final status"),
        ('default_level = "loud"\n[proxy]\n', "default_level", "'error'"),
    ],
)
def test_model_level_errors(text: str, path: str, says: str) -> None:
    """Cross-field mistakes are refused at the key path of the table that holds them."""
    (line,) = errors_of(text)
    assert line.startswith(f"t.toml: {path}: ") and says in line


def test_limit_req_undefined_zone_is_an_error_at_every_level() -> None:
    """limit_req naming a zone absent from http.limit_req_zone is an error where it is written."""
    text = ('[http]\nlimit_req = "zone=a"\n[http.limit_req_zone]\nok = "{client_ip} rate=1r/s"\n'
            '[[http.server]]\nbind_addr = ":80"\nlimit_req = "zone=b"\n'
            '[[http.server.location]]\nlimit_req = "zone=c"\n'
            '[[http.server.location]]\nlimit_req = "zone=ok"\n')
    lines = errors_of(text)
    assert [line.split(": ")[1] for line in lines] == [
        "http.limit_req", "http.server[0].limit_req", "http.server[0].location[0].limit_req"]
    assert all("defined: ok" in line for line in lines)


def test_stream_unknown_up_name_is_an_error() -> None:
    """A stream server whose up_name matches no stream.upstream is an error listing the defined ones."""
    text = ('[[stream.upstream]]\nname = "a"\nserver = [":1"]\n'
            '[[stream.server]]\nbind_addr = ":2"\nup_name = "b"\n')
    (line,) = errors_of(text)
    assert line == "t.toml: stream.server[0].up_name: no stream.upstream named 'b' (defined: a)"


def test_unknown_match_name_is_an_error() -> None:
    """A rule `@NAME` with no http.match_names entry is an error (`@ws` is built in)."""
    (line,) = errors_of('[[http.server]]\nbind_addr = ":1"\n[[http.server.location]]\nrule = "@api"\n')
    assert line.startswith("t.toml: http.server[0].location[0].rule: ") and "'@api'" in line


def test_bad_toml_is_one_line_with_file_name() -> None:
    """TOML syntax errors are one line naming the file, the format and the position."""
    (line,) = errors_of('[proxy\nbind = "x"\n', "broken.toml")
    assert line.startswith("broken.toml: not valid TOML: ") and "line 1" in line and "\n" not in line


def test_bad_yaml_is_one_line_with_file_name() -> None:
    """YAML syntax errors are one line naming the file, its line and the problem."""
    (line,) = errors_of("proxy:\n  bind: a: b\n", "broken.yaml")
    assert line.startswith("broken.yaml: line 2: not valid YAML: ") and "\n" not in line


@pytest.mark.parametrize(("text", "name"), [("- a\n- b\n", "list.yaml"), ("just text\n", "scalar.yml")])
def test_yaml_top_level_must_be_a_table(text: str, name: str) -> None:
    """A YAML document that is not a mapping is refused, naming what was found."""
    (line,) = errors_of(text, name)
    assert line.startswith(f"{name}: expected a table of settings at the top level")


def test_unknown_extension_is_refused() -> None:
    """Only .toml, .yaml and .yml are read; any other extension is an error naming the file."""
    (line,) = errors_of("[proxy]\n", "conf.ini")
    assert line == "conf.ini: unknown file type '.ini': expected .toml, .yaml or .yml"


def test_empty_yaml_is_an_empty_config() -> None:
    """An empty YAML file is an empty table (defaults only), not a crash."""
    assert load_text("", "empty.yaml").config.proxy is None


def test_missing_file_names_it(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the path and the reason."""
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"{path}: cannot read the configuration file: No such file or directory"]


def test_directory_instead_of_file_names_it(tmp_path: Path) -> None:
    """A directory given as the config file is a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    (line,) = info.value.errors
    assert line.startswith(f"{tmp_path}: cannot read the configuration file: ")


def test_unreadable_file_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that cannot be read (permission denied) is a ConfigError naming it."""
    path = tmp_path / "secret.toml"
    path.write_text("[proxy]\n")

    def refuse(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)  # chmod 000 is no obstacle when tests run as root
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.errors == [f"{path}: cannot read the configuration file: Permission denied"]


def test_non_utf8_file_names_it(tmp_path: Path) -> None:
    """A file that is not UTF-8 text is a ConfigError naming it."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n[proxy]\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.errors == [f"{path}: the configuration file is not UTF-8 text"]


def test_config_error_message_is_all_lines() -> None:
    """str(ConfigError) is its error lines joined, so a plain print shows every problem."""
    err = ConfigError(["a: one", "b: two"])
    assert str(err) == "a: one\nb: two" and err.errors == ["a: one", "b: two"]


def test_keypath_formatting() -> None:
    """keypath() joins names with dots and indexes in brackets."""
    assert keypath(("http", "server", 1, "location", 0, "rule")) == "http.server[1].location[0].rule"
    assert keypath(()) == "(top level)"


# ----------------------------------------------------------------- --check


def _check(path: Path) -> int:
    with pytest.raises(SystemExit) as info:
        Options().parseOptions(["--check", "-c", str(path)])
    return int(info.value.code or 0)


def test_check_good_file_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`twistd wmproxy --check -c FILE` on a valid file exits 0 and lists the listeners."""
    path = tmp_path / "good.toml"
    path.write_text('[proxy]\nbind = "127.0.0.1:0"\n')
    assert _check(path) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{path}: configuration OK", "  forward proxy (http https socks5) on 127.0.0.1:0",
                                "  control API on 127.0.0.1:8837"]
    assert err == ""


def test_check_bad_file_exits_1_one_line_per_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--check` on an invalid file exits 1 with one stderr line per error and no traceback."""
    path = tmp_path / "bad.toml"
    path.write_text('[proxy]\nbind = "nonsense"\nflag = 9\n')
    assert _check(path) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"wmproxy: {path}: proxy.bind: ")
    assert lines[1].startswith(f"wmproxy: {path}: proxy.flag: ")
    assert "Traceback" not in err


def test_check_warning_still_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--check` prints unknown-key warnings on stderr and still exits 0."""
    path = tmp_path / "typo.toml"
    path.write_text('[proxy]\nbind = "127.0.0.1:0"\nusername = "u"\npassword = "p"\npasword = "x"\n')
    assert _check(path) == 0
    _out, err = capsys.readouterr()
    warning = f"wmproxy: warning: {path}: proxy.pasword: unknown key 'pasword' ignored; did you mean 'password'?"
    assert err.splitlines() == [warning]


def test_check_missing_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--check` on a missing file exits 1 with one line naming it."""
    path = tmp_path / "missing.toml"
    assert _check(path) == 1
    _out, err = capsys.readouterr()
    assert err == f"wmproxy: {path}: cannot read the configuration file: No such file or directory\n"


def test_check_syntax_error_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--check` on a file with a YAML syntax error exits 1 with one line and no traceback."""
    path = tmp_path / "broken.yaml"
    path.write_text("proxy: [\n")
    assert _check(path) == 1
    _out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "not valid YAML" in err and "Traceback" not in err
