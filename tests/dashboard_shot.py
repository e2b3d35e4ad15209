"""``make dashboard-shot``: the dashboard in headless Chromium, with live data, as a PNG.

Runs a ProxyService in this process: the forward proxy, the control API on a
free port, and a demo feature holding two upstream groups (one member failed,
one backup) so the upstream list has something to show until the reverse
proxy lands.  Some requests go through the proxy, then Chromium loads the page
(its script polls /status) and writes the screenshot.  Exit status 0 when the
PNG was written and the page showed the upstream members.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, utils

from wmproxy_tw import service as service_mod
from wmproxy_tw.balance import GroupSpec, MemberSpec, UpstreamGroup
from wmproxy_tw.config import Config, load_text
from wmproxy_tw.feature import BuildContext, Feature, IFeature

from .helpers import ENV, free_port, origin


class DemoUpstreams(Feature):
    """Two groups with members in different states (no listener)."""

    name = "demo"

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        web = GroupSpec(name="web", members=(MemberSpec(host="10.0.0.11", port=8080, weight=3),
                                             MemberSpec(host="10.0.0.12", port=8080, max_fails=1),
                                             MemberSpec(host="10.0.0.13", port=8080, backup=True)))
        api = GroupSpec(name="api", lb="least_conn", members=(MemberSpec(host="10.0.1.21", port=9000),
                                                              MemberSpec(host="10.0.1.22", port=9000)))
        self.upstreams = [UpstreamGroup(web, ctx.reactor), UpstreamGroup(api, ctx.reactor)]
        failed = self.upstreams[0].members[1]
        self.upstreams[0].report_failure(failed)
        self.upstreams[1].connection_started(self.upstreams[1].members[0])

    def tunnel_clients(self) -> list[dict[str, Any]]:
        return [{"name": "office-nas", "addr": "198.51.100.7:50812", "since": "09:12", "streams": 3}]


def demo_build(ctx: BuildContext, config: Config) -> list[IFeature]:
    return [DemoUpstreams(ctx)]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("dashboard-shot: no chromium found (make dashboard-shot installs Debian's chromium)")


async def main(out: Path) -> int:
    control, proxy_port = free_port(), free_port()
    service_mod.BUILDERS.append(demo_build)
    text = f'control = "127.0.0.1:{control}"\n[proxy]\nbind = "127.0.0.1:{proxy_port}"\n'
    svc = service_mod.ProxyService(reactor, load_text(text, "dashboard-demo.toml"))
    svc.bind_all()
    svc.startService()
    web = origin()
    try:
        for _ in range(25):
            await utils.getProcessOutputAndValue(
                "curl", ["-s", "-o", "/dev/null", "-x", f"http://127.0.0.1:{proxy_port}",
                         f"http://127.0.0.1:{web.getHost().port}/blob?n=40000"], env=ENV)
        out.parent.mkdir(parents=True, exist_ok=True)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,860",
                "--virtual-time-budget=4000", f"--screenshot={out}", f"http://127.0.0.1:{control}/"]
        o, err, code = await utils.getProcessOutputAndValue(chromium(), args, env=dict(ENV, HOME=str(out.parent)))
        if code != 0 or not out.exists():
            sys.stderr.write(f"dashboard-shot: chromium failed ({code}): {err.decode(errors='replace')[-2000:]}\n")
            return 1
        dom, err, code = await utils.getProcessOutputAndValue(
            chromium(), ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=4000", "--dump-dom",
                         f"http://127.0.0.1:{control}/"], env=dict(ENV, HOME=str(out.parent)))
        shown = [m for m in ("10.0.0.11:8080", "10.0.1.22:9000", "office-nas", "forward proxy") if m.encode() in dom]
        sys.stdout.write(f"dashboard-shot: wrote {out} ({out.stat().st_size} bytes); page shows {', '.join(shown)}\n")
        return 0 if len(shown) == 4 else 1
    finally:
        await web.stopListening()
        await svc.stopService()


def run() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/dashboard.png").resolve()
    result: list[int] = []

    async def go() -> None:
        result.append(await main(out))

    def stop(_: Any) -> None:
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(go()).addBoth(lambda r: (stop(r), r)[1]))
    reactor.run()
    sys.exit(result[0] if result else 1)


if __name__ == "__main__":
    run()
