"""twistd plugin: ``twistd wmproxy``."""

from twisted.application.service import ServiceMaker

wmproxy = ServiceMaker(
    "wmproxy-tw",
    "wmproxy_tw.tap",
    "All-in-one proxy: forward, reverse, L4, WebSocket, NAT traversal",
    "wmproxy",
)
