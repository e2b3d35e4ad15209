"""Install the peers the benchmark compares against (idempotent).

Debian packages through apt-get (only those missing), PyPI packages into a
separate venv ``bench/.venv-peers`` so the project's own venv stays clean.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS_VENV = HERE / ".venv-peers"

# package -> a program it provides (checked before asking apt)
DEBS = {
    "nginx-light": "/usr/sbin/nginx",
    "libnginx-mod-stream": "/usr/lib/nginx/modules/ngx_stream_module.so",
    "haproxy": "/usr/sbin/haproxy",
    "socat": "/usr/bin/socat",
    "iperf3": "/usr/bin/iperf3",
    "wrk": "/usr/bin/wrk",
    "apache2-utils": "/usr/bin/ab",
    "websockify": "/usr/bin/websockify",
    "tinyproxy": "/usr/bin/tinyproxy",
    "dante-server": "/usr/sbin/danted",
    "openssl": "/usr/bin/openssl",
}
PYPI = ["pproxy", "proxy.py", "matplotlib", "py-spy"]


def _dpkg_installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False)
    return r.returncode == 0 and "install ok installed" in r.stdout


def missing_debs() -> list[str]:
    return [p for p, path in DEBS.items() if not (Path(path).exists() or _dpkg_installed(p))]


def install_debs(log=print) -> list[str]:
    """apt-get install what is missing; return what is still missing afterwards."""
    missing = missing_debs()
    if not missing:
        return []
    if shutil.which("apt-get") is None:
        log(f"bench: no apt-get here; missing peers: {' '.join(missing)} (their scenarios are skipped)")
        return missing
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    log(f"bench: installing {' '.join(missing)} (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Keep apt from starting the packaged daemons (tinyproxy, danted) as system services.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if os.geteuid() == 0 and not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    try:
        subprocess.run(sudo + ["apt-get", "update", "-qq"], env=env, check=False)
        r = subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                           env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            log(f"bench: apt-get failed: {r.stderr.strip().splitlines()[-1:]}")
    finally:
        if made_policy:
            policy.unlink()
    return missing_debs()


def peers_python() -> Path:
    return PEERS_VENV / "bin" / "python"


def install_pypi(log=print) -> list[str]:
    """Create bench/.venv-peers and pip-install the Python peers; return what failed."""
    py = peers_python()
    if not py.exists():
        log(f"bench: creating {PEERS_VENV.relative_to(HERE.parent)}")
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    stamp = PEERS_VENV / ".installed"
    wanted = "\n".join(PYPI)
    if stamp.exists() and stamp.read_text() == wanted:
        return []
    failed = []
    for pkg in PYPI:
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", pkg], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            log(f"bench: pip install {pkg} failed: {r.stderr.strip().splitlines()[-1:]}")
            failed.append(pkg)
    if not failed:
        stamp.write_text(wanted)
    return failed


def ensure_all(log=print) -> dict[str, list[str]]:
    return {"debian": install_debs(log), "pypi": install_pypi(log)}


if __name__ == "__main__":
    print(ensure_all())
