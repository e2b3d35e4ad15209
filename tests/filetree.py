"""A folder to serve in file-server tests, with a secret outside it and traps inside."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor

from wmproxy_tw.config.model import FileServer
from wmproxy_tw.reverse.files import FileHandler, FileResource

SECRET = b"TOPSECRET-5f1d2c"
OLD = 1_600_000_000  # an mtime long past: files are cacheable at once


def make_tree(base: Path) -> Path:
    """base/root (served), base/secret.txt and base/rootsecret/secret.txt (not served)."""
    root = base / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "site").mkdir()
    (base / "rootsecret").mkdir()
    (base / "secret.txt").write_bytes(SECRET + b" outside\n")
    (base / "rootsecret" / "secret.txt").write_bytes(SECRET + b" sibling\n")
    (root / "a.txt").write_bytes(b"hello world\n")
    (root / "data.bin").write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    (root / "empty.txt").write_bytes(b"")
    (root / "page.html").write_bytes(b"<html>" + b"lorem ipsum " * 500 + b"</html>\n")
    (root / "big.css").write_bytes(b"body { color: red; }\n" * 20000)  # 420 kB, streamed
    (root / "style.css").write_bytes(b"a { color: blue; }\n" * 200)
    (root / "style.css.gz").write_bytes(gzip.compress((root / "style.css").read_bytes()))
    (root / "style.css.br").write_bytes(b"BROTLI-PLACEHOLDER")
    (root / "app.js").write_bytes(b"console.log(1);\n" * 200)
    (root / "app.js.gz").write_bytes(gzip.compress((root / "app.js").read_bytes()))
    (root / "weird.xyz").write_bytes(b"???")
    (root / "noext").write_bytes(b"plain")
    (root / "sub" / "index.html").write_bytes(b"<p>sub index</p>\n")
    (root / "sub" / "deeper" / "x.txt").write_bytes(b"x\n")
    (root / "docs" / "b.txt").write_bytes(b"b" * 2000)
    (root / "docs" / "A.txt").write_bytes(b"a")
    (root / "docs" / "zdir").mkdir()
    (root / "docs" / "adir").mkdir()
    (root / "docs" / '<script>&"x.txt').write_bytes(b"xss")
    (root / "docs" / ".hidden").write_bytes(b"hidden")
    (root / "docs" / "notes.bak").write_bytes(b"bak")
    (root / "site" / "404.html").write_bytes(b"<h1>custom not found</h1>\n")
    (root / ".env").write_bytes(b"PASSWORD=x\n")
    (root / "100%.txt").write_bytes(b"percent\n")
    (root / "caf\u00e9.txt").write_bytes(b"cafe\n")
    os.mkfifo(root / "fifo")
    # symlinks: out of the root (refused) and inside it (fine)
    os.symlink(base / "secret.txt", root / "link-secret")
    os.symlink(base, root / "escape")
    os.symlink("../..", root / "sub" / "link-up")
    os.symlink(root / "a.txt", root / "link-inside")
    os.symlink(base / "rootsecret", root / "docs" / "outdir")
    os.symlink("loop", root / "loop")  # a link to itself
    for p in sorted(root.rglob("*"), reverse=True):
        if not p.is_symlink() and not p.is_fifo():
            os.utime(p, (OLD, OLD))
    return root


def serve(root: Path | str, rate_limit: Any = None, **fs: Any) -> tuple[Any, FileHandler]:
    """Listen on 127.0.0.1:0 with a FileResource for FileServer(**fs); returns (port, handler)."""
    from twisted.web import server

    handler = FileHandler(FileServer(**fs), str(root), clock=reactor, rate_limit=rate_limit)
    site = server.Site(FileResource(handler))
    site.noisy = False
    return reactor.listenTCP(0, site, interface="127.0.0.1"), handler
