"""Twisted's stock servers as benchmark peers (issues #3 and #4 compare against them).

    python bench/twisted_peer.py proxy PORT ORIGIN_PORT   # twisted.web.proxy.ReverseProxyResource
    python bench/twisted_peer.py static PORT FOLDER       # twisted.web.static.File

Run with the project's venv (the same Twisted as ours), the default reactor,
one process.  Access logging is off (as in our benchmark configs), so the
peer is, if anything, a little faster than Twisted out of the box.
"""

from __future__ import annotations

import sys


def main() -> None:
    from twisted.internet import reactor
    from twisted.web import proxy, server, static

    mode, port, arg = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode == "proxy":
        root = proxy.ReverseProxyResource("127.0.0.1", int(arg), b"")
    elif mode == "static":
        root = static.File(arg)
    else:
        raise SystemExit(f"unknown mode {mode!r}: proxy or static")

    class QuietSite(server.Site):
        noisy = False

        def log(self, request: object) -> None:
            pass

    reactor.listenTCP(port, QuietSite(root), backlog=4096, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
