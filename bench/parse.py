"""The pure parts of the harness: read tool output, take medians, make the table.

Nothing here starts a process or touches a socket, so it is unit-tested
(tests/unit/test_bench_parse.py).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from typing import Any

_SIZE = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024**2, "MB": 1024**2, "G": 1024**3, "GB": 1024**3,
         "T": 1024**4, "TB": 1024**4}
_TIME = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _size(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)\s*([KMGT]?B?)", text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return float(m.group(1)) * _SIZE[m.group(2)]


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * _TIME[m.group(2)]


def parse_ab(text: str) -> dict[str, float]:
    """ApacheBench output → requests/s, complete, failed, non-2xx."""
    m = re.search(r"^Requests per second:\s+([\d.]+)", text, re.MULTILINE)
    if not m:
        raise ValueError("ab printed no 'Requests per second' line: " + text.strip()[-200:])
    out = {"rps": float(m.group(1))}
    for key, pat in (("complete", r"^Complete requests:\s+(\d+)"), ("failed", r"^Failed requests:\s+(\d+)"),
                     ("non2xx", r"^Non-2xx responses:\s+(\d+)")):
        m = re.search(pat, text, re.MULTILINE)
        out[key] = float(m.group(1)) if m else 0.0
    return out


def parse_wrk(text: str) -> dict[str, float]:
    """wrk output → requests/s, bytes/s, errors (connect/write/timeout + non-2xx/3xx), read errors, p50/p99 (s)."""
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    if not m:
        raise ValueError("wrk printed no 'Requests/sec' line: " + text.strip()[-200:])
    out = {"rps": float(m.group(1)), "errors": 0.0}
    m = re.search(r"^Transfer/sec:\s+(\S+)", text, re.MULTILINE)
    if m:
        out["bytes_per_s"] = _size(m.group(1))
    m = re.search(r"^\s*(\d+) requests in", text, re.MULTILINE)
    if m:
        out["requests"] = float(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        connect, read, write, timeout = (float(x) for x in m.groups())
        out["errors"] += connect + write + timeout
        out["read_errors"] = read  # mostly: the server closed a keep-alive connection after a response
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        out["errors"] += float(m.group(1))
    for pct, key in (("50", "p50"), ("99", "p99")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.MULTILINE)
        if m:
            out[key] = _seconds(m.group(1))
    return out


def parse_iperf3(text: str) -> dict[str, float]:
    """``iperf3 -J`` output → received bits/s (TCP and UDP), and loss/jitter for UDP."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"iperf3 printed no JSON ({e}): {text.strip()[-200:]}") from None
    if data.get("error"):
        raise ValueError("iperf3: " + str(data["error"]))
    end = data.get("end") or {}
    received = end.get("sum_received") or end.get("sum")
    if not received or "bits_per_second" not in received:
        raise ValueError("iperf3 JSON has no end.sum_received")
    out = {"bps": float(received["bits_per_second"])}
    udp = end.get("sum") if "lost_percent" in (end.get("sum") or {}) else None
    if udp is not None:
        out["lost_percent"] = float(udp["lost_percent"])
        out["jitter_ms"] = float(udp.get("jitter_ms", 0.0))
    sent = end.get("sum_sent")
    if sent and "retransmits" in sent:
        out["retransmits"] = float(sent["retransmits"])
    return out


# ------------------------------------------------------------------ results


@dataclass
class Contender:
    """One side of a comparison: its value per round and what went wrong."""

    name: str
    values: list[float] = field(default_factory=list)
    extras: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def extra_median(self, key: str) -> float | None:
        xs = [e[key] for e in self.extras if key in e]
        return statistics.median(xs) if xs else None


@dataclass
class Result:
    """One scenario: its contenders (ours first), or why it was skipped."""

    name: str
    title: str
    unit: str
    better: str = "higher"  # or "lower" (memory)
    status: str = "ok"  # ok | skipped | error
    note: str = ""
    ours: str = "ours"
    contenders: list[Contender] = field(default_factory=list)

    def get(self, name: str) -> Contender | None:
        return next((c for c in self.contenders if c.name == name), None)

    def ratios(self) -> dict[str, float]:
        """ours / peer for every peer with a median (for memory: lower is better)."""
        mine = self.get(self.ours)
        if mine is None or not mine.median:
            return {}
        return {c.name: ratio(mine.median, c.median) for c in self.contenders
                if c.name != self.ours and c.median}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "title": self.title, "unit": self.unit, "better": self.better,
            "status": self.status, "note": self.note, "ours": self.ours,
            "contenders": {c.name: {"values": c.values, "median": c.median, "error": c.error,
                                    "extras": c.extras} for c in self.contenders},
            "ratios": self.ratios(),
        }


def ratio(ours: float, peer: float | None) -> float:
    if not peer:
        return float("nan")
    return ours / peer


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "Gbit/s":
        return f"{v:.2f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


_FLAGS = (("read_errors", "closed by server"), ("errors", "errors"), ("failed", "failed"), ("non2xx", "non-2xx"), ("lost_percent", "loss %"),
          ("cpu_us", "CPU µs/req"), ("cores_proxy", "cores: contender"), ("cores_client", "client"),
          ("cores_busy", "machine"))


def render_table(results: list[Result]) -> str:
    """A plain-text table: one line per contender, with ours/peer ratios."""
    rows = [("scenario", "contender", "median", "unit", "ours/peer", "rounds / note")]
    for r in results:
        if r.status != "ok":
            rows.append((r.name, "-", "-", r.unit, "-", f"{r.status.upper()}: {r.note}"))
            for c in r.contenders:  # peers measured anyway (absolute figures, no ratio)
                note = " ".join(fmt_value(v, r.unit) for v in c.values)
                rows.append(("", c.name, fmt_value(c.median, r.unit), r.unit, "-", c.error or note))
            continue
        ratios = r.ratios()
        for i, c in enumerate(r.contenders):
            if c.name == r.ours:
                ratio_s = "(lower is better)" if r.better == "lower" else ""
            else:
                ratio_s = f"{ratios[c.name]:.2f}" if c.name in ratios else "-"
            note = " ".join(fmt_value(v, r.unit) for v in c.values)
            flags = [f"{label} {c.extra_median(key):.3g}" for key, label in _FLAGS if c.extra_median(key)]
            note = "; ".join(x for x in (note, ", ".join(flags), c.error or "") if x)
            if i == 0 and r.note:
                note = f"{note}  [{r.note}]"
            rows.append((r.name if i == 0 else "", c.name, fmt_value(c.median, r.unit), r.unit, ratio_s, note))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                 row[3].ljust(widths[3]), row[4].rjust(widths[4]), row[5]]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def collapsed_top(text: str, n: int = 30) -> list[tuple[str, float, float]]:
    """py-spy's raw (collapsed) stacks → top functions: (function, self %, total %), by self time."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        samples += count
        frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            total[f] = total.get(f, 0) + count
    if not samples:
        return []
    top = sorted(own.items(), key=lambda kv: -kv[1])[:n]
    return [(f, 100.0 * c / samples, 100.0 * total[f] / samples) for f, c in top]
