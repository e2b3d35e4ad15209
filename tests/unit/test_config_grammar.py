"""Value grammars of the configuration file (SPEC §2): addresses, durations, sizes, rates,
header rules, IP sets and the proxy flag."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from wmproxy_tw.config.grammar import (
    Address,
    HeaderRule,
    IPSet,
    Rate,
    format_address,
    is_loopback_host,
    parse_address,
    parse_address_list,
    parse_address_range,
    parse_duration,
    parse_flag,
    parse_header_rule,
    parse_header_rules,
    parse_ipset,
    parse_rate,
    parse_size,
)

FEW = settings(max_examples=100, deadline=None)

# ------------------------------------------------------------------ addresses


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8090", "127.0.0.1", 8090),
        ("0.0.0.0:1", "0.0.0.0", 1),
        ("[::1]:8090", "::1", 8090),
        ("[2001:db8::7]:443", "2001:db8::7", 443),
        ("[::ffff:10.0.0.1]:80", "::ffff:10.0.0.1", 80),
        ("[fe80::1%eth0]:80", "fe80::1%eth0", 80),
        (":8090", "0.0.0.0", 8090),
        ("localhost:80", "localhost", 80),
        ("backend.example.com:8080", "backend.example.com", 8080),
        ("my_host-1:9", "my_host-1", 9),
        ("  10.0.0.1:65535  ", "10.0.0.1", 65535),
    ],
)
def test_parse_address_accepts_documented_forms(text: str, host: str, port: int) -> None:
    """ip:port, [v6]:port, :port (all interfaces) and host:port parse to host and port."""
    assert parse_address(text) == Address(host, port)


def test_parse_address_bare_integer_is_all_interfaces() -> None:
    """A bare number (TOML `bind = 8090`) means 0.0.0.0 on that port."""
    assert parse_address(8090) == Address("0.0.0.0", 8090)


def test_parse_address_port_zero_means_any_free_port() -> None:
    """Port 0 is accepted (bind to any free port), as tests and quick modes use it."""
    assert parse_address("127.0.0.1:0") == Address("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("127.0.0.1:http", "bad port 'http'"),
        ("127.0.0.1:-1", "bad port"),
        ("127.0.0.1:", "bad port ''"),
        ("127.0.0.1:70000", "out of range"),
        ("127.0.0.1:65536", "out of range"),
        ("", "empty"),
        ("   ", "empty"),
        ("127.0.0.1", "expected ip:port"),
        ("localhost", "expected ip:port"),
        ("::1:80", "expected ip:port"),
        ("[::1]", "expected [v6]:port"),
        ("[::1]80", "expected [v6]:port"),
        ("[::1:80", "expected [v6]:port"),
        ("[zz::g]:80", "bad IPv6 literal 'zz::g'"),
        ("[1.2.3.4]:80", "bad IPv6 literal"),
        ("-bad:80", "bad host '-bad'"),
        ("a b:80", "bad host 'a b'"),
        ("300.1.1.1:80", "bad host '300.1.1.1'"),
        ("1.2.3.4.5:80", "bad host '1.2.3.4.5'"),
        (None, "found None"),
        (3.5, "found 3.5"),
        (True, "found True"),
    ],
)
def test_parse_address_rejects_with_reason(value: object, expect: str) -> None:
    """Malformed addresses raise ValueError saying what is wrong and what is expected."""
    with pytest.raises(ValueError) as info:
        parse_address(value)
    assert expect in str(info.value)


def test_parse_address_refuses_a_range() -> None:
    """Where one address is expected, a port range is an error naming the value."""
    with pytest.raises(ValueError, match="expected one address"):
        parse_address("127.0.0.1:8000-8001")


def test_parse_address_range_expands_inclusive() -> None:
    """ip:8000-8010 expands to every port from 8000 to 8010, both ends included."""
    addrs = parse_address_range("10.0.0.1:8000-8010")
    assert [a.port for a in addrs] == list(range(8000, 8011))
    assert {a.host for a in addrs} == {"10.0.0.1"}


def test_parse_address_range_single_port_range_and_v6() -> None:
    """A LOW-LOW range is one address; ranges work with [v6] hosts too."""
    assert parse_address_range(":81-81") == (Address("0.0.0.0", 81),)
    assert parse_address_range("[::1]:1-2") == (Address("::1", 1), Address("::1", 2))


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("1.2.3.4:8010-8000", "LOW <= HIGH"),
        ("1.2.3.4:0-5", "LOW <= HIGH"),
        ("1.2.3.4:1-2000", "more than 1024"),
        ("1.2.3.4:1-x", "bad port 'x'"),
        ("1.2.3.4:1-70000", "out of range"),
    ],
)
def test_parse_address_range_rejects_bad_ranges(value: str, expect: str) -> None:
    """Reversed, zero-based, oversized or non-numeric port ranges are refused."""
    with pytest.raises(ValueError) as info:
        parse_address_range(value)
    assert expect in str(info.value)


def test_parse_address_list_spaces_commas_and_ranges() -> None:
    """Lists split on spaces and/or commas; ranges expand; order is kept."""
    assert parse_address_list("1.1.1.1:1, 2.2.2.2:2  [::1]:3,:4 5.5.5.5:6-7") == (
        Address("1.1.1.1", 1),
        Address("2.2.2.2", 2),
        Address("::1", 3),
        Address("0.0.0.0", 4),
        Address("5.5.5.5", 6),
        Address("5.5.5.5", 7),
    )


def test_parse_address_list_accepts_arrays_and_dedups() -> None:
    """A TOML/YAML array works like the string form; duplicates are dropped."""
    assert parse_address_list(["1.1.1.1:1", 80, "1.1.1.1:1"]) == (
        Address("1.1.1.1", 1),
        Address("0.0.0.0", 80),
    )


def test_parse_address_list_empty_is_no_addresses() -> None:
    """None or an empty string is the empty list (no listener)."""
    assert parse_address_list(None) == ()
    assert parse_address_list("") == ()
    assert parse_address_list(" , ") == ()


def test_parse_address_list_reports_the_bad_item() -> None:
    """One bad item in a list fails the whole list, naming that item."""
    with pytest.raises(ValueError, match="'nope'"):
        parse_address_list("1.1.1.1:1 nope")


def test_address_str_and_ipv6_flag() -> None:
    """str(Address) is host:port with brackets around IPv6; is_ipv6 tells them apart."""
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("127.0.0.1", 80)) == "127.0.0.1:80"
    assert Address("::1", 80).is_ipv6 and not Address("localhost", 80).is_ipv6


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("LocalHost", True),
     ("0.0.0.0", False), ("10.0.0.1", False), ("::", False), ("example.com", False)],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    """Loopback is 127.0.0.0/8, ::1 and `localhost` (any case); nothing else."""
    assert is_loopback_host(host) is loopback


@FEW
@given(ip=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), port=st.integers(0, 65535))
def test_format_then_parse_address_round_trips(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    """parse_address(format_address(ip, port)) gives back the same host and port, v4 and v6."""
    text = format_address(str(ip), port)
    assert parse_address(text) == Address(str(ip), port)
    assert str(parse_address(text)) == text


# ------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("2min", 120.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("10", 10.0),
        (" 10 s ", 10.0),
        ("3H", 10800.0),
        (30, 30.0),
        (0, 0.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration_units(value: object, seconds: float) -> None:
    """ms, s, min/m, h, d suffixes and bare numbers (seconds) give seconds as a float."""
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "soon", "10x", "-1s", "1h30m", "s", "1e3", -1, True, None, [1],
                                   float("nan"), float("inf")])
def test_parse_duration_rejects(value: object) -> None:
    """Unknown units, negatives, non-finite numbers, booleans and other types are refused."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@FEW
@given(n=st.integers(0, 10**9))
def test_parse_duration_ms_is_a_thousandth(n: int) -> None:
    """'<n>ms' is n/1000 seconds and '<n>s' is n seconds."""
    assert parse_duration(f"{n}ms") == pytest.approx(n / 1000)
    assert parse_duration(f"{n}s") == n


# ---------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("1024", 1024),
        (0, 0),
        (4096, 4096),
        ("16k", 16 * 1024),
        ("16K", 16 * 1024),
        ("4m", 4 * 1024**2),
        ("1g", 1024**3),
        ("2t", 2 * 1024**4),
        ("10kb", 10 * 1024),
        ("10KiB", 10 * 1024),
        (" 3 m ", 3 * 1024**2),
    ],
)
def test_parse_size_powers_of_1024(value: object, size: int) -> None:
    """Integers with optional k/m/g/t (any case, optional 'b'/'ib') are powers of 1024."""
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "big", "1.5m", "-1k", "10p", "k", -1, 1.5, True, None])
def test_parse_size_rejects(value: object) -> None:
    """Fractions, negatives, unknown suffixes, booleans and other types are refused."""
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


@FEW
@given(n=st.integers(0, 2**40), unit=st.sampled_from([("k", 1), ("m", 2), ("g", 3), ("t", 4)]))
def test_parse_size_suffix_multiplies(n: int, unit: tuple[str, int]) -> None:
    """parse_size(str(n) + suffix) == n * 1024**power, for k, m, g and t."""
    suffix, power = unit
    assert parse_size(f"{n}{suffix}") == n * 1024**power


# ---------------------------------------------------------------------- rates


def test_parse_rate_bytes_per_second() -> None:
    """'4m/s' is 4 MiB per second, counted in bytes."""
    rate = parse_rate("4m/s")
    assert rate == Rate(4 * 1024**2, 1.0, "bytes")
    assert rate.per_second == 4 * 1024**2


def test_parse_rate_requests() -> None:
    """'10r/s' and '1000r/min' count requests; per_second divides by the period."""
    assert parse_rate("10r/s") == Rate(10, 1.0, "requests")
    per_min = parse_rate("1000r/min")
    assert per_min.unit == "requests" and per_min.per == 60.0
    assert per_min.per_second == pytest.approx(1000 / 60)


def test_parse_rate_period_with_a_number() -> None:
    """The period may carry a number: '5r/10s' is 5 requests per 10 seconds."""
    assert parse_rate("5r/10s") == Rate(5, 10.0, "requests")
    assert parse_rate("512k/ 2s ") == Rate(512 * 1024, 2.0, "bytes")


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("4m", "expected a rate"),
        (10, "expected a rate"),
        (None, "expected a rate"),
        ("r/s", "bad request count"),
        ("0r/s", "bad request count"),
        ("1.5r/s", "bad request count"),
        ("4x/s", "bad amount"),
        ("/s", "bad amount"),
        ("0/s", "is zero"),
        ("4m/0s", "zero period"),
        ("4m/", "bad period"),
        ("4m/fortnight", "bad period"),
    ],
)
def test_parse_rate_rejects(value: object, expect: str) -> None:
    """Missing slash, zero or bad amounts and bad or zero periods are refused with a reason."""
    with pytest.raises(ValueError) as info:
        parse_rate(value)
    assert expect in str(info.value)


# ---------------------------------------------------------------- header rules


@pytest.mark.parametrize(
    ("rule", "parsed"),
    [
        ("proxy + X-Real-IP {client_ip}", HeaderRule("request", "add", "X-Real-IP", "{client_ip}")),
        ("proxy x-forward-for {client_ip}", HeaderRule("request", "set", "x-forward-for", "{client_ip}")),
        ("PROXY - Cookie", HeaderRule("request", "del", "Cookie")),
        ("proxy ? X-Id $url", HeaderRule("request", "default", "X-Id", "$url")),
        ("- etag", HeaderRule("response", "del", "etag")),
        ("? x y", HeaderRule("response", "default", "x", "y")),
        ("x y", HeaderRule("response", "set", "x", "y")),
        ("+ last-modified 'from proxy'", HeaderRule("response", "add", "last-modified", "from proxy")),
        ('+ last-modified "from proxy"', HeaderRule("response", "add", "last-modified", "from proxy")),
        ("+ via a b  c", HeaderRule("response", "add", "via", "a b c")),
        ("+ x-empty ''", HeaderRule("response", "add", "x-empty", "")),
    ],
)
def test_parse_header_rule_string_forms(rule: str, parsed: HeaderRule) -> None:
    """`proxy` targets the upstream request; + add, - delete, ? if absent, none replace; quotes group."""
    assert parse_header_rule(rule) == parsed


def test_parse_header_rule_list_form() -> None:
    """wmproxy's YAML list form ["proxy", "+", "x", "{client_ip}"] means the same as the string."""
    assert parse_header_rule(["proxy", "+", "x", "{client_ip}"]) == HeaderRule("request", "add", "x", "{client_ip}")
    assert parse_header_rule(["-", "etag"]) == HeaderRule("response", "del", "etag")
    assert parse_header_rule(("+", "x", "a b")) == HeaderRule("response", "add", "x", "a b")


@pytest.mark.parametrize(
    ("rule", "expect"),
    [
        ("+ x-forward-for", "has no value"),
        ("proxy x", "has no value"),
        ("+", "names no header"),
        ("proxy", "names no header"),
        ("", "names no header"),
        ([], "names no header"),
        ("- etag extra", "takes only a name"),
        ("+ bad:name v", "bad header name 'bad:name'"),
        ("+ bad(name) v", "bad header name"),
        ("+ x 'unclosed", "bad header rule"),
        ("+ x a\r\nInjected: yes", "line break"),
        ("+ x 'a\r\nb'", "line break"),
        ("+ x a\nb", "line break"),
        (["+", "x", "a\r\nb"], "line break"),
        (5, "expected a header rule"),
        (None, "expected a header rule"),
    ],
)
def test_parse_header_rule_rejects(rule: object, expect: str) -> None:
    """Rules without a value, with a bad name, CR/LF anywhere, or of the wrong type are refused."""
    with pytest.raises(ValueError) as info:
        parse_header_rule(rule)
    assert expect in str(info.value)


def test_parse_header_rules_list_and_single() -> None:
    """A list of rules parses in order; a single string is one rule; None is none."""
    assert parse_header_rules(["+ a 1", "- b"]) == (HeaderRule("response", "add", "a", "1"),
                                                    HeaderRule("response", "del", "b"))
    assert parse_header_rules("+ a 1") == (HeaderRule("response", "add", "a", "1"),)
    assert parse_header_rules(None) == ()
    with pytest.raises(ValueError, match="list of header rules"):
        parse_header_rules(5)


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=20)
_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789{}$._/:", min_size=1, max_size=12)


@FEW
@given(proxy=st.booleans(), op=st.sampled_from(["+", "?", ""]), name=_TOKEN,
       words=st.lists(_WORD, min_size=1, max_size=4))
def test_header_rule_string_and_list_forms_agree(proxy: bool, op: str, name: str, words: list[str]) -> None:
    """The string form and the list-of-words form of one rule parse to the same HeaderRule."""
    parts = (["proxy"] if proxy else []) + ([op] if op else []) + [name] + words
    assume(name.lower() != "proxy")
    assert parse_header_rule(" ".join(parts)) == parse_header_rule(parts)
    rule = parse_header_rule(parts)
    assert rule.name == name and rule.value == " ".join(words)
    assert rule.target == ("request" if proxy else "response")


# -------------------------------------------------------------------- IP sets


def test_parse_ipset_v4_v6_and_cidrs() -> None:
    """Space- or comma-separated IPs and CIDRs, IPv4 and IPv6, become networks."""
    s = parse_ipset("127.0.0.1 10.0.0.0/8, ::1 2001:db8::/32")
    assert [str(n) for n in s.networks] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128", "2001:db8::/32"]
    assert parse_ipset(["192.168.0.0/16", " ::1 "]).networks == (
        ipaddress.ip_network("192.168.0.0/16"), ipaddress.ip_network("::1"))


def test_parse_ipset_host_bits_are_masked() -> None:
    """A CIDR with host bits set (10.1.2.3/8) means its network, not an error."""
    assert str(parse_ipset("10.1.2.3/8")) == "10.0.0.0/8"


@pytest.mark.parametrize(
    ("ip", "member"),
    [
        ("10.1.2.3", True),
        ("127.0.0.1", True),
        ("127.0.0.2", False),
        ("11.0.0.1", False),
        ("::1", True),
        ("2001:db8:1::5", True),
        ("2001:db9::1", False),
        ("::ffff:10.9.9.9", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:11.0.0.1", False),
        ("fe80::1%eth0", False),
        ("not-an-ip", False),
        ("", False),
    ],
)
def test_ipset_membership(ip: str, member: bool) -> None:
    """`ip in set` matches v4 and v6; IPv4-mapped IPv6 clients match their IPv4 entries."""
    s = parse_ipset("10.0.0.0/8 127.0.0.1 ::1 2001:db8::/32")
    assert (ip in s) is member


def test_ipset_membership_mapped_network_and_zone() -> None:
    """An entry written as an IPv4-mapped network matches mapped clients; zone ids are ignored."""
    assert "::ffff:1.2.3.4" in parse_ipset("::ffff:0:0/96")
    assert "fe80::1%eth0" in parse_ipset("fe80::/10")


def test_ipset_membership_non_string_is_false() -> None:
    """Only strings are looked up: other objects are never members."""
    s = parse_ipset("0.0.0.0/0")
    assert 5 not in s and None not in s


def test_ipset_empty_is_falsy() -> None:
    """None, '' and [] give an empty set, which is falsy and contains nothing."""
    for v in (None, "", []):
        s = parse_ipset(v)
        assert not s and s == IPSet() and "1.2.3.4" not in s


@pytest.mark.parametrize("value", ["1.2.3", "10.0.0.0/33", "::1/129", "localhost", "1.2.3.4 nope", 5, {"a": 1}])
def test_parse_ipset_rejects_bad_entries(value: object) -> None:
    """Bad IPs, bad prefix lengths, names and other types are refused."""
    with pytest.raises(ValueError, match="IP"):
        parse_ipset(value)


@FEW
@given(net=st.ip_addresses(v=4), prefix=st.integers(0, 32), data=st.data())
def test_ipset_contains_every_address_of_its_network_v4_and_mapped(
    net: ipaddress.IPv4Address, prefix: int, data: st.DataObject
) -> None:
    """Any address inside a listed IPv4 network is a member, also in IPv4-mapped IPv6 form."""
    network = ipaddress.ip_network(f"{net}/{prefix}", strict=False)
    offset = data.draw(st.integers(0, network.num_addresses - 1))
    addr = network.network_address + offset
    s = parse_ipset(str(network))
    assert str(addr) in s
    assert f"::ffff:{addr}" in s


# ----------------------------------------------------------------------- flag


@pytest.mark.parametrize(
    ("value", "flags"),
    [
        ("http https socks5", {"http", "https", "socks5"}),
        ("http", {"http"}),
        ("HTTP, socks", {"http", "socks5"}),
        ("https|socks5", {"https", "socks5"}),
        (1, {"http"}),
        (2, {"https"}),
        (3, {"http", "https"}),
        (4, {"socks5"}),
        (5, {"http", "socks5"}),
        (6, {"https", "socks5"}),
        (7, {"http", "https", "socks5"}),
        ("7", {"http", "https", "socks5"}),
    ],
)
def test_parse_flag_words_and_bitmask(value: object, flags: set[str]) -> None:
    """Words (http https socks5, 'socks' too) or the bitmask 1 http | 2 https | 4 socks5."""
    assert parse_flag(value) == frozenset(flags)


@pytest.mark.parametrize(
    ("value", "expect"),
    [(0, "out of range"), (8, "out of range"), ("9", "out of range"), ("", "bad flag"),
     ("http ftp", "bad flag"), (True, "expected"), (7.0, "expected"), (None, "expected"), (["http"], "expected")],
)
def test_parse_flag_rejects(value: object, expect: str) -> None:
    """0, numbers above 7, unknown words, empty strings and other types are refused."""
    with pytest.raises(ValueError) as info:
        parse_flag(value)
    assert expect in str(info.value)
