"""[fleet] configuration: Redis URL grammar, defaults, errors with file and key path, shared zones."""

from __future__ import annotations

import pytest

from wmproxy_tw.config import ConfigError, load_text
from wmproxy_tw.config.grammar import RedisURL, parse_redis_url
from wmproxy_tw.control.redact import REDACTED, running_config
from wmproxy_tw.fleet import node_id_of
from wmproxy_tw.service import plan

BASE = '[proxy]\nbind = "127.0.0.1:0"\n'


def _fleet(body: str) -> str:
    return BASE + "[fleet]\n" + body


def test_redis_urls() -> None:
    """redis:// and rediss:// with user, password (percent-decoded), port and db; str() hides the password."""
    assert parse_redis_url("redis://127.0.0.1") == RedisURL("127.0.0.1")
    u = parse_redis_url("rediss://app:p%40ss@redis.example:6380/3")
    assert (u.host, u.port, u.db, u.username, u.password, u.tls) == ("redis.example", 6380, 3, "app", "p@ss", True)
    assert parse_redis_url("redis://:pw@[::1]:7000/1").password == "pw"
    assert str(u) == "rediss://redis.example:6380/3"


@pytest.mark.parametrize("bad", ["127.0.0.1:6379", "http://h", "redis://h/x", "redis://h:99999", "redis://",
                                 "redis://h/0?ssl=1", 6379])
def test_bad_redis_urls(bad: object) -> None:
    """Anything but a redis(s):// URL with a numeric db is refused with a message."""
    with pytest.raises(ValueError):
        parse_redis_url(bad)


def test_defaults() -> None:
    """No keys: the local Redis, prefix wmproxy:, a 10 s lease, fail open."""
    f = load_text(_fleet(""), "a.toml").config.fleet
    assert f is not None
    assert (f.redis, f.key_prefix, f.lease, f.fail_open, f.node_id, f.advertise) == (
        "redis://127.0.0.1:6379/0", "wmproxy:", 10.0, True, None, None)


def test_no_fleet_section_changes_nothing() -> None:
    """Without [fleet] the plan has no fleet line and the config no fleet."""
    loaded = load_text(BASE, "a.toml")
    assert loaded.config.fleet is None
    assert not any("fleet" in line for line in plan(loaded.config, control=False))


def test_full_section() -> None:
    """Every key parses: advertise as an address, lease as a duration, the plan names node and Redis."""
    text = _fleet('redis = "rediss://:pw@10.0.0.5:6380/2"\npassword = "other"\nkey_prefix = "edge:"\n'
                  'node_id = "edge-1"\nadvertise = "10.0.0.1:7001"\nsecret = "0123456789abcdef0123"\n'
                  'lease = "3s"\nfail_open = false\ntls_ca = "ca.pem"\n')
    config = load_text(text, "a.toml").config
    f = config.fleet
    assert f is not None and str(f.advertise) == "10.0.0.1:7001" and f.lease == 3.0 and not f.fail_open
    assert node_id_of(config) == "edge-1"
    assert plan(config, control=False)[0] == "fleet node edge-1 via Redis at rediss://10.0.0.5:6380/2, advertising 10.0.0.1:7001"


def test_default_node_id_is_stable_and_differs_by_advertise() -> None:
    """The default node id is hostname + suffix: the same for the same file, different per advertise."""
    a = load_text(_fleet('advertise = "127.0.0.1:7001"\n'), "a.toml").config
    b = load_text(_fleet('advertise = "127.0.0.1:7002"\n'), "a.toml").config
    assert node_id_of(a) == node_id_of(load_text(_fleet('advertise = "127.0.0.1:7001"\n'), "a.toml").config)
    assert node_id_of(a) != node_id_of(b)


@pytest.mark.parametrize("body, where", [
    ('redis = "http://h"\n', "fleet.redis"),
    ('lease = "0.1s"\n', "fleet"),
    ('lease = "soon"\n', "fleet.lease"),
    ('advertise = "nowhere"\n', "fleet.advertise"),
    ('node_id = "a b"\n', "fleet.node_id"),
    ('secret = "short"\n', "fleet.secret"),
    ('tls_ca = "ca.pem"\n', "fleet"),
    ('key_prefix = ""\n', "fleet.key_prefix"),
])
def test_errors_name_file_and_key(body: str, where: str) -> None:
    """A bad [fleet] value is an error naming the file and the key path."""
    with pytest.raises(ConfigError) as e:
        load_text(_fleet(body), "conf/edge.toml")
    assert any(line.startswith(f"conf/edge.toml: {where}:") for line in e.value.errors), e.value.errors


def test_secrets_redacted_in_now() -> None:
    """/now shows neither the secret, nor the password key, nor the URL's password."""
    text = _fleet('redis = "redis://:hunter2@10.0.0.1:6379/0"\npassword = "pw2"\nsecret = "0123456789abcdef0123"\n')
    doc = running_config(load_text(text, "a.toml").config)["fleet"]
    assert doc["secret"] == REDACTED and doc["password"] == REDACTED
    assert doc["redis"] == f"redis://:{REDACTED}@10.0.0.1:6379/0"


def test_shared_zone_needs_fleet() -> None:
    """limit_req_zone '... shared' parses (also shared=true) and needs a [fleet] section."""
    http = ('[http.limit_req_zone]\nz = "{client_ip} rate=10r/s shared=true"\n'
            '[[http.server]]\nbind_addr = "127.0.0.1:0"\nlimit_req = "zone=z"\nroot = "."\n')
    with pytest.raises(ConfigError) as e:
        load_text(http, "a.toml")
    assert e.value.errors == ["a.toml: http.limit_req_zone.z: 'shared' needs a [fleet] section "
                              "(the Redis that the nodes share)"]
    config = load_text(http + "[fleet]\n", "a.toml").config
    assert config.http is not None and config.http.limit_req_zone["z"].shared
    assert running_config(config)["http"]["limit_req_zone"]["z"].endswith(" shared")
    with pytest.raises(ConfigError):
        load_text(http.replace("shared=true", "shared=yes") + "[fleet]\n", "a.toml")
