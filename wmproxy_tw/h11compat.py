"""The h11 module the HTTP/1.1 code uses: h11-mypyc (h11 compiled) when installed, else h11.

h11-mypyc is h11's own state machine with annotations precise enough for mypyc
to compile it (about 2x faster per request here).  The API and the events are
the same; ``tests/unit/test_h11compat.py`` checks both give the same events
and errors on generated input, so either one is correct to run.  Import
``h11`` from here, never directly, so one process uses one of them.
"""

from __future__ import annotations

try:
    import h11_mypyc as h11
except ImportError:  # pragma: no cover - PyPy, or a platform without wheels
    import h11  # type: ignore[no-redef]

__all__ = ["h11"]
