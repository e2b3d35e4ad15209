"""websocket capability: TCP carried over WebSocket and back (SPEC §7).

* :mod:`.bridge` — :class:`~.bridge.Bridge`, the one WebSocket ⇄ TCP join
  (the one relay underneath, back-pressure both ways, close codes), and
  :func:`~.bridge.apply_limits` for every autobahn factory;
* :mod:`.tcp2ws` — ``bind_mode = "tcp2ws" | "tcp2wss"``: accept TCP, autobahn client out;
* :mod:`.ws2tcp` — ``bind_mode = "ws2tcp"``: autobahn server in, TCP out.

They are configured as ``[[stream.server]]`` entries and built by
:func:`wmproxy_tw.stream.build`.  (The reverse proxy's ``is_ws`` upgrade
passthrough relays bytes after the upstream's own 101 and lives with the
reverse proxy.)
"""
