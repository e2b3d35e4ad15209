"""Seams of the balance capability."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IUpstreamSelector(Interface):
    """Chooses a member of an upstream group and learns from the outcome.

    Used by the reverse proxy, stream (L4) forwarding and WebSocket. The
    caller's protocol for one request or connection::

        m = selector.select(key, exclude=tried)
        if m is None: answer 502 (or close) at once
        selector.connection_started(m)
        ... connect to m.addr ...
        selector.report_success(m)  or  selector.report_failure(m)
        ... finally: selector.connection_finished(m)
    """

    name = Attribute("The group name (str).")
    members = Attribute("All members (tuple of Member), in configuration order.")

    def select(key=None, exclude=frozenset()):
        """Return the member to use, or None when no usable member is left.

        ``key`` is the client IP for ``ip_hash`` and the expanded ``hash_key``
        for ``hash`` (ignored by the other algorithms; None falls back to
        round robin). ``exclude`` holds the members already tried by this
        request (``proxy_next_upstream``); they count as unusable.
        """

    def connection_started(member):
        """Count one more open connection to ``member`` (``least_conn``)."""

    def connection_finished(member):
        """Count one connection to ``member`` less."""

    def report_success(member):
        """Passive health: ``member`` answered (connected / gave a response)."""

    def report_failure(member):
        """Passive health: ``member`` failed (refused, timed out, reset)."""

    def snapshot():
        """JSON-serialisable state of the group and each member."""


class IHealthChecker(Interface):
    """Active health checking of one upstream group, run like a service."""

    def start():
        """Begin probing every member periodically (idempotent)."""

    def stop():
        """Stop probing and cancel probes in flight (idempotent)."""
