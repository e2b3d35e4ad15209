"""``try_paths``: which path a location's handler should serve (no I/O here).

``try_paths = "{path}/ {path}.html /fallback.html =404"`` lists candidates;
each is expanded (variables such as ``{path}``), then offered to the handler's
``exists`` check; the first that exists is served.  If none does, the final
``=CODE`` is answered (404 when there is none, as wmproxy does).

wmproxy also accepts a rewrite candidate, one quoted item of three words
``'REGEX INPUT REPLACEMENT'``: when ``REGEX`` matches the expanded ``INPUT``
the candidate is ``REPLACEMENT`` with ``$1``… filled from the match (its
example: ``'/ro(\\w+)/(.*) {path} /ro$1/Cargo.toml'``).  A rewrite that does
not match is skipped.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["TryOutcome", "TryPaths", "TryPathsHandler"]

Expand = Callable[[str], str]


@dataclass(frozen=True)
class _Candidate:
    template: str
    regex: re.Pattern[str] | None = None
    source: str = ""

    def expand(self, expand: Expand) -> str | None:
        if self.regex is None:
            return expand(self.template)
        m = self.regex.search(expand(self.source))
        if m is None:
            return None
        try:
            return expand(m.expand(re.sub(r"\$(\d+)", r"\\g<\1>", self.template)))
        except (re.error, IndexError):
            return None


@dataclass(frozen=True)
class TryOutcome:
    """Serve ``path`` with the location's handler, or answer ``status``."""

    path: str | None = None
    status: int | None = None
    tried: tuple[str, ...] = ()


@dataclass(frozen=True)
class TryPaths:
    candidates: tuple[_Candidate, ...]
    status: int = 404

    @classmethod
    def parse(cls, text: str) -> TryPaths:
        """Parse the config value; ValueError says what is wrong."""
        try:
            words = shlex.split(text)
        except ValueError as e:
            raise ValueError(f"bad try_paths {text!r}: {e}") from None
        candidates: list[_Candidate] = []
        status = 404
        for w in words:
            if w.startswith("="):
                if not (w[1:].isdigit() and 100 <= int(w[1:]) <= 599):
                    raise ValueError(f"bad final status {w!r} in try_paths: expected e.g. '=404'")
                status = int(w[1:])
                continue
            parts = w.split()
            if len(parts) == 3:
                try:
                    regex = re.compile(parts[0])
                except re.error as e:
                    raise ValueError(f"bad regular expression {parts[0]!r} in try_paths: {e}") from None
                candidates.append(_Candidate(parts[2], regex, parts[1]))
            elif len(parts) == 1:
                candidates.append(_Candidate(w))
            else:
                raise ValueError(f"bad try_paths item {w!r}: expected a path or 'REGEX INPUT REPLACEMENT'")
        return cls(tuple(candidates), status)

    def paths(self, expand: Expand) -> Iterator[str]:
        """The candidate paths in order, expanded (rewrites that do not match left out)."""
        for c in self.candidates:
            path = c.expand(expand)
            if path:
                yield path

    def evaluate(self, expand: Expand, exists: Callable[[str], bool]) -> TryOutcome:
        """The first candidate ``exists`` accepts, else the final status."""
        tried: list[str] = []
        for path in self.paths(expand):
            tried.append(path)
            if exists(path):
                return TryOutcome(path=path, tried=tuple(tried))
        return TryOutcome(status=self.status, tried=tuple(tried))


def _answer(request: Any, status: int) -> None:
    body = f"{status}\n".encode()
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    request.finish()


class TryPathsHandler:
    """``try_paths`` in front of a location's handler (the pipeline's handler seam).

    ``expand_for(request)`` gives the variable expander of one request (the
    pipeline's templates over ``request.vars``); candidates are *decoded* paths,
    as ``{path}`` is.  The inner handler's ``exists(path, encoded=False)``
    decides; the winner is served with ``inner.render(request, ctx, path=...,
    encoded=False)``.  An inner handler without ``exists`` (a proxy) takes the
    first candidate as existing and serves the request unchanged.  When none
    exists, the final status is answered by ``inner.error`` if it has one (the
    file server's ``path404`` page), else as a short text.
    """

    def __init__(self, inner: Any, try_paths: TryPaths, expand_for: Callable[[Any], Expand]) -> None:
        self.inner = inner
        self.try_paths = try_paths
        self.expand_for = expand_for
        self.streams_body = getattr(inner, "streams_body", False)

    def render(self, request: Any, ctx: Any = None) -> Any:
        exists = getattr(self.inner, "exists", None)
        check: Callable[[str], bool] = (
            (lambda p: bool(exists(p, encoded=False))) if exists is not None else (lambda p: True))
        out = self.try_paths.evaluate(self.expand_for(request), check)
        if out.path is None:
            status = out.status or 404
            error = getattr(self.inner, "error", None)
            if error is not None:
                error(request, status)
            else:
                _answer(request, status)
            return None
        if exists is None:
            return self.inner.render(request, ctx)
        return self.inner.render(request, ctx, path=out.path, encoded=False)
