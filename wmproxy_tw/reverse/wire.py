"""Writing small messages to a plain TCP transport without a reactor round trip.

Twisted's ``transport.write`` only buffers: it asks epoll for writability
(one ``epoll_ctl``), the next reactor iteration sends, then it stops asking
(another ``epoll_ctl``).  For a request/response proxy that is two system
calls and one reactor dispatch per message, about a third of the Python
time of a keep-alive exchange (measured with ``make profile``).

:func:`eager_write` sends at once when the transport is a plain
``twisted.internet.tcp.Connection`` with nothing buffered, connected and not
closing; whatever the socket does not take (or any error, or any other
transport: TLS, test doubles) goes through ``transport.write`` as before,
so ordering, back-pressure (``_maybePauseProducer``) and error reporting
(the reactor finds the broken socket when it next writes) are Twisted's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["eager_write"]

_Connection = tcp.Connection
# The buffer attributes read here are FileDescriptor's (``_tempDataLen`` and
# ``socket`` are set per instance); without them (another Twisted), every write takes the ordinary path.
_USABLE = all(hasattr(_Connection, a) for a in ("dataBuffer", "TLS", "_writeDisconnected", "disconnecting"))


def eager_write(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent now when nothing is queued before it."""
    if (_USABLE and data and isinstance(transport, _Connection)
            and not getattr(transport, "_tempDataLen", True) and not transport.dataBuffer
            and transport.connected and not transport.disconnecting
            and not transport.TLS and not transport._writeDisconnected):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, EINTR, or a broken connection: Twisted's path handles each
            sent = 0
        if sent == len(data):
            return
        if sent:
            data = data[sent:]
    transport.write(data)
