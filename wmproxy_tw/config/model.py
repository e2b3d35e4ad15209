"""The configuration tree as frozen, typed pydantic models (SPEC §2).

Both wmproxy key spellings are accepted through aliases; value grammars come
from :mod:`wmproxy_tw.config.grammar`.  Models allow extra keys so that the
loader can warn about them (with the nearest valid name) instead of failing.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    field_validator,
    model_validator,
)

from . import grammar as g

# ---------------------------------------------------------------- value types

Addr = Annotated[g.Address, PlainValidator(g.parse_address), PlainSerializer(str)]
AddrList = Annotated[
    tuple[g.Address, ...],
    PlainValidator(g.parse_address_list),
    PlainSerializer(lambda v: " ".join(str(a) for a in v)),
]
Duration = Annotated[float, PlainValidator(g.parse_duration)]
Size = Annotated[int, PlainValidator(g.parse_size)]


def _num(x: float) -> str:
    """A number as the grammars read it back: no exponent, no trailing '.0'."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _rate_text(r: g.Rate) -> str:
    return f"{_num(r.amount)}{'r' if r.unit == 'requests' else ''}/{_num(r.per)}s"


_OP_SYMBOLS = {"set": "", "add": "+", "del": "-", "default": "?"}


def _header_rule_text(r: g.HeaderRule) -> str:
    """The rule in the file's own grammar (``proxy + NAME 'VALUE'``), so it reads back the same."""
    words = (["proxy"] if r.target == "request" else []) + ([_OP_SYMBOLS[r.op]] if r.op != "set" else [])
    words.append(r.name)
    if r.op != "del":
        words.append(shlex.quote(r.value))
    return " ".join(words)


RateT = Annotated[g.Rate, PlainValidator(g.parse_rate), PlainSerializer(_rate_text)]
HeaderRules = Annotated[
    tuple[g.HeaderRule, ...],
    PlainValidator(g.parse_header_rules),
    PlainSerializer(lambda rules: [_header_rule_text(r) for r in rules]),
]
IPSetT = Annotated[g.IPSet, PlainValidator(g.parse_ipset), PlainSerializer(str)]
Flag = Annotated[frozenset[str], PlainValidator(g.parse_flag), PlainSerializer(lambda f: " ".join(sorted(f)))]


def _none_if_empty(v: Any) -> Any:
    return None if v == "" or v == [] else v


def _url(v: Any) -> str | None:
    v = _none_if_empty(v)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError(f"expected a URL such as 'http://backend' or '127.0.0.1:8080', found {v!r}")
    m = re.match(r"^(?:(https?|wss?|tcp)://)?([^/?#]+)(/[^#]*)?$", v.strip())
    if not m:
        raise ValueError(f"expected a URL such as 'http://backend', 'https://host:443/p' or 'host:port', found {v!r}")
    return v.strip()


Url = Annotated[Optional[str], PlainValidator(_url)]


@dataclass(frozen=True)
class LimitReq:
    """``zone=NAME burst=5 [nodelay]`` (``brust`` accepted: wmproxy's spelling)."""

    zone: str
    burst: int = 0
    nodelay: bool = False


def parse_limit_req(v: Any) -> LimitReq | None:
    v = _none_if_empty(v)
    if v is None:
        return None
    if isinstance(v, dict):
        words = [f"{k}={val}" for k, val in v.items() if k != "nodelay"] + (["nodelay"] if v.get("nodelay") else [])
    elif isinstance(v, str):
        words = v.split()
    else:
        raise ValueError(f"expected 'zone=NAME burst=N [nodelay]', found {v!r}")
    zone, burst, nodelay = None, 0, False
    for w in words:
        key, _, val = w.partition("=")
        if key == "zone" and val:
            zone = val
        elif key in ("burst", "brust") and val.isdigit():
            burst = int(val)
        elif key == "nodelay" and not val:
            nodelay = True
        else:
            raise ValueError(f"bad word {w!r} in limit_req {v!r}: expected 'zone=NAME burst=N [nodelay]'")
    if zone is None:
        raise ValueError(f"limit_req {v!r} names no zone: expected 'zone=NAME burst=N [nodelay]'")
    return LimitReq(zone, burst, nodelay)


LimitReqT = Annotated[Optional[LimitReq], PlainValidator(parse_limit_req), PlainSerializer(lambda x: x and f"zone={x.zone} burst={x.burst}{' nodelay' if x.nodelay else ''}")]


@dataclass(frozen=True)
class LimitReqZone:
    """``{client_ip} limit=10m rate=10r/s``: key template, memory bound, rate."""

    key: str
    limit: int
    rate: g.Rate
    shared: bool = False  # decided across the fleet through Redis (needs [fleet])


def parse_limit_req_zone(v: Any) -> LimitReqZone:
    if not isinstance(v, str):
        raise ValueError(f"expected '{{client_ip}} limit=10m rate=10r/s', found {v!r}")
    key_parts, limit, rate, shared = [], 10 * 1024 * 1024, None, False
    for w in v.split():
        if w in ("shared", "shared=true", "shared=false"):
            shared = w != "shared=false"
        elif w.startswith("shared="):
            raise ValueError(f"bad word {w!r} in limit_req_zone {v!r}: expected 'shared', 'shared=true' or 'shared=false'")
        elif w.startswith("limit="):
            limit = g.parse_size(w[6:])
        elif w.startswith("rate="):
            rate = g.parse_rate(w[5:])
            if rate.unit != "requests":
                raise ValueError(f"limit_req_zone rate {w[5:]!r} must count requests, e.g. '10r/s'")
        else:
            key_parts.append(w)
    if rate is None:
        raise ValueError(f"limit_req_zone {v!r} has no rate=: expected e.g. 'rate=10r/s'")
    if not key_parts:
        raise ValueError(f"limit_req_zone {v!r} has no key: expected e.g. '{{client_ip}}'")
    return LimitReqZone(" ".join(key_parts), limit, rate, shared)


LimitReqZoneT = Annotated[LimitReqZone, PlainValidator(parse_limit_req_zone), PlainSerializer(
    lambda z: f"{z.key} limit={z.limit} rate={_rate_text(z.rate)}{' shared' if z.shared else ''}")]


@dataclass(frozen=True)
class AccessLog:
    """``access_log = "LOGGER [FORMAT] [LEVEL]"``."""

    logger: str
    format: str | None = None
    level: str | None = None


_LEVELS = ("error", "warn", "info", "debug", "trace")


def parse_access_log(v: Any) -> AccessLog | None:
    v = _none_if_empty(v)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError(f"expected 'LOGGER [FORMAT] [LEVEL]', found {v!r}")
    words = v.split()
    if len(words) > 3:
        raise ValueError(f"expected 'LOGGER [FORMAT] [LEVEL]', found {v!r}")
    logger, fmt, level = words[0], None, None
    for w in words[1:]:
        if w.lower() in _LEVELS and level is None:
            level = w.lower()
        elif fmt is None:
            fmt = w
        else:
            raise ValueError(f"expected 'LOGGER [FORMAT] [LEVEL]', found {v!r}")
    return AccessLog(logger, fmt, level)


AccessLogT = Annotated[Optional[AccessLog], PlainValidator(parse_access_log), PlainSerializer(lambda a: a and " ".join(x for x in (a.logger, a.format, a.level) if x))]


@dataclass(frozen=True)
class LogTarget:
    """``log_names.NAME = "PATH [LEVEL]"``."""

    path: str
    level: str = "info"


def parse_log_target(v: Any) -> LogTarget:
    if not isinstance(v, str) or not v.split():
        raise ValueError(f"expected 'PATH [LEVEL]', found {v!r}")
    words = v.split()
    if len(words) > 2 or (len(words) == 2 and words[1].lower() not in _LEVELS):
        raise ValueError(f"expected 'PATH [LEVEL]' with LEVEL one of {', '.join(_LEVELS)}, found {v!r}")
    return LogTarget(words[0], words[1].lower() if len(words) == 2 else "info")


LogTargetT = Annotated[LogTarget, PlainValidator(parse_log_target), PlainSerializer(lambda t: f"{t.path} {t.level}")]

# ----------------------------------------------------------------- base model


class Model(BaseModel):
    """Frozen, extra keys kept (so the loader can warn about them)."""

    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True, arbitrary_types_allowed=True)


# -------------------------------------------------------------- upstream groups


class Member(Model):
    addr: Addr
    weight: int = Field(1, ge=1, le=10000)
    max_fails: int = Field(3, ge=0)
    fail_timeout: Duration = 30.0
    backup: bool = False
    down: bool = False
    fall_times: Optional[int] = Field(None, ge=1)
    rise_times: Optional[int] = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"addr": data}
        return data


class HealthCheck(Model):
    interval: Duration = 2.0
    path: str = "/health"
    expect: str = "2xx"
    timeout: Duration = 1.0
    fall: int = Field(3, ge=1)
    rise: int = Field(2, ge=1)
    kind: Literal["http", "tcp"] = Field("http", validation_alias=AliasChoices("kind", "type"))

    @field_validator("expect")
    @classmethod
    def _expect(cls, v: str) -> str:
        if not re.match(r"^([1-5]xx|\d{3}(-\d{3})?)( +([1-5]xx|\d{3}(-\d{3})?))*$", v.strip()):
            raise ValueError(f"expected a status pattern such as '2xx', '200' or '200-399', found {v!r}")
        return v.strip()


class Upstream(Model):
    name: str = Field(min_length=1)
    server: tuple[Member, ...] = Field(min_length=1)
    lb: Literal["round_robin", "random", "least_conn", "ip_hash", "hash"] = "round_robin"
    hash_key: Optional[str] = Field(None, validation_alias=AliasChoices("hash_key", "key"))
    health_check: Optional[HealthCheck] = None
    bind: Literal["tcp", "udp"] = "tcp"

    @model_validator(mode="after")
    def _hash_needs_key(self) -> "Upstream":
        if self.lb == "hash" and not self.hash_key:
            raise ValueError("lb = 'hash' needs hash_key, e.g. hash_key = '{path}'")
        return self


# ----------------------------------------------------------- http common keys

COMMON_KEYS = (
    "client_timeout", "client_read_timeout", "client_write_timeout", "client_header_timeout",
    "client_keepalive_timeout", "client_max_body_size", "proxy_connect_timeout",
    "proxy_read_timeout", "proxy_write_timeout", "max_read_buf", "rate_limit", "limit_req",
    "allow_ip", "deny_ip", "headers", "access_log", "error_log", "proxy_url", "root",
    "trusted_proxies", "max_header_size", "max_headers", "proxy_ssl_verify", "proxy_ssl_ca",
    "proxy_ssl_name", "proxy_next_upstream",
)


class Common(Model):
    """Keys inherited http → server → location (None: inherit)."""

    client_timeout: Optional[Duration] = None
    client_read_timeout: Optional[Duration] = None
    client_write_timeout: Optional[Duration] = None
    client_header_timeout: Optional[Duration] = None
    client_keepalive_timeout: Optional[Duration] = None
    client_max_body_size: Optional[Size] = None
    proxy_connect_timeout: Optional[Duration] = None
    proxy_read_timeout: Optional[Duration] = None
    proxy_write_timeout: Optional[Duration] = None
    max_read_buf: Optional[Size] = None
    rate_limit: Optional[RateT] = None
    limit_req: LimitReqT = None
    allow_ip: Optional[IPSetT] = None
    deny_ip: Optional[IPSetT] = None
    headers: Optional[HeaderRules] = None
    access_log: AccessLogT = None
    error_log: Optional[str] = None
    proxy_url: Url = Field(None, validation_alias=AliasChoices("proxy_url", "reverse_proxy", "proxy_pass"))
    root: Optional[str] = None
    trusted_proxies: Optional[IPSetT] = None
    max_header_size: Optional[Size] = None
    max_headers: Optional[int] = Field(None, ge=1)
    proxy_ssl_verify: Optional[bool] = None
    proxy_ssl_ca: Optional[str] = None
    proxy_ssl_name: Optional[str] = None
    proxy_next_upstream: Optional[bool] = None

    @field_validator("rate_limit", mode="after")
    @classmethod
    def _bytes_rate(cls, v: Optional[g.Rate]) -> Optional[g.Rate]:
        if v is not None and v.unit != "bytes":
            raise ValueError("rate_limit is a bandwidth such as '4m/s', not a request rate")
        return v


# Defaults applied once inheritance is resolved (nginx-like values).
COMMON_DEFAULTS: dict[str, Any] = {
    "client_timeout": 60.0,
    "client_read_timeout": 60.0,
    "client_write_timeout": 60.0,
    "client_header_timeout": 10.0,
    "client_keepalive_timeout": 75.0,
    "client_max_body_size": 1024**3,
    "proxy_connect_timeout": 10.0,
    "proxy_read_timeout": 60.0,
    "proxy_write_timeout": 60.0,
    "max_read_buf": 256 * 1024,
    "max_header_size": 16 * 1024,
    "max_headers": 100,
    "allow_ip": g.IPSet(),
    "deny_ip": g.IPSet(),
    "headers": (),
    "trusted_proxies": g.IPSet(),
    "proxy_ssl_verify": True,
    "proxy_next_upstream": True,
}


class FileServer(Model):
    root: Optional[str] = None
    prefix: str = ""
    browse: bool = False
    index: tuple[str, ...] = ("index.html", "index.htm")
    hide: tuple[str, ...] = ()
    cache_time: Optional[Duration] = None
    precompressed: bool = False
    cors: bool = False
    path404: Optional[str] = None
    ext_mimetype: dict[str, str] = Field(default_factory=dict)
    default_mimetype: str = "application/octet-stream"
    robots: Optional[str] = None
    follow_symlinks: bool = False
    gzip: bool = True
    gzip_min_length: Size = 1024

    @model_validator(mode="before")
    @classmethod
    def _wmproxy_spellings(cls, data: Any) -> Any:
        # wmproxy: precompressed = ["gzip", "br"] (a list) and disable_compress = true.
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("precompressed"), (list, tuple)):
                data["precompressed"] = bool(data["precompressed"])
            if "disable_compress" in data and "gzip" not in data:
                data["gzip"] = not data.pop("disable_compress")
        return data

    @field_validator("index", "hide", mode="before")
    @classmethod
    def _words(cls, v: Any) -> Any:
        return v.split() if isinstance(v, str) else v


RULE_KEYS = ("path", "host", "method", "client_ip", "scheme")


def _check_pattern(p: str) -> str:
    if p.startswith("~"):
        try:
            re.compile(p[1:].strip())
        except re.error as e:
            raise ValueError(f"bad regular expression {p[1:]!r}: {e}") from None
    return p


class RuleTable(Model):
    path: Optional[str] = None
    host: Optional[str] = None
    method: Optional[str] = None
    client_ip: Optional[IPSetT] = None
    scheme: Optional[Literal["http", "https"]] = None

    @field_validator("path", "host")
    @classmethod
    def _pattern(cls, v: Optional[str]) -> Optional[str]:
        return _check_pattern(v) if v else v


def _rule(v: Any) -> Any:
    # Decide the union member here: left to pydantic, a bad value gets one
    # error per member, at paths like "rule.str" and "rule.RuleTable".
    if isinstance(v, str):
        v = v.strip()
        if not v:
            raise ValueError("empty rule: expected a path such as '/api', a glob, '~regex' or '@NAME'")
        return _check_pattern(v)
    if isinstance(v, RuleTable):
        return v
    if isinstance(v, dict):
        return RuleTable.model_validate(v)  # its errors keep their field names in the key path
    raise ValueError(f"expected a rule such as '/api', '~regex', '@NAME' or a table "
                     f"{{path = ..., host = ..., method = ...}}, found {v!r}")


Rule = Annotated[Union[str, RuleTable], BeforeValidator(_rule)]


class Location(Common):
    rule: Rule = "/"
    is_ws: bool = False
    file_server: Optional[FileServer] = None
    static_response: Optional[str] = None
    static_status: int = Field(200, ge=100, le=599)
    static_headers: Optional[HeaderRules] = None
    try_paths: Optional[str] = None
    upstream: tuple[Upstream, ...] = ()

    @field_validator("try_paths")
    @classmethod
    def _try_paths(cls, v: Optional[str]) -> Optional[str]:
        if v is None or not v.strip():
            return None
        try:
            words = shlex.split(v)
        except ValueError as e:
            raise ValueError(f"bad try_paths {v!r}: {e}") from None
        for w in words:
            if w.startswith("=") and not (w[1:].isdigit() and 100 <= int(w[1:]) <= 599):
                raise ValueError(f"bad final status {w!r} in try_paths: expected e.g. '=404'")
            parts = w.split()
            if len(parts) == 3:  # wmproxy's rewrite item 'REGEX INPUT REPLACEMENT'
                _check_pattern("~" + parts[0])
            elif len(parts) != 1:
                raise ValueError(f"bad try_paths item {w!r}: expected a path or 'REGEX INPUT REPLACEMENT'")
        return v


class HttpServer(Common):
    bind_addr: AddrList = ()
    bind_ssl: AddrList = ()
    cert: Optional[str] = None
    key: Optional[str] = None
    up_name: Optional[str] = Field(None, validation_alias=AliasChoices("up_name", "server_name"))
    http2: bool = False
    max_connections: Optional[int] = Field(None, ge=1)
    location: tuple[Location, ...] = ()
    upstream: tuple[Upstream, ...] = ()

    @model_validator(mode="after")
    def _tls(self) -> "HttpServer":
        if self.bind_ssl and not (self.cert and self.key):
            raise ValueError("bind_ssl needs cert and key (there is no built-in certificate)")
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: set both or neither")
        if not self.bind_addr and not self.bind_ssl:
            raise ValueError("a server needs bind_addr or bind_ssl")
        return self


class Http(Common):
    server: tuple[HttpServer, ...] = ()
    upstream: tuple[Upstream, ...] = ()
    log_format: dict[str, str] = Field(default_factory=dict)
    log_names: dict[str, LogTargetT] = Field(default_factory=dict)
    limit_req_zone: dict[str, LimitReqZoneT] = Field(default_factory=dict)
    match_names: dict[str, Rule] = Field(default_factory=dict)


# --------------------------------------------------------------------- stream

BindMode = Literal["tcp", "udp", "tcp2ws", "tcp2wss", "ws2tcp"]


class StreamServer(Model):
    bind_addr: AddrList
    bind_mode: BindMode = "tcp"
    up_name: Optional[str] = None
    proxy_url: Url = Field(None, validation_alias=AliasChoices("proxy_url", "reverse_proxy", "proxy_pass"))
    domain: Optional[str] = None
    path: Optional[str] = None
    client_timeout: Duration = Field(600.0, validation_alias=AliasChoices("client_timeout", "timeout"))
    proxy_connect_timeout: Duration = 10.0
    send_proxy_protocol: Literal[False, "v1", "v2"] = False
    accept_proxy_protocol: bool = False
    proxy_protocol_from: IPSetT = g.IPSet()
    max_connections: Optional[int] = Field(None, ge=1)
    max_message_size: Size = 16 * 1024 * 1024
    ping_interval: Duration = 30.0
    ping_timeout: Duration = 30.0
    open_handshake_timeout: Duration = 10.0
    proxy_ssl_verify: bool = True
    proxy_ssl_ca: Optional[str] = None
    allow_ip: IPSetT = g.IPSet()
    deny_ip: IPSetT = g.IPSet()
    max_udp_sessions: int = Field(4096, ge=1)

    def admits(self, ip: str) -> bool:
        """A client address passes ``allow_ip`` (empty: everyone) and ``deny_ip``."""
        return (not self.allow_ip or ip in self.allow_ip) and ip not in self.deny_ip

    @field_validator("send_proxy_protocol", mode="before")
    @classmethod
    def _ppv(cls, v: Any) -> Any:
        if v is True or v in (1, "1"):
            return "v1"
        if v in (2, "2"):
            return "v2"
        return v

    @model_validator(mode="after")
    def _target(self) -> "StreamServer":
        if not self.proxy_url and not self.up_name:
            raise ValueError("a stream server needs up_name or proxy_url")
        if self.bind_mode in ("tcp2ws", "tcp2wss") and self.proxy_url and not re.match(r"^wss?://", self.proxy_url):
            raise ValueError(f"bind_mode {self.bind_mode} needs proxy_url = 'ws://host:port/path', found {self.proxy_url!r}")
        return self


class Stream(Model):
    server: tuple[StreamServer, ...] = ()
    upstream: tuple[Upstream, ...] = ()


# ---------------------------------------------------------------------- proxy


class Mapping(Model):
    name: str = Field(min_length=1)
    mode: Literal["http", "https", "tcp", "proxy"]
    local_addr: Optional[Addr] = None
    domain: Optional[str] = None
    headers: HeaderRules = ()
    remote_port: Optional[int] = Field(None, ge=1, le=65535)

    @field_validator("domain", mode="before")
    @classmethod
    def _domain(cls, v: Any) -> Any:
        return _none_if_empty(v)

    @model_validator(mode="after")
    def _needs(self) -> "Mapping":
        if self.mode != "proxy" and self.local_addr is None:
            raise ValueError(f"mapping {self.name!r} (mode {self.mode}) needs local_addr")
        if self.mode in ("http", "https") and not self.domain:
            raise ValueError(f"mapping {self.name!r} (mode {self.mode}) needs domain")
        return self


class Proxy(Model):
    bind: Optional[AddrList] = Field(None, validation_alias=AliasChoices("bind", "bind_addr"))
    flag: Flag = frozenset({"http", "https", "socks5"})
    username: Optional[str] = None
    password: Optional[str] = None
    mode: Optional[Literal["server", "client"]] = None
    center_addr: Optional[AddrList] = None
    server: Optional[AddrList] = None  # tunnel client: one "host:port" or a list (failover)
    attach: Optional[int] = Field(None, ge=1, le=16)  # tunnel client: servers held at once (min(2, listed))
    ts: bool = False
    tc: bool = False
    two_way_tls: bool = False
    cert: Optional[str] = None
    key: Optional[str] = None
    ca: Optional[str] = None
    domain: Optional[str] = None
    map_http_bind: Optional[AddrList] = None
    map_https_bind: Optional[AddrList] = None
    map_tcp_bind: Optional[AddrList] = None
    map_proxy_bind: Optional[AddrList] = None
    map_cert: Optional[str] = None
    map_key: Optional[str] = None
    mappings: tuple[Mapping, ...] = ()
    tokens: tuple[str, ...] = ()
    token: Optional[str] = None  # tunnel client: the token it presents (instead of username/password)
    client_name: Optional[str] = Field(None, max_length=64)  # tunnel client: its name in the server's logs
    allow_ip: IPSetT = g.IPSet()
    deny_ip: IPSetT = g.IPSet()
    deny_targets: Optional[AddrList] = None
    allow_open_proxy: bool = False
    connect_timeout: Duration = 10.0
    header_timeout: Duration = 10.0
    keepalive_timeout: Duration = 75.0
    idle_timeout: Duration = 600.0
    heartbeat_interval: Duration = 10.0
    heartbeat_timeout: Duration = 30.0
    max_connections: Optional[int] = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _server_mode_bind(cls, data: Any) -> Any:
        # wmproxy's server-mode files say bind_addr for the tunnel listener.
        if isinstance(data, dict) and data.get("mode") == "server" and "center_addr" not in data:
            data = dict(data)
            for k in ("bind_addr", "bind"):
                if k in data:
                    data["center_addr"] = data.pop(k)
                    break
        if isinstance(data, dict):
            data = {k: _none_if_empty(v) if k in ("map_cert", "map_key", "cert", "key", "server", "domain") else v
                    for k, v in data.items()}
        return data

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v.split()
        if isinstance(v, dict):
            return tuple(v.values())
        return v

    @model_validator(mode="after")
    def _checks(self) -> "Proxy":
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: set both or neither")
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: set both or neither")
        if (self.map_cert is None) != (self.map_key is None):
            raise ValueError("map_cert and map_key go together: set both or neither")
        if not 0 < self.heartbeat_interval < self.heartbeat_timeout:
            raise ValueError("heartbeat_interval must be positive and below heartbeat_timeout")
        if self.attach is not None and len(self.server or ()) < self.attach:
            raise ValueError(f"attach = {self.attach} needs that many servers listed in server")
        return self

    @property
    def attach_count(self) -> int:
        """How many of the listed servers a tunnel client stays attached to at once."""
        return self.attach if self.attach is not None else min(2, len(self.server or ()))


def _redis_url(v: Any) -> str:
    g.parse_redis_url(v)  # validated here, parsed again where used (the text is what /now shows, redacted)
    return str(v).strip()


class Fleet(Model):
    """``[fleet]``: several instances sharing state through Redis (see docs/operations.md).

    ``node_id`` must be unique in the fleet; by default it is this host's name
    and a suffix derived from ``advertise`` (or the control address), so it is
    stable across restarts (:func:`wmproxy_tw.fleet.feature.node_id_of`).
    """

    redis: Annotated[str, PlainValidator(_redis_url)] = "redis://127.0.0.1:6379/0"
    password: Optional[str] = None  # instead of the URL's; wins over it
    key_prefix: str = Field("wmproxy:", min_length=1, max_length=64)
    node_id: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    advertise: Optional[Addr] = None  # this node's inter-node address (host:port)
    secret: Optional[str] = Field(None, min_length=16)  # inter-node authentication
    lease: Duration = 10.0
    fail_open: bool = True
    tls_ca: Optional[str] = None  # CA bundle for rediss:// (default: the system's)

    @field_validator("password", "secret", "tls_ca", mode="before")
    @classmethod
    def _empty(cls, v: Any) -> Any:
        return _none_if_empty(v)

    @model_validator(mode="after")
    def _checks(self) -> "Fleet":
        if not 1.0 <= self.lease <= 3600.0:
            raise ValueError(f"lease {self.lease:g}s out of range: expected 1s to 1h")
        if self.tls_ca is not None and not self.redis.startswith("rediss://"):
            raise ValueError("tls_ca is for a TLS connection: use a rediss:// URL")
        return self


def _workers(v: Any) -> Any:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 256):
        return v
    raise ValueError(f"expected a number of worker processes 1-256 or 'auto', found {v!r}")


class Config(Model):
    proxy: Optional[Proxy] = None
    http: Optional[Http] = None
    stream: Optional[Stream] = None
    fleet: Optional[Fleet] = None
    control: Addr = g.Address("127.0.0.1", 8837)
    disable_control: bool = False
    control_token: Optional[str] = None
    pidfile: Optional[str] = None
    default_level: Literal["error", "warn", "info", "debug", "trace"] = "info"
    disable_stdout: bool = False
    workers: Annotated[Union[Literal["auto"], int], PlainValidator(_workers)] = 1
    metrics: bool = True
    shutdown_timeout: Duration = 10.0

    @field_validator("default_level", mode="before")
    @classmethod
    def _level(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v
