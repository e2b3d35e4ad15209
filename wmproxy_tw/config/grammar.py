"""Value grammars of the configuration file (SPEC §2).

Every function here takes the raw value found in the file (a string, a number
or a list) and returns a typed, immutable value, or raises ``ValueError`` with
a message that says what was expected.  The pydantic models in
:mod:`wmproxy_tw.config.model` call these, so the key path is added there.
"""

from __future__ import annotations

import ipaddress
import math
import re
import shlex
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = [
    "Address",
    "HeaderRule",
    "IPSet",
    "Rate",
    "parse_address",
    "parse_address_list",
    "parse_duration",
    "parse_flag",
    "parse_header_rule",
    "parse_header_rules",
    "parse_ipset",
    "parse_rate",
    "parse_size",
    "RedisURL",
    "parse_redis_url",
    "format_address",
    "is_loopback_host",
]


@dataclass(frozen=True, order=True)
class Address:
    """A host and a port: the one address type of the project."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 literal."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_NUMERIC_HOST = re.compile(r"^[0-9.]+$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_\-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_\-]{0,62}))*\.?$")


def _port(text: str, whole: str) -> int:
    if not text.isdigit():
        raise ValueError(f"bad port {text!r} in address {whole!r}: expected a number 1-65535")
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range in {whole!r}: expected 1-65535")
    return port


def _split_host_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ValueError(f"bad address {text!r}: expected [v6]:port")
        host = text[1:end]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"bad IPv6 literal {host!r} in {text!r}") from None
        return host, text[end + 2 :]
    if text.count(":") != 1:
        raise ValueError(
            f"bad address {text!r}: expected ip:port, [v6]:port, host:port or :port"
        )
    host, port = text.split(":")
    if host == "":
        host = "0.0.0.0"
    elif not _HOSTNAME.match(host) or _NUMERIC_HOST.match(host):
        # An all-numeric dotted host is an IPv4 literal, never a name (RFC 1123 2.1).
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"bad host {host!r} in address {text!r}") from None
    return host, port


def parse_address_range(value: Any) -> tuple[Address, ...]:
    """One address, or a port range ``ip:8000-8010`` (both ends included)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = f":{value}"
    if not isinstance(value, str):
        raise ValueError(f"expected an address string such as '127.0.0.1:8090', found {value!r}")
    text = value.strip()
    if not text:
        raise ValueError("expected an address such as '127.0.0.1:8090', found an empty string")
    host, port_text = _split_host_port(text)
    if "-" in port_text:
        lo_text, hi_text = port_text.split("-", 1)
        lo, hi = _port(lo_text, text), _port(hi_text, text)
        if lo > hi or lo == 0:
            raise ValueError(f"bad port range {port_text!r} in {text!r}: expected LOW-HIGH, LOW <= HIGH")
        if hi - lo > 1024:
            raise ValueError(f"port range {port_text!r} in {text!r} spans more than 1024 ports")
        return tuple(Address(host, p) for p in range(lo, hi + 1))
    return (Address(host, _port(port_text, text)),)


def parse_address(value: Any) -> Address:
    """``ip:port``, ``[v6]:port``, ``host:port`` or ``:port`` (all interfaces)."""
    addrs = parse_address_range(value)
    if len(addrs) != 1:
        raise ValueError(f"expected one address, found the range {value!r}")
    return addrs[0]


def parse_address_list(value: Any) -> tuple[Address, ...]:
    """Addresses separated by spaces or commas (or a list), ranges expanded."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        items: Iterable[Any] = value
    elif isinstance(value, str):
        items = [p for p in re.split(r"[\s,]+", value.strip()) if p]
    else:
        items = [value]
    out: list[Address] = []
    for item in items:
        for addr in parse_address_range(item):
            if addr not in out:
                out.append(addr)
    return tuple(out)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|secs|m|min|mins|h|hour|hours|d)?\s*$", re.I)
_DURATION_UNITS = {
    None: 1.0, "ms": 0.001, "s": 1.0, "sec": 1.0, "secs": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "h": 3600.0, "hour": 3600.0, "hours": 3600.0, "d": 86400.0,
}


def parse_duration(value: Any) -> float:
    """``500ms``, ``10s``, ``2min``/``2m``, ``1h`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '10s', found {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a finite, non-negative duration, found {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return float(m.group(1)) * _DURATION_UNITS[unit]
    raise ValueError(f"expected a duration such as '500ms', '10s', '2min', '1h' or seconds, found {value!r}")


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.I)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: Any) -> int:
    """An integer with an optional ``k|m|g|t`` suffix (powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '16k', found {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a non-negative size, found {value}")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    raise ValueError(f"expected a size such as 1024, '16k', '4m' or '1g', found {value!r}")


@dataclass(frozen=True)
class Rate:
    """An amount per period: bytes (``4m/s``) or requests (``10r/s``)."""

    amount: float
    per: float
    unit: str  # "bytes" | "requests"

    @property
    def per_second(self) -> float:
        return self.amount / self.per


def parse_rate(value: Any) -> Rate:
    """``SIZE/DURATION`` (bytes) or ``Nr/DURATION`` (requests)."""
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"expected a rate such as '4m/s' or '10r/s', found {value!r}")
    amount_text, per_text = (p.strip() for p in value.split("/", 1))
    if per_text and per_text[0].isalpha():
        per_text = "1" + per_text
    try:
        per = parse_duration(per_text)
    except ValueError:
        raise ValueError(f"bad period {per_text!r} in rate {value!r}: expected e.g. 's', 'min', '10s'") from None
    if per <= 0:
        raise ValueError(f"rate {value!r} has a zero period")
    if amount_text.lower().endswith("r"):
        num = amount_text[:-1]
        if not num.isdigit() or int(num) == 0:
            raise ValueError(f"bad request count {amount_text!r} in rate {value!r}")
        return Rate(float(num), per, "requests")
    try:
        amount = parse_size(amount_text)
    except ValueError:
        raise ValueError(f"bad amount {amount_text!r} in rate {value!r}: expected e.g. '4m' or '10r'") from None
    if amount == 0:
        raise ValueError(f"rate {value!r} is zero")
    return Rate(float(amount), per, "bytes")


@dataclass(frozen=True)
class HeaderRule:
    """One header rule: on the request sent upstream or on the response."""

    target: str  # "request" | "response"
    op: str  # "set" | "add" | "del" | "default"
    name: str
    value: str = ""


_OPS = {"+": "add", "-": "del", "?": "default"}
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def parse_header_rule(value: Any) -> HeaderRule:
    """``proxy [OP] NAME VALUE`` (request) or ``[OP] NAME VALUE`` (response).

    OP is ``+`` add, ``-`` delete, ``?`` set when absent, none: replace.
    A list of words (wmproxy's YAML form) is accepted too.
    """
    if isinstance(value, (list, tuple)):
        words = [str(w) for w in value]
    elif isinstance(value, str):
        if "\r" in value or "\n" in value:
            # shlex would quietly turn an unquoted line break into a word separator.
            raise ValueError(f"header rule {value!r}: holds a line break")
        try:
            words = shlex.split(value)
        except ValueError as e:
            raise ValueError(f"bad header rule {value!r}: {e}") from None
    else:
        raise ValueError(f"expected a header rule such as '+ X-Name value', found {value!r}")
    target = "response"
    if words and words[0].lower() == "proxy":
        target = "request"
        words = words[1:]
    op = "set"
    if words and words[0] in _OPS:
        op = _OPS[words[0]]
        words = words[1:]
    if not words:
        raise ValueError(f"header rule {value!r} names no header")
    name = words[0]
    if not _HEADER_NAME.match(name):
        raise ValueError(f"bad header name {name!r} in rule {value!r}")
    rest = words[1:]
    if op == "del":
        if rest:
            raise ValueError(f"header rule {value!r}: '-' takes only a name")
        return HeaderRule(target, op, name)
    if not rest:
        raise ValueError(f"header rule {value!r} has no value: expected '[proxy] [+|-|?] NAME VALUE'")
    text = " ".join(rest)
    if "\r" in text or "\n" in text:
        raise ValueError(f"header rule {value!r}: value holds a line break")
    return HeaderRule(target, op, name, text)


def parse_header_rules(value: Any) -> tuple[HeaderRule, ...]:
    """A list of header rules (a single string is one rule)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of header rules, found {value!r}")
    return tuple(parse_header_rule(v) for v in value)


@dataclass(frozen=True)
class IPSet:
    """Addresses and networks, IPv4 and IPv6; ``ip in ipset`` tests membership."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def __contains__(self, ip: object) -> bool:
        if not self.networks or not isinstance(ip, str):
            return False
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            forms.append(addr.ipv4_mapped)
        return any(a.version == n.version and a in n for a in forms for n in self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __str__(self) -> str:
        return " ".join(str(n) for n in self.networks)


def parse_ipset(value: Any) -> IPSet:
    """Space- or comma-separated IPs and CIDRs (or a list of them)."""
    if value is None:
        return IPSet()
    if isinstance(value, str):
        items = [p for p in re.split(r"[\s,]+", value.strip()) if p]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        raise ValueError(f"expected IPs or CIDRs such as '127.0.0.1 10.0.0.0/8 ::1', found {value!r}")
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"bad IP or CIDR {item!r}: expected e.g. '192.168.0.0/16' or '::1'") from None
    return IPSet(tuple(nets))


_FLAG_BITS = {1: "http", 2: "https", 4: "socks5"}
_FLAG_WORDS = {"http": "http", "https": "https", "socks5": "socks5", "socks": "socks5"}


def parse_flag(value: Any) -> frozenset[str]:
    """``"http https socks5"`` or the bitmask 1|2|4 (7 = all)."""
    if isinstance(value, bool):
        raise ValueError(f"expected 'http https socks5' or a number 1-7, found {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        n = int(value)
        if not 1 <= n <= 7:
            raise ValueError(f"flag {n} out of range: expected 1-7 (1 http, 2 https, 4 socks5)")
        return frozenset(w for b, w in _FLAG_BITS.items() if n & b)
    if isinstance(value, str):
        words = [w for w in re.split(r"[\s,|]+", value.strip().lower()) if w]
        bad = [w for w in words if w not in _FLAG_WORDS]
        if bad or not words:
            raise ValueError(f"bad flag {value!r}: expected words from 'http https socks5'")
        return frozenset(_FLAG_WORDS[w] for w in words)
    raise ValueError(f"expected 'http https socks5' or a number 1-7, found {value!r}")


@dataclass(frozen=True)
class RedisURL:
    """``redis://[[user]:password@]host[:port][/db]``; ``rediss://`` is Redis over TLS."""

    host: str
    port: int = 6379
    db: int = 0
    password: str | None = None
    username: str | None = None
    tls: bool = False

    def __str__(self) -> str:  # never shows the password
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{format_address(self.host, self.port)}/{self.db}"


def parse_redis_url(value: Any) -> RedisURL:
    """``redis://:pw@10.0.0.1:6379/0``, ``rediss://user:pw@redis.example:6380/2``."""
    from urllib.parse import unquote, urlsplit

    if not isinstance(value, str) or "://" not in value:
        raise ValueError(f"expected a URL such as 'redis://127.0.0.1:6379/0' or 'rediss://:PASSWORD@host:6380/0', "
                         f"found {value!r}")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"unknown scheme {parts.scheme!r} in {value!r}: expected redis:// or rediss:// (TLS)")
    if parts.query or parts.fragment:
        raise ValueError(f"the Redis URL takes no ?options or #fragment: {value!r}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise ValueError(f"bad port in Redis URL {value!r}: {e}") from None
    if not host:
        raise ValueError(f"the Redis URL {value!r} names no host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"bad database {path!r} in Redis URL {value!r}: expected a number such as /0")
    return RedisURL(host, port or 6379, int(path or 0), unquote(parts.password) if parts.password is not None else None,
                    unquote(parts.username) if parts.username else None, parts.scheme == "rediss")
