"""balance capability: upstream groups, load-balancing algorithms, health.

Import from here: :class:`UpstreamGroup` selects members of a
:class:`GroupSpec`.
"""

from wmproxy_tw.balance.interfaces import IHealthChecker, IUpstreamSelector
from wmproxy_tw.balance.model import GroupSpec, HealthCheckSpec, MemberSpec
from wmproxy_tw.balance.selector import Member, UpstreamGroup

__all__ = [
    "GroupSpec",
    "HealthCheckSpec",
    "IHealthChecker",
    "IUpstreamSelector",
    "Member",
    "MemberSpec",
    "UpstreamGroup",
]
