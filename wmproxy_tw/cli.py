"""``wmproxy``: talk to a running instance (check, reload, stop, status)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from .config import ConfigError, load_config

DEFAULT_CONTROL = "http://127.0.0.1:8837"


def _call(url: str, method: str, token: str | None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wmproxy", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_check = sub.add_parser("check", help="validate a configuration file")
    p_check.add_argument("-c", "--config", required=True)
    for name in ("reload", "stop", "status"):
        p = sub.add_parser(name, help=f"{name} a running instance")
        p.add_argument("-u", "--url", default=DEFAULT_CONTROL, help="control API address")
        p.add_argument("-t", "--token", default=None, help="control_token, if one is set")
    args = parser.parse_args(argv)

    if args.cmd == "check":
        try:
            loaded = load_config(args.config)
        except ConfigError as e:
            for line in e.errors:
                sys.stderr.write(f"wmproxy: {line}\n")
            return 1
        for w in loaded.warnings:
            sys.stderr.write(f"wmproxy: warning: {w}\n")
        sys.stdout.write(f"{args.config}: configuration OK\n")
        return 0

    url = args.url if "://" in args.url else f"http://{args.url}"
    method, path = {"reload": ("POST", "/reload"), "stop": ("POST", "/stop"), "status": ("GET", "/status")}[args.cmd]
    try:
        status, body = _call(url.rstrip("/") + path, method, args.token)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        sys.stderr.write(f"wmproxy: no instance answers at {url}: {reason}\n")
        return 1
    if status >= 400:
        sys.stderr.write(f"wmproxy: {args.cmd} failed ({status}): {body.strip()}\n")
        return 1
    if args.cmd == "status":
        try:
            sys.stdout.write(json.dumps(json.loads(body), indent=2) + "\n")
        except ValueError:
            sys.stdout.write(body)
    else:
        sys.stdout.write(body if body.endswith("\n") else body + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
