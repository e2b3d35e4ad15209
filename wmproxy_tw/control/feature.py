"""The control API as a feature: one listener on ``control``, like any other.

Being a feature, it moves with reloads like the rest: a changed ``control``
address opens the new socket and closes the old one (the reload request in
flight is answered on the old one).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from ..config.grammar import is_loopback_host
from ..config.model import Config
from ..feature import BuildContext, Feature, IFeature, ListenSpec
from ..listen import StartupError
from .api import IController, make_site

__all__ = ["ControlFeature", "build"]


def build(ctx: BuildContext, config: Config, controller: Optional[IController]) -> list[IFeature]:
    """The control listener, unless ``disable_control``; refuse an open one."""
    if config.disable_control:
        return []
    addr = config.control
    if not is_loopback_host(addr.host) and not config.control_token:
        raise StartupError(f"control: refusing to serve the control API on {addr} (not loopback) without "
                           "control_token: set control_token, or bind it to 127.0.0.1")
    return [ControlFeature(ctx, config, controller)]


class ControlFeature(Feature):
    """Serves :mod:`wmproxy_tw.control.api` for ``controller``."""

    name = "control"

    def __init__(self, ctx: BuildContext, config: Config, controller: Optional[IController]) -> None:
        super().__init__()
        self.config = config
        # planning (--check) has no controller and no reactor: describe only
        self.site: Any = make_site(controller, config, ctx.reactor) if controller is not None else None

    def listeners(self) -> Iterable[ListenSpec]:
        auth = " (bearer token required)" if self.config.control_token else ""
        addr = self.config.control
        return [ListenSpec("tcp", addr, "control API", factory=self.site, drain=False,
                           description=f"control API on {addr}{auth}")]
