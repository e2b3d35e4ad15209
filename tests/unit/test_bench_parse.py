"""The benchmark harness's pure parts: tool output parsing, medians, ratios, the table (no timing here)."""

from __future__ import annotations

import json
import math

import pytest

from bench.loadgen import socks5_reply_len, socks5_request
from bench.parse import (
    Contender,
    Result,
    collapsed_top,
    parse_ab,
    parse_iperf3,
    parse_wrk,
    render_table,
)

AB = """\
Concurrency Level:      4
Time taken for tests:   0.012 seconds
Complete requests:      200
Failed requests:        3
   (Connect: 0, Receive: 0, Length: 3, Exceptions: 0)
Non-2xx responses:      5
Total transferred:      251800 bytes
Requests per second:    16441.96 [#/sec] (mean)
Time per request:       0.243 [ms] (mean)
"""

WRK = """\
Running 1s test @ http://127.0.0.1:18099/1k
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   386.93us    0.93ms   7.19ms   89.75%
    Req/Sec    47.67k     4.66k   55.29k    80.00%
  Latency Distribution
     50%   65.00us
     75%   86.00us
     90%    1.38ms
     99%    4.58ms
  47390 requests in 1.00s, 57.13MB read
  Socket errors: connect 1, read 7, write 2, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:  47378.96
Transfer/sec:     57.11MB
"""


def _iperf(end: dict) -> str:
    return json.dumps({"start": {}, "intervals": [], "end": end})


def test_ab_figures():
    """ab: requests/s, complete, failed and non-2xx counts are read from its report."""
    r = parse_ab(AB)
    assert r == {"rps": 16441.96, "complete": 200.0, "failed": 3.0, "non2xx": 5.0}


def test_ab_without_result_is_an_error():
    """ab output without a 'Requests per second' line (it gave up) raises ValueError with the tail."""
    with pytest.raises(ValueError, match="apr_socket_recv"):
        parse_ab("Benchmarking 127.0.0.1\napr_socket_recv: Connection refused (111)\n")


def test_wrk_figures():
    """wrk: requests/s, bytes/s (binary units), errors apart from read errors, p50/p99 in seconds."""
    r = parse_wrk(WRK)
    assert r["rps"] == 47378.96
    assert r["bytes_per_s"] == pytest.approx(57.11 * 1024 * 1024)
    assert r["requests"] == 47390
    assert r["errors"] == 1 + 2 + 3 + 4  # connect + write + timeout + non-2xx
    assert r["read_errors"] == 7  # e.g. the server closing keep-alive connections
    assert r["p50"] == pytest.approx(65e-6) and r["p99"] == pytest.approx(4.58e-3)


def test_wrk_without_result_is_an_error():
    """wrk output without 'Requests/sec' raises ValueError."""
    with pytest.raises(ValueError):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_iperf3_tcp_reads_the_receiver_side():
    """iperf3 -J (TCP): the receiver's bits/s is the figure, retransmits kept."""
    r = parse_iperf3(_iperf({"sum_sent": {"bits_per_second": 2e10, "retransmits": 4},
                             "sum_received": {"bits_per_second": 1.9e10}}))
    assert r == {"bps": 1.9e10, "retransmits": 4.0}


def test_iperf3_udp_loss_and_jitter():
    """iperf3 -J -u: received bits/s plus loss % and jitter from end.sum."""
    r = parse_iperf3(_iperf({
        "sum": {"bits_per_second": 1e9, "jitter_ms": 0.01, "lost_percent": 18.8, "sender": True},
        "sum_sent": {"bits_per_second": 1e9, "lost_percent": 0},
        "sum_received": {"bits_per_second": 8.1e8, "lost_percent": 18.8}}))
    assert r["bps"] == 8.1e8 and r["lost_percent"] == 18.8 and r["jitter_ms"] == 0.01


@pytest.mark.parametrize("text", ['{"error": "unable to connect to server: Connection refused"}', "not json", "{}"])
def test_iperf3_failures_raise(text):
    """iperf3's own error, non-JSON output and a JSON without results all raise ValueError."""
    with pytest.raises(ValueError):
        parse_iperf3(text)


def _result() -> Result:
    return Result("forward_get", "t", "req/s", contenders=[
        Contender("ours", [100.0, 300.0, 200.0]),
        Contender("pproxy", [50.0, 100.0, 400.0, 100.0]),
        Contender("tinyproxy", error="not run: /usr/bin/tinyproxy is not installed"),
    ])


def test_median_and_ratio():
    """Medians per contender (even counts average the middle two); ratios are ours / peer."""
    r = _result()
    assert r.get("ours").median == 200.0
    assert r.get("pproxy").median == 100.0
    assert r.ratios() == {"pproxy": 2.0}  # no figure, no ratio


def test_json_shape():
    """to_json carries values, medians, errors and ratios, ready for latest.json."""
    doc = _result().to_json()
    assert doc["contenders"]["pproxy"]["median"] == 100.0
    assert doc["contenders"]["tinyproxy"]["error"].startswith("not run")
    assert doc["ratios"] == {"pproxy": 2.0}
    json.dumps(doc)


def test_table_rows():
    """The table has one line per contender, the ratio, the rounds, errors, and skipped scenarios' notes."""
    mem = Result("idle_http", "t", "KiB/conn", better="lower",
                 contenders=[Contender("ours", [3.0], extras=[{"errors": 2.0}]), Contender("nginx", [0.5])])
    skipped = Result("static_1k", "t", "req/s", status="skipped", note="not supported yet: http.server")
    text = render_table([_result(), mem, skipped])
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["scenario", "contender", "median", "unit", "ours/peer"]
    pproxy = next(x for x in lines if " pproxy " in x)
    assert "2.00" in pproxy and "50.0 100 400 100" in pproxy
    assert "not installed" in next(x for x in lines if "tinyproxy" in x)
    assert "(lower is better)" in next(x for x in lines if x.startswith("idle_http"))
    assert "errors 2" in next(x for x in lines if x.startswith("idle_http"))
    assert "6.00" in next(x for x in lines if " nginx " in x)
    assert "SKIPPED: not supported yet: http.server" in next(x for x in lines if x.startswith("static_1k"))


def test_ratio_of_missing_peer_is_nan():
    """A peer median of zero gives no ratio in the result (NaN would mislead the chart)."""
    r = Result("x", "t", "req/s", contenders=[Contender("ours", [1.0]), Contender("peer", [0.0])])
    assert r.ratios() == {}
    from bench.parse import ratio

    assert math.isnan(ratio(1.0, 0.0))


def test_collapsed_stacks_top():
    """py-spy raw stacks → self and total percentages per function, line numbers folded."""
    text = ("main (a.py:1);loop (a.py:5);parse (p.py:10) 6\n"
            "main (a.py:1);loop (a.py:5);parse (p.py:12) 2\n"
            "main (a.py:1);loop (a.py:6) 2\n")
    top = collapsed_top(text)
    assert top[0] == ("parse (p.py)", 80.0, 80.0)
    assert top[1] == ("loop (a.py)", 20.0, 100.0)


def test_socks5_wire_helpers():
    """The load generator's SOCKS5 request and reply framing (IPv4, IPv6, domain)."""
    assert socks5_request(("127.0.0.1", 80)) == b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
    assert socks5_request(("::1", 443))[3] == 4
    assert socks5_request(("example.test", 1))[3:5] == b"\x03\x0c"
    assert socks5_reply_len(b"\x05\x00\x00\x01\x7f\x00") is None
    assert socks5_reply_len(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x50extra") == 10
    assert socks5_reply_len(b"\x05\x00\x00\x03\x04abcd\x00\x50") == 11
