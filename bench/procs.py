"""Processes under test: start in their own process group, wait for a port, measure, stop."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (soft, and hard when allowed) so children inherit it; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            want = hard
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        return new
    return soft


def free_port(udp_too: bool = False) -> int:
    """A port free on 127.0.0.1 now (TCP, and UDP when asked)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not udp_too:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


_TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (every core, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _TICK


def children_cpu() -> float:
    """CPU seconds of the finished child processes (e.g. the load generator)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Proc:
    """One started program (and its children: same process group)."""

    def __init__(self, name: str, argv: list[str], workdir: Path, ports: tuple[int, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.workdir, self.ports = name, argv, workdir, ports
        self.log = workdir / f"{name}.log"
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=self.workdir, env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        pending = list(self.ports)
        while pending:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}: {self.tail()}")
            if port_open(pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not listen on {pending[0]} within {timeout:.0f}s: {self.tail()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, n: int = 3) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def pids(self) -> list[int]:
        """Every live process of this program's group."""
        if self.popen is None:
            return []
        pgid = self.popen.pid
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d))
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU time of the group's live processes so far."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / _TICK

    def memory_kib(self) -> int:
        """Proportional set size of the whole group (RSS without double-counting shared pages)."""
        total = 0
        for pid in self.pids():
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
                key = "Pss:"
            except OSError:
                try:
                    text = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                key = "VmRSS:"
            for line in text.splitlines():
                if line.startswith(key):
                    total += int(line.split()[1])
                    break
        return total

    def stop(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        if self.popen is None:
            return
        pgid = self.popen.pid
        for s in (sig, signal.SIGKILL):  # then the stragglers of the group (forked children)
            try:
                os.killpg(pgid, s)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.popen = None


def run(argv: list[str], timeout: float, stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run a client program to completion: (exit code, stdout, stderr); a hang is killed."""
    try:
        r = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        return -9, (e.stdout or b"").decode(errors="replace"), f"timed out after {timeout:.0f}s"
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
