"""Plain, frozen inputs of the upstream selector (built by the config layer).

Every spec validates itself on construction and raises ``ValueError`` with a
message naming the bad field, so a bad config file fails at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LB_ALGORITHMS = frozenset({"round_robin", "random", "least_conn", "ip_hash", "hash"})
CHECK_KINDS = frozenset({"http", "tcp"})

_EXPECT_ATOM = re.compile(
    r"^(?:([1-5])xx|([1-5]\d\d)(?:-([1-5]\d\d))?)$", re.IGNORECASE
)


def parse_expect(expect: str) -> tuple[tuple[int, int], ...]:
    """Parse an ``expect`` pattern into inclusive status ranges.

    Atoms are ``2xx`` (a class), ``200`` (one status) or ``200-399`` (a range),
    separated by commas, ``|`` or spaces: ``"2xx,3xx"``, ``"200 204"``.
    """
    atoms = [a for a in re.split(r"[,|\s]+", expect.strip()) if a]
    if not atoms:
        raise ValueError(f"health_check.expect is empty: {expect!r}")
    ranges: list[tuple[int, int]] = []
    for atom in atoms:
        m = _EXPECT_ATOM.match(atom)
        if m is None:
            raise ValueError(
                f"health_check.expect: bad pattern {atom!r} (use 2xx, 200 or 200-399)"
            )
        klass, low, high = m.groups()
        if klass is not None:
            base = int(klass) * 100
            ranges.append((base, base + 99))
        else:
            lo = int(low)
            hi = int(high) if high is not None else lo
            if hi < lo:
                raise ValueError(f"health_check.expect: empty range {atom!r}")
            ranges.append((lo, hi))
    return tuple(ranges)


def format_addr(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class MemberSpec:
    """One upstream server of a group (``{ addr = "host:port", weight = 1, ... }``)."""

    host: str
    port: int
    weight: int = 1
    max_fails: int = 3
    fail_timeout: float = 30.0
    backup: bool = False
    down: bool = False

    def __post_init__(self) -> None:
        where = f"upstream member {self.host}:{self.port}"
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"{where}: host must be a non-empty string")
        if not _is_int(self.port) or not 1 <= self.port <= 65535:
            raise ValueError(f"{where}: port must be 1..65535")
        if not _is_int(self.weight) or self.weight < 1:
            raise ValueError(
                f"{where}: weight must be an integer >= 1, got {self.weight!r}"
            )
        if not _is_int(self.max_fails) or self.max_fails < 0:
            raise ValueError(f"{where}: max_fails must be an integer >= 0")
        if not _is_number(self.fail_timeout) or not self.fail_timeout > 0:
            raise ValueError(f"{where}: fail_timeout must be > 0 seconds")

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def addr_str(self) -> str:
        return format_addr(self.host, self.port)


@dataclass(frozen=True)
class HealthCheckSpec:
    """Active health check of a group (``health_check = { interval = "2s", ... }``).

    ``kind = "http"`` sends ``GET path`` and matches the status against
    ``expect``; ``kind = "tcp"`` only connects (stream groups).
    """

    interval: float = 2.0
    path: str | None = "/health"
    expect: str = "2xx"
    timeout: float = 1.0
    fall: int = 3
    rise: int = 2
    kind: str = "http"

    def __post_init__(self) -> None:
        if self.kind not in CHECK_KINDS:
            raise ValueError(f"health_check.kind must be one of {sorted(CHECK_KINDS)}")
        if not _is_number(self.interval) or not self.interval > 0:
            raise ValueError("health_check.interval must be > 0 seconds")
        if not _is_number(self.timeout) or not self.timeout > 0:
            raise ValueError("health_check.timeout must be > 0 seconds")
        if not _is_int(self.fall) or self.fall < 1:
            raise ValueError("health_check.fall must be an integer >= 1")
        if not _is_int(self.rise) or self.rise < 1:
            raise ValueError("health_check.rise must be an integer >= 1")
        if self.kind == "http":
            path = self.path
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(
                    "health_check.path must start with '/' for http checks"
                )
            if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in path):
                raise ValueError(
                    "health_check.path must not contain spaces or control characters"
                )
            if not path.isascii():
                raise ValueError("health_check.path must be ASCII (percent-encode it)")
            parse_expect(self.expect)

    def accepts(self, status: int) -> bool:
        """True when an HTTP status matches ``expect``."""
        return any(lo <= status <= hi for lo, hi in parse_expect(self.expect))


@dataclass(frozen=True)
class GroupSpec:
    """An upstream group (``[[http.upstream]]`` / stream ``up_name``)."""

    name: str
    members: tuple[MemberSpec, ...]
    lb: str = "round_robin"
    hash_key: str | None = None
    health_check: HealthCheckSpec | None = None

    def __post_init__(self) -> None:
        where = f"upstream {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("upstream group name must be a non-empty string")
        if not isinstance(self.members, tuple) or not self.members:
            raise ValueError(
                f"{where}: needs at least one member (a tuple of MemberSpec)"
            )
        seen: set[tuple[str, int]] = set()
        for spec in self.members:
            if not isinstance(spec, MemberSpec):
                raise TypeError(f"{where}: members must be MemberSpec, got {spec!r}")
            if spec.addr in seen:
                raise ValueError(f"{where}: member {spec.addr_str} listed twice")
            seen.add(spec.addr)
        if self.lb not in LB_ALGORITHMS:
            raise ValueError(
                f"{where}: lb must be one of {sorted(LB_ALGORITHMS)}, got {self.lb!r}"
            )
        if self.lb == "hash" and not self.hash_key:
            raise ValueError(f'{where}: lb = "hash" needs hash_key (e.g. "{{path}}")')
