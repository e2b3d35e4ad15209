"""``file_server``: static files of one location (SPEC §4).

:class:`FileHandler` is what the reverse pipeline calls for a location with a
``file_server``: ``render(request, path)`` answers the request, ``exists(path)``
is the check ``try_paths`` uses.  :class:`FileResource` wraps it as a plain
twisted.web resource (the ``file-server`` quick mode, tests).

Containment: the URL path is percent-decoded exactly once; NUL bytes and
backslashes are refused (400); ``.`` and ``..`` segments are resolved and a
path climbing above the root is refused (400); the result is resolved with
``realpath`` and must stay under the root's real path (404 otherwise) unless
``follow_symlinks = true``; ``hide`` patterns answer 404; only regular files
are opened (never a FIFO or device).  Errors are answered, never raised.

Bodies are streamed by a pull producer (:class:`FileSender`), 64 KiB at a
time; small files may come from a bounded in-memory cache (:class:`FileCache`)
checked against the file's inode, size and mtime on every request.
"""

from __future__ import annotations

import errno
import fnmatch
import html
import io
import os
import stat
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_from_bytes, unquote_to_bytes

from twisted.internet.interfaces import IPullProducer, IReactorTime
from twisted.logger import Logger
from twisted.web import resource, server
from zope.interface import implementer

from ..config.grammar import Rate
from ..config.model import FileServer, Location
from ..limits import Throttle, connection_bucket
from .conditional import (
    RangeResult,
    accepted_encodings,
    http_date,
    if_range_allows,
    make_etag,
    parse_range,
    preconditions,
)
from .http2 import serve_h2
from .mime import MimeTable, compressible
from .request import end_incomplete

__all__ = ["FileCache", "FileHandler", "FileResource", "FileSender", "PathError", "as_raw", "file_site",
           "split_path"]

_log = Logger()

CHUNK = 64 * 1024
#: Directory listings stop after this many entries (a note says so).
MAX_LISTING = 10_000
#: Files changed less than this long ago are not cached (coarse mtimes).
SETTLE = 1.0

PathLike = str | bytes


class PathError(Exception):
    """A request path that cannot name a file under the root: ``status`` to answer."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def _raw_bytes(path: PathLike) -> bytes:
    if isinstance(path, bytes):
        return path
    try:
        return path.encode("latin-1")  # request paths arrive as bytes decoded 1:1
    except UnicodeEncodeError:
        return path.encode("utf-8")


#: Characters left as they are when a decoded path is encoded again.
_SAFE = "/!$&'()*+,;=:@~-._"


def as_raw(path: PathLike, encoded: bool = True) -> bytes:
    """A path as it would be sent: ``encoded=False`` means ``path`` is already
    percent-decoded (e.g. a ``try_paths`` candidate built from ``{path}``), so it
    is encoded again and decoded exactly once later."""
    raw = _raw_bytes(path)
    return raw if encoded else quote_from_bytes(raw, safe=_SAFE).encode("ascii")


def split_path(path: PathLike, prefix: str = "") -> tuple[list[str], bool]:
    """The URL path (as sent: percent-encoded, no query) as safe segments under
    the root, and whether it ended with ``/``.  Raises :class:`PathError`."""
    raw = _raw_bytes(path)
    if not raw.startswith(b"/"):
        raise PathError(400, "path does not start with /")
    if b"\x00" in raw or b"\\" in raw:
        raise PathError(400, "NUL or backslash in path")
    if b"%" in raw:
        decoded = unquote_to_bytes(raw)
        if b"\x00" in decoded or b"\\" in decoded:
            raise PathError(400, "encoded NUL or backslash in path")
    else:
        decoded = raw
    text = decoded.decode("ascii") if decoded.isascii() else os.fsdecode(decoded)
    if prefix:
        if text == prefix or text.startswith(prefix + "/"):
            text = text[len(prefix):]  # "" for the prefix itself: a directory without its '/'
        else:
            raise PathError(404, "outside the file server's prefix")
    segments: list[str] = []
    for seg in text.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not segments:
                raise PathError(400, "path climbs above the root")
            segments.pop()
        else:
            segments.append(seg)
    return segments, text.endswith("/")


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root if root.endswith(os.sep) else root + os.sep)


# ------------------------------------------------------------------ the cache

@dataclass
class _Entry:
    ident: tuple[int, int, int]
    data: bytes
    gz: bytes | None = None
    #: The response fields of a plain 200 for this file, per handler (see FileHandler._plain_fields).
    heads: dict[Any, tuple[tuple[tuple[bytes, bytes], ...], bool, bytes]] = field(default_factory=dict)


class FileCache:
    """Small hot files in memory: at most ``max_file`` bytes each, ``max_total``
    in all, least recently used dropped first.  An entry is only used while the
    file's (inode, size, mtime) is unchanged."""

    def __init__(self, max_file: int = 64 * 1024, max_total: int = 16 * 1024 * 1024) -> None:
        self.max_file = max_file
        self.max_total = max_total
        self.total = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.hits = 0

    @staticmethod
    def ident(st: os.stat_result) -> tuple[int, int, int]:
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def get(self, path: str, st: os.stat_result) -> _Entry | None:
        entry = self._entries.get(path)
        if entry is None:
            return None
        if entry.ident != self.ident(st):
            self._drop(path)
            return None
        self._entries.move_to_end(path)
        self.hits += 1
        return entry

    def put(self, path: str, st: os.stat_result, data: bytes) -> _Entry | None:
        if len(data) > self.max_file or len(data) != st.st_size:
            return None
        self._drop(path)
        entry = _Entry(self.ident(st), data)
        self._entries[path] = entry
        self.total += len(data)
        self._trim()
        return entry

    def add_gzip(self, entry: _Entry, gz: bytes) -> None:
        entry.gz = gz
        self.total += len(gz)
        self._trim()

    def _drop(self, path: str) -> None:
        entry = self._entries.pop(path, None)
        if entry is not None:
            self.total -= len(entry.data) + len(entry.gz or b"")

    def _trim(self) -> None:
        while self.total > self.max_total and self._entries:
            _path, entry = self._entries.popitem(last=False)
            self.total -= len(entry.data) + len(entry.gz or b"")

    def __len__(self) -> int:
        return len(self._entries)


# --------------------------------------------------------------- the producer

@implementer(IPullProducer)
class FileSender:
    """Streams ``length`` bytes (None: to the end) of ``source`` into ``consumer``.

    ``transform`` (a zlib compressor) turns each chunk into what is written.
    ``done(ok)`` is called once: ``ok`` False if the file ended early or could
    not be read (the caller must then abort: the body is incomplete).
    """

    def __init__(self, source: Any, length: int | None, consumer: Any,
                 done: Callable[[bool], None], chunk: int = CHUNK, transform: Any = None) -> None:
        self.source = source
        self.remaining = length
        self.consumer = consumer
        self.done = done
        self.chunk = chunk
        self.transform = transform
        self._eof = False
        self._finished = False

    def start(self) -> None:
        self.consumer.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self._eof or self._finished:
            return
        out = b""
        try:
            while not out and not self._eof:
                n = self.chunk if self.remaining is None else min(self.chunk, self.remaining)
                data = self.source.read(n) if n > 0 else b""
                if self.remaining is not None:
                    if not data and self.remaining > 0:
                        _log.warn("file ended {n} bytes early while sending it", n=self.remaining)
                        self._finish(False)
                        return
                    self.remaining -= len(data)
                self._eof = not data or self.remaining == 0
                out = self.transform.compress(data) if self.transform is not None else data
                if self._eof and self.transform is not None:
                    out += self.transform.flush()
        except OSError as e:
            _log.warn("cannot read a file being sent: {e}", e=e)
            self._finish(False)
            return
        if out:
            self.consumer.write(out)
        if self._eof:
            self._finish(True)

    def pauseProducing(self) -> None:  # for consumers that treat every producer alike
        pass

    def stopProducing(self) -> None:
        if not self._finished:
            self._finished = True
            self.source.close()

    def _finish(self, ok: bool) -> None:
        if self._finished:
            return
        self._finished = True
        self.source.close()
        try:
            self.consumer.unregisterProducer()
        finally:
            self.done(ok)


# ---------------------------------------------------------------- the handler

def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


_TEXT = "text/plain; charset=utf-8"
_CONDITIONAL = (b"accept-encoding", b"range", b"if-range", b"if-match", b"if-none-match",
                b"if-modified-since", b"if-unmodified-since")
_CORS_FIELDS = ((b"Access-Control-Allow-Origin", b"*"),
                (b"Access-Control-Expose-Headers", b"Content-Length, Content-Range, ETag, Last-Modified, Accept-Ranges"))
_CONDITIONAL_NAMES = frozenset(n.decode() for n in _CONDITIONAL)


def _request_fields(request: Any) -> dict[str, str]:
    """The request fields the file server looks at (lower-case name → values joined
    with ", "): read from the parsed head when the request has one, in one pass."""
    head = getattr(request, "head", None)
    if head is None:
        out = {}
        raw_headers = request.requestHeaders
        for name in _CONDITIONAL:
            values = raw_headers.getRawHeaders(name)
            if values:
                out[name.decode()] = b", ".join(values).decode("latin-1")
        return out
    found: dict[str, str] = {}
    names = getattr(request, "lower_names", None) or [name.lower() for name, _ in head.headers]
    for (_name, value), lname in zip(head.headers, names, strict=True):
        if lname in _CONDITIONAL_NAMES:
            found[lname] = found[lname] + ", " + value if lname in found else value
    return found
_REASONS = {301: "Moved Permanently", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 412: "Precondition Failed", 416: "Range Not Satisfiable"}


class FileHandler:
    """Serves one ``file_server`` (its own ``root``, else the location's, else
    the working directory).  ``rate_limit`` paces response bodies per connection.

    The reverse pipeline's handler seam: ``render(request, ctx)``,
    ``exists(path)`` (for ``try_paths``), ``streams_body = False`` (a body sent
    with GET is drained first).
    """

    streams_body = False

    def __init__(self, config: FileServer, root: str | None = None, *, clock: IReactorTime,
                 rate_limit: Rate | None = None, cache: FileCache | None = None,
                 gzip_level: int = 6) -> None:
        self.config = config
        self.root = os.path.realpath(config.root or root or ".")
        self.prefix = config.prefix.rstrip("/")
        self.clock = clock
        self.rate_limit = rate_limit
        self.cache = cache if cache is not None else FileCache()
        self.mime = MimeTable(config.ext_mimetype, config.default_mimetype)
        self.hide = tuple(config.hide)
        self.index = tuple(config.index)
        self.gzip_level = gzip_level
        methods = ["GET", "HEAD"] + (["OPTIONS"] if config.cors else [])
        self.allow = ", ".join(methods)

    @classmethod
    def from_location(cls, location: Location, clock: IReactorTime,
                      cache: FileCache | None = None) -> FileHandler:
        """The handler of a location that has ``file_server`` (inheritance resolved)."""
        if location.file_server is None:
            raise ValueError("location has no file_server")
        return cls(location.file_server, location.root, clock=clock,
                   rate_limit=location.rate_limit, cache=cache)

    # -- lookup ----------------------------------------------------------------
    def _hidden(self, segments: list[str]) -> bool:
        if not self.hide:
            return False
        rel = "/".join(segments)
        for pattern in self.hide:
            if "/" in pattern.strip("/"):
                if fnmatch.fnmatchcase(rel, pattern.strip("/")):
                    return True
            elif any(fnmatch.fnmatchcase(seg, pattern.strip("/")) for seg in segments):
                return True
        return False

    def _lookup(self, segments: list[str]) -> tuple[str, os.stat_result | None]:
        """The file system path of ``segments`` and its stat (None: missing).

        PathError(404) if hidden or if it leaves the root.  One ``lstat`` per
        segment under the (already real) root; only a path with a symbolic link
        in it is resolved with ``realpath`` and checked against the root.
        """
        if self._hidden(segments):
            raise PathError(404, "hidden")
        if self.config.follow_symlinks:
            full = os.path.join(self.root, *segments)
            return full, self._stat(full)
        path, st = self.root, None
        for seg in segments:
            path = os.path.join(path, seg)
            try:
                st = os.lstat(path)
            except (OSError, ValueError):
                return path, None
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(os.path.join(self.root, *segments))
                if not _inside(real, self.root):
                    raise PathError(404, "leaves the root")
                return real, self._stat(real)
        return path, st if st is not None else self._stat(path)

    def _stat(self, path: str) -> os.stat_result | None:
        try:
            return os.stat(path)
        except (OSError, ValueError):
            return None

    def _index_of(self, segments: list[str]) -> tuple[str, os.stat_result] | None:
        for name in self.index:
            try:
                real, st = self._lookup(segments + [name])
            except PathError:
                continue
            if st is not None and stat.S_ISREG(st.st_mode):
                return real, st
        return None

    def exists(self, path: PathLike, *, encoded: bool = True) -> bool:
        """Would GET ``path`` be served (``try_paths``)?  A path ending in ``/``
        names a directory with an index file or a listing; others a regular file."""
        try:
            segments, slash = split_path(as_raw(path, encoded), self.prefix)
            _real, st = self._lookup(segments)
        except PathError:
            return False
        if st is None:
            return False
        if stat.S_ISDIR(st.st_mode):
            return slash and (self.config.browse or self._index_of(segments) is not None)
        return stat.S_ISREG(st.st_mode) and not slash

    # -- answering ---------------------------------------------------------------
    def render(self, request: Any, ctx: Any = None, *, path: PathLike | None = None,
               encoded: bool = True) -> Any:
        """Answer ``request`` (the reverse pipeline's ``IHandler.render(request,
        ctx)``; ``ctx`` is not needed).  ``path`` overrides the request's own path
        (as sent, without query; ``encoded=False`` for a decoded path).  Returns
        ``NOT_DONE_YET``: the response is finished here or by the producer."""
        raw = as_raw(path, encoded) if path is not None else _raw_bytes(request.path)
        try:
            self._render(request, raw)
        except PathError as e:
            self._error(request, e.status)
        return server.NOT_DONE_YET

    def _render(self, request: Any, raw: bytes) -> None:
        method = request.method.decode("ascii", "replace").upper()
        if method == "OPTIONS" and self.config.cors:
            request.setResponseCode(204)
            self._cors(request, preflight=True)
            request.setHeader(b"allow", self.allow.encode())
            request.setHeader(b"content-length", b"0")
            request.finish()
            return
        if method not in ("GET", "HEAD"):
            request.setHeader(b"allow", self.allow.encode())
            self._error(request, 405)
            return
        if self.config.robots is not None and raw == b"/robots.txt":
            self._cors(request)
            self._bytes(request, 200, self.config.robots.encode(), _TEXT)
            return
        segments, slash = split_path(raw, self.prefix)
        real, st = self._lookup(segments)
        if st is None:
            raise PathError(404, "not found")
        if stat.S_ISDIR(st.st_mode):
            if not slash:
                self._redirect_slash(request, raw)
                return
            found = self._index_of(segments)
            if found is not None:
                self._file(request, method, found[0], found[1])
            elif self.config.browse:
                self._listing(request, real, raw)
            else:
                raise PathError(404, "directory without index")
            return
        if not stat.S_ISREG(st.st_mode) or slash:
            raise PathError(404, "not a regular file")
        self._file(request, method, real, st)

    # -- files -----------------------------------------------------------------
    def _sibling(self, real: str, suffix: str) -> tuple[str, os.stat_result] | None:
        path = real + suffix
        if not self.config.follow_symlinks:
            path = os.path.realpath(path)
            if not _inside(path, self.root):
                return None
        st = self._stat(path)
        if st is not None and stat.S_ISREG(st.st_mode):
            return path, st
        return None

    def _file(self, request: Any, method: str, real: str, st: os.stat_result) -> None:
        headers = _request_fields(request)
        if (method == "GET" and (not headers or (len(headers) == 1 and "accept-encoding" in headers))
                and self._send_plain(request, real, st, headers)):
            return
        mime = self.mime(real)
        accepted = accepted_encodings(headers.get("accept-encoding"))
        encoding: str | None = None
        vary = False
        if self.config.precompressed:
            for coding, suffix in (("br", ".br"), ("gzip", ".gz")):
                sib = self._sibling(real, suffix)
                if sib is not None:
                    vary = True
                    if encoding is None and coding in accepted:
                        encoding, (real, st) = coding, sib
        size = st.st_size
        mtime = int(st.st_mtime)
        etag = make_etag(st.st_mtime, size)
        on_the_fly = False
        if encoding is None and self.config.gzip and size >= self.config.gzip_min_length and compressible(mime):
            vary = True
            if "gzip" in accepted:
                on_the_fly = True

        # validators first (they see the identity ETag unless the body is gzipped here)
        rng = RangeResult(200)
        if "range" in headers and if_range_allows(headers.get("if-range"), etag, mtime):
            rng = parse_range(headers["range"], size)
        if rng.status != 200:
            on_the_fly = False  # ranges are served from the identity bytes
        if on_the_fly:
            etag = make_etag(st.st_mtime, size, weak=True)
        decided = preconditions(method, headers, etag, mtime)

        request.setHeader(b"last-modified", http_date(mtime).encode())
        request.setHeader(b"etag", etag.encode())
        if vary:
            request.setHeader(b"vary", b"Accept-Encoding")
        self._caching(request)
        self._cors(request)
        if decided == 304:
            request.setResponseCode(304)
            request.finish()
            return
        if decided == 412:
            self._error(request, 412)
            return
        request.setHeader(b"content-type", mime.encode())
        if encoding is not None:
            request.setHeader(b"content-encoding", encoding.encode())
        if not on_the_fly:
            request.setHeader(b"accept-ranges", b"bytes")
        if rng.status == 416:
            request.setHeader(b"content-range", rng.content_range(size).encode())
            self._bytes(request, 416, b"416 Range Not Satisfiable\n", _TEXT)
            return
        start, length = (rng.start, rng.length) if rng.status == 206 else (0, size)
        if rng.status == 206:
            request.setResponseCode(206)
            request.setHeader(b"content-range", rng.content_range(size).encode())
        if on_the_fly:
            request.setHeader(b"content-encoding", b"gzip")
        entry = self._cached(real, st)
        if on_the_fly:
            if entry is not None:
                if entry.gz is None:
                    self.cache.add_gzip(entry, self._gzip_all(entry.data))
                self._send_bytes(request, method, entry.gz or b"")
            elif method == "HEAD":
                request.finish()
            else:
                self._send_file(request, real, 0, size, self._compressor())  # a file cut short is noticed
            return
        request.setHeader(b"content-length", str(length).encode())
        if method == "HEAD":
            request.finish()
        elif entry is not None:
            self._send_bytes(request, method, entry.data[start:start + length], length_set=True)
        else:
            self._send_file(request, real, start, length)

    def _send_plain(self, request: Any, real: str, st: os.stat_result, headers: dict[str, str]) -> bool:
        """The common case, answered from the cache: GET without validators or
        ranges, a cached file, no sibling or on-the-fly encoding.  The response
        fields are computed once per file version (the entry is dropped when
        the file's inode, size or mtime changes) and written with the body in
        one write.  False: take the general path."""
        set_raw = getattr(request, "set_raw_response", None)
        if (set_raw is None or not hasattr(request, "write_whole") or self.config.precompressed or self.rate_limit is not None
                or request.code != 200 or st.st_size > self.cache.max_file):
            return False
        entry = self._cached(real, st)
        if entry is None:
            return False
        plain = entry.heads.get(self)
        if plain is None:
            fields, gzippable = self._plain_fields(real, st)
            block = b"".join(b"%s: %s\r\n" % kv for kv in fields)
            plain = entry.heads[self] = (fields, gzippable, block)
        fields, gzippable, block = plain
        if gzippable and "gzip" in accepted_encodings(headers.get("accept-encoding")):
            return False
        if not request.write_whole(200, b"OK", block, entry.data):
            set_raw(200, b"OK", list(fields), has_length=True, has_date=False)
            request.write(entry.data)
        request.finish()
        return True

    def _plain_fields(self, real: str, st: os.stat_result) -> tuple[tuple[tuple[bytes, bytes], ...], bool]:
        """The fields :meth:`_file` sets for a plain 200 of this file, in the same
        order and spelling (twisted.web's canonical names), and whether gzip on
        the fly could apply (then the answer depends on Accept-Encoding)."""
        mime = self.mime(real)
        size = st.st_size
        gzippable = bool(self.config.gzip and size >= self.config.gzip_min_length and compressible(mime))
        fields = [(b"Last-Modified", http_date(int(st.st_mtime)).encode()),
                  (b"ETag", make_etag(st.st_mtime, size).encode())]
        if gzippable:
            fields.append((b"Vary", b"Accept-Encoding"))
        if self.config.cache_time is not None:
            fields.append((b"Cache-Control", self._cache_control()))
        if self.config.cors:
            fields += _CORS_FIELDS
        fields += [(b"Content-Type", mime.encode()), (b"Accept-Ranges", b"bytes"),
                   (b"Content-Length", str(size).encode())]
        return tuple(fields), gzippable

    def _cached(self, real: str, st: os.stat_result) -> _Entry | None:
        if st.st_size > self.cache.max_file:
            return None
        entry = self.cache.get(real, st)
        if entry is not None or self.clock.seconds() - st.st_mtime < SETTLE:
            return entry
        try:
            with open(real, "rb", buffering=0) as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    return None
                data = f.read(self.cache.max_file + 1)
        except OSError:
            return None
        return self.cache.put(real, st, data)

    def _compressor(self) -> Any:
        return zlib.compressobj(self.gzip_level, zlib.DEFLATED, 31)

    def _gzip_all(self, data: bytes) -> bytes:
        c = self._compressor()
        return c.compress(data) + c.flush()

    def _open(self, real: str) -> Any:
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        if not self.config.follow_symlinks:
            flags |= getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(real, flags)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            return os.fdopen(fd, "rb", buffering=0)
        except BaseException:
            os.close(fd)
            raise

    def _consumer(self, request: Any) -> Any:
        if self.rate_limit is None:
            return request
        return Throttle(request, connection_bucket(request.channel, self.rate_limit, self.clock), self.clock)

    def _send_file(self, request: Any, real: str, start: int, length: int | None,
                   transform: Any = None) -> None:
        try:
            f = self._open(real)
            if start:
                f.seek(start)
        except OSError as e:
            _log.info("cannot open {path}: {e}", path=real, e=e)
            request.responseHeaders.removeHeader(b"content-encoding")
            self._error(request, 404)
            return
        self._stream(request, f, length, transform)

    def _send_bytes(self, request: Any, method: str, data: bytes, length_set: bool = False) -> None:
        if not length_set:
            request.setHeader(b"content-length", str(len(data)).encode())
        if method == "HEAD":
            request.finish()
        elif self.rate_limit is None:
            request.write(data)
            request.finish()
        else:
            self._stream(request, io.BytesIO(data), len(data))

    def _stream(self, request: Any, source: Any, length: int | None, transform: Any = None) -> None:
        consumer = self._consumer(request)
        gone: list[bool] = []

        def done(ok: bool) -> None:
            if gone:
                return
            if ok:
                request.finish()
            else:
                end_incomplete(request)

        def lost(_: Any) -> None:
            gone.append(True)
            sender.stopProducing()

        chunk = min(CHUNK, getattr(consumer, "chunk", CHUNK))
        sender = FileSender(source, length, consumer, done, chunk, transform)
        request.notifyFinish().addErrback(lost)
        sender.start()

    # -- other responses -------------------------------------------------------
    def _bytes(self, request: Any, status: int, body: bytes, content_type: str) -> None:
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type.encode())
        self._send_bytes(request, request.method.decode("ascii", "replace").upper(), body)

    def error(self, request: Any, status: int) -> None:
        """Answer ``status`` the way this file server does (``path404`` for 404)."""
        self._error(request, status)

    def _error(self, request: Any, status: int) -> None:
        for name in (b"etag", b"last-modified", b"content-range", b"accept-ranges", b"vary",
                     b"cache-control", b"content-encoding"):
            request.responseHeaders.removeHeader(name)
        if status == 404 and self.config.path404 and self._page404(request):
            return
        body = f"{status} {_REASONS.get(status, 'Error')}\n".encode()
        self._bytes(request, status, body, _TEXT)

    def _page404(self, request: Any) -> bool:
        try:
            segments, _ = split_path(_raw_bytes(self.config.path404 or ""))
            real, _st = self._lookup(segments)
            f = self._open(real)
        except (PathError, OSError):
            return False
        size = os.fstat(f.fileno()).st_size
        request.setResponseCode(404)
        request.setHeader(b"content-type", self.mime(real).encode())
        request.setHeader(b"content-length", str(size).encode())
        if request.method == b"HEAD":
            f.close()
            request.finish()
        else:
            self._stream(request, f, size)
        return True

    def _redirect_slash(self, request: Any, raw: bytes) -> None:
        query = request.uri.partition(b"?")
        location = raw + b"/" + (b"?" + query[2] if query[1] else b"")
        request.setHeader(b"location", location)
        body = b"301 Moved Permanently\n"
        self._bytes(request, 301, body, _TEXT)

    def _caching(self, request: Any) -> None:
        if self.config.cache_time is not None:
            request.setHeader(b"cache-control", self._cache_control())

    def _cache_control(self) -> bytes:
        return f"max-age={int(self.config.cache_time or 0)}".encode()

    def _cors(self, request: Any, preflight: bool = False) -> None:
        if not self.config.cors:
            return
        for name, value in _CORS_FIELDS:
            request.setHeader(name, value)
        if preflight:
            request.setHeader(b"access-control-allow-methods", self.allow.encode())
            request.setHeader(b"access-control-allow-headers",
                              b"Origin, X-Requested-With, Content-Type, Accept, Range, "
                              b"If-None-Match, If-Modified-Since, If-Range")
            request.setHeader(b"access-control-max-age", b"86400")

    def _listing(self, request: Any, real: str, raw: bytes) -> None:
        entries: list[tuple[bool, str, int, float]] = []
        truncated = False
        try:
            with os.scandir(real) as it:
                for entry in it:
                    if len(entries) >= MAX_LISTING:
                        truncated = True
                        break
                    row = self._listing_row(entry)
                    if row is not None:
                        entries.append(row)
        except OSError as e:
            _log.info("cannot list {path}: {e}", path=real, e=e)
            raise PathError(404, "unreadable directory") from None
        entries.sort(key=lambda r: (not r[0], r[1].lower(), r[1]))
        title = html.escape(os.fsdecode(unquote_to_bytes(raw)), quote=True)
        rows = []
        if raw.rstrip(b"/") != self.prefix.encode() and raw != b"/":
            rows.append('<tr><td><a href="../">../</a></td><td></td><td></td></tr>')
        for is_dir, name, size, mtime in entries:
            href = quote(os.fsencode(name)) + ("/" if is_dir else "")
            shown = html.escape(name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), quote=True)
            rows.append(
                f'<tr><td><a href="{html.escape(href, quote=True)}">{shown}{"/" if is_dir else ""}</a></td>'
                f'<td class="size">{"-" if is_dir else _human(size)}</td>'
                f'<td>{html.escape(http_date(mtime))}</td></tr>'
            )
        if truncated:
            rows.append(f"<tr><td colspan=3>(listing stops after {MAX_LISTING} entries)</td></tr>")
        page = (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width">'
            f"<title>Index of {title}</title>"
            "<style>body{font-family:sans-serif}td{padding:0 1em}td.size{text-align:right}</style>"
            f"</head><body><h1>Index of {title}</h1>\n<table>\n"
            "<tr><th>Name</th><th>Size</th><th>Modified</th></tr>\n"
            + "\n".join(rows)
            + "\n</table></body></html>\n"
        )
        self._cors(request)
        self._bytes(request, 200, page.encode("utf-8"), "text/html; charset=utf-8")

    def _listing_row(self, entry: os.DirEntry[str]) -> tuple[bool, str, int, float] | None:
        name = entry.name
        if self._hidden([name]):
            return None
        try:
            if (entry.is_symlink() and not self.config.follow_symlinks
                    and not _inside(os.path.realpath(entry.path), self.root)):
                return None
            st = entry.stat()
        except OSError:
            return None
        is_dir = stat.S_ISDIR(st.st_mode)
        if not is_dir and not stat.S_ISREG(st.st_mode):
            return None
        return is_dir, name, st.st_size, st.st_mtime


# --------------------------------------------------------- standalone resource

class FileResource(resource.Resource):
    """A :class:`FileHandler` as a twisted.web leaf resource (quick mode, tests):
    every request path is looked up by the handler itself."""

    isLeaf = True

    def __init__(self, handler: FileHandler) -> None:
        super().__init__()
        self.handler = handler

    def render(self, request: server.Request) -> Any:
        return self.handler.render(request)


class _FileSite(server.Site):
    noisy = False
    displayTracebacks = False

    def log(self, request: Any) -> None:
        """No twisted.web access line per request (the pipeline has access_log)."""


def file_site(config: FileServer, root: str | None, clock: IReactorTime, *,
              rate_limit: Rate | None = None, timeout: float = 60.0) -> server.Site:
    """A twisted.web Site that only serves files (tests; the reverse pipeline
    calls :class:`FileHandler` per location instead)."""
    site = _FileSite(FileResource(FileHandler(config, root, clock=clock, rate_limit=rate_limit)), timeout=timeout)
    return serve_h2(site, clock)
