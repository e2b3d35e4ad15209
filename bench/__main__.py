"""``make bench``: run the scenarios against ours and the peers, A B A B, medians, ratios.

    python -m bench [--quick] [--scenario NAME[,NAME]] [--workers 1|auto] [--rounds N]
    python -m bench --profile --scenario NAME      # ours only, under py-spy (or cProfile)
    python -m bench --list

Timing is reported, never asserted.  Results: bench/results/latest.json and
latest.png (ratios ours/peer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import install, peers
from .parse import Contender, Result, collapsed_top, render_table
from .peers import Ctx, Missing
from .procs import Proc, free_port, raise_nofile
from .scenarios import Running, Scenario, all_scenarios

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"


def log(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def make_files(ctx: Ctx) -> None:
    ctx.www = ctx.dir("www")
    block = bytes(range(256))
    (ctx.www / "1k").write_bytes(block * 4)
    (ctx.www / "1m").write_bytes(block * 4096)
    (ctx.www / "index.html").write_text("bench\n")
    sys.path.insert(0, str(REPO))
    from tests.tlsutil import make_cert

    ctx.cert, ctx.key = make_cert(ctx.dir("tls"), "localhost")


def check_ours(ctx: Ctx, sc: Scenario) -> tuple[str, str]:
    """('ok'|'skipped'|'error', note) from ``twistd wmproxy --check`` on each of ours' configs."""
    for name, (body, _ports) in sc.ours_configs().items():
        ok, msg = peers.check(ctx, name, body)
        if not ok:
            if "not supported yet" in msg:
                return "skipped", msg
            return "error", f"our config for {name} was refused: {msg}"
    return "ok", ""


def run_scenario(ctx: Ctx, sc: Scenario, only_ours: bool = False) -> Result:
    res = Result(sc.name, sc.title, sc.unit, sc.better, note=sc.note)
    status, note = check_ours(ctx, sc)
    names = ("ours",) if only_ours else sc.contenders
    if status != "ok":
        res.status, res.note = status, note
        log(f"  {status.upper()}: {note}")
        if not (ctx.peers_anyway and status == "skipped"):
            return res
        names = tuple(n for n in sc.contenders if n != "ours")
    res.contenders = [Contender(n) for n in names]
    running: dict[str, Running] = {}
    try:
        for c in res.contenders:
            try:
                running[c.name] = sc.start(c.name)
            except Missing as e:
                c.error = f"not run: {e}"
            except Exception as e:  # noqa: BLE001 - a peer that fails to start is reported, the others run
                c.error = f"did not start: {e}"[:300]
            if c.error:
                log(f"  {c.name}: {c.error}")
        live = [c for c in res.contenders if c.name in running]
        if res.status == "ok" and not any(c.name == "ours" for c in live):
            res.status, res.note = "error", res.contenders[0].error or "ours did not start"
            return res
        if not sc.fresh_per_round:
            for c in live:  # warm-up, discarded
                _measure(sc, c, running[c.name], min(1.0, ctx.duration), keep=False)
        for rnd in range(ctx.rounds):
            for c in live:  # A B A B ...
                if c.error and not c.values:
                    continue
                if sc.fresh_per_round and rnd > 0:  # memory: a new process each round (freed memory is kept)
                    for p in running.pop(c.name).procs:
                        p.stop()
                    try:
                        running[c.name] = sc.start(c.name)
                    except Exception as e:  # noqa: BLE001 - reported in the table
                        c.error = f"did not restart: {e}"[:300]
                        continue
                _measure(sc, c, running[c.name], ctx.duration, keep=True)
            log(f"  round {rnd + 1}/{ctx.rounds}: " + ", ".join(
                f"{c.name} {c.values[-1]:.4g}" if c.values else f"{c.name} -" for c in live))
    finally:
        for r in running.values():
            for p in r.procs:
                p.stop(signal.SIGINT if ctx.profile else signal.SIGTERM, grace=30 if ctx.profile else 5)
    ours = res.get("ours")
    if res.status == "ok" and ours is not None and not ours.values:
        res.status, res.note = "error", ours.error or "no measurement"
    return res


def _measure(sc: Scenario, c: Contender, r: Running, duration: float, keep: bool) -> None:
    dead = [p.name for p in r.procs if not p.alive()]
    if dead:
        c.error = f"{', '.join(dead)} exited: {r.procs[0].tail()}"[:300]
        return
    try:
        value, extras = sc.measure(c.name, r, duration)
    except Exception as e:  # noqa: BLE001 - a failed measurement is reported, never fatal
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
        if keep:
            c.error = str(e)[:300]
            log(f"  {c.name}: {c.error}")
        return
    if keep:
        c.values.append(value)
        c.extras.append(extras)


def print_profile(ctx: Ctx) -> None:
    for out in ctx.profile_out:
        if not out.exists():
            log(f"profile: {out} was not written")
            continue
        log(f"\n== profile of {out.parent.name} ({ctx.profile}) ==")
        if ctx.profile == "py-spy":
            rows = collapsed_top(out.read_text(), 30)
            log(f"{'self%':>6} {'total%':>7}  function")
            for func, self_pct, total_pct in rows:
                log(f"{self_pct:6.1f} {total_pct:7.1f}  {func}")
        else:
            import io
            import pstats

            buf = io.StringIO()
            pstats.Stats(str(out), stream=buf).sort_stats("tottime").print_stats(30)
            log(buf.getvalue())


def pick_profiler(ctx: Ctx) -> str:
    spy = ctx.peers_venv / "bin" / "py-spy"
    if not spy.exists():
        return "cprofile"
    # py-spy needs to read the child's memory: try it once on a trivial child.
    r = subprocess.run([str(spy), "record", "-d", "1", "-o", str(ctx.work / "spy-probe.txt"), "-f", "raw", "--",
                        sys.executable, "-c", "import time; time.sleep(0.5)"], capture_output=True, text=True, check=False)
    return "py-spy" if r.returncode == 0 else "cprofile"


def write_results(ctx: Ctx, results: list[Result], started: float) -> Path:
    RESULTS.mkdir(exist_ok=True)
    doc = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "quick": ctx.quick, "rounds": ctx.rounds, "duration": ctx.duration, "workers": ctx.workers,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "git": _git_rev(),
        "scenarios": [r.to_json() for r in results],
    }
    path = RESULTS / "latest.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _git_rev() -> str:
    r = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False)
    return r.stdout.strip()


def draw_chart(ctx: Ctx, json_path: Path) -> None:
    py = install.peers_python()
    if not py.exists():
        log("chart: no peers venv (matplotlib), skipped")
        return
    r = subprocess.run([str(py), "-m", "bench.chart", str(json_path), str(RESULTS / "latest.png")],
                       cwd=REPO, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        log(f"chart: failed: {r.stderr.strip().splitlines()[-1:]}")
    else:
        log(f"chart: {RESULTS / 'latest.png'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="", help="comma-separated names (default: all); see --list")
    ap.add_argument("--quick", action="store_true", help="short runs, fewer connections (about 2 minutes)")
    ap.add_argument("--workers", default=os.environ.get("WORKERS") or "1",
                    help="processes/threads for ours, nginx, haproxy, proxy.py: 1 (default) or auto")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per contender (default 3 quick, 5 full)")
    ap.add_argument("--duration", type=float, default=0, help="seconds per measurement (default 2 quick, 5 full)")
    ap.add_argument("--profile", action="store_true", help="run ours only, under py-spy or cProfile; print top functions")
    ap.add_argument("--peers", action="store_true",
                    help="also measure the peers of scenarios ours can't run yet (their absolute figures)")
    ap.add_argument("--profiler", choices=["auto", "py-spy", "cprofile"], default="auto")
    ap.add_argument("--no-install", action="store_true", help="don't install missing peers")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args(argv)

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="wmproxy-bench-"))
    work.chmod(0o755)
    venv = Path(os.environ.get("VENV_DIR") or REPO / ".venv").resolve()
    ctx = Ctx(repo=REPO, work=work, quick=args.quick, workers=args.workers,
              rounds=args.rounds or (3 if args.quick else 5),
              duration=args.duration or (2.0 if args.quick else 5.0),
              venv=venv, peers_venv=install.PEERS_VENV, peers_anyway=args.peers)
    ctx.nofile = raise_nofile(65536)
    scenarios = all_scenarios(ctx)
    if args.list:
        for sc in scenarios:
            log(f"{sc.name:24} {sc.title}  [vs {', '.join(sc.peers)}]")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.scenario:
        wanted = [s.strip() for s in args.scenario.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in {s.name for s in scenarios}]
        if unknown:
            log(f"unknown scenario {', '.join(unknown)}; known: {', '.join(s.name for s in scenarios)}")
            return 2
        scenarios = [s for s in scenarios if s.name in wanted]
    if args.profile:
        if len(scenarios) != 1:
            log("--profile needs one --scenario")
            return 2
        ctx.rounds = 1
        ctx.duration = max(ctx.duration, 10.0)
    if not ctx.twistd.exists():
        log(f"no {ctx.twistd}: run `make install` first")
        return 2

    log(f"bench: open files limit {ctx.nofile}; workers={ctx.workers}; rounds={ctx.rounds}; "
        f"{ctx.duration:g}s per measurement; temp dir {work}")
    if not args.no_install:
        install.ensure_all(log)
    make_files(ctx)
    if args.profile:
        ctx.profile = pick_profiler(ctx) if args.profiler == "auto" else args.profiler
        log(f"profiler: {ctx.profile}")

    shared: list[Proc] = []
    results: list[Result] = []
    try:
        ctx.origin_port = free_port()
        shared.append(peers.origin(ctx, ctx.origin_port))
        ctx.iperf_port = free_port(udp_too=True)
        shared.append(peers.iperf_server(ctx, ctx.iperf_port))
        for sc in scenarios:
            log(f"\n[{sc.name}] {sc.title}")
            try:
                results.append(run_scenario(ctx, sc, only_ours=args.profile))
            except Exception as e:  # noqa: BLE001 - one broken scenario never loses the others' results
                traceback.print_exc()
                results.append(Result(sc.name, sc.title, sc.unit, sc.better, status="error", note=str(e)[:300]))
            for p in shared:
                if not p.alive():  # the shared servers are restarted when they die (iperf3 -s can)
                    log(f"  restarting {p.name}")
                    p.start()
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        for p in shared:
            p.stop()
    if args.profile:
        print_profile(ctx)
    log("\n" + render_table(results))
    if not args.profile:
        path = write_results(ctx, results, started)
        log(f"\nresults: {path}  ({time.time() - started:.0f}s)")
        draw_chart(ctx, path)
    if args.keep:
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
