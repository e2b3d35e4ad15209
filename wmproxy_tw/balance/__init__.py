"""balance capability: upstream groups, load-balancing algorithms, health.

Import from here: :class:`UpstreamGroup` selects members of a
:class:`GroupSpec`; :class:`HealthChecker` runs active checks against it.
"""

from wmproxy_tw.balance.health import HealthChecker, http_probe, probe_for, tcp_probe
from wmproxy_tw.balance.interfaces import IHealthChecker, IUpstreamSelector
from wmproxy_tw.balance.model import GroupSpec, HealthCheckSpec, MemberSpec
from wmproxy_tw.balance.selector import Member, UpstreamGroup

__all__ = [
    "GroupSpec",
    "HealthCheckSpec",
    "HealthChecker",
    "IHealthChecker",
    "IUpstreamSelector",
    "Member",
    "MemberSpec",
    "UpstreamGroup",
    "http_probe",
    "probe_for",
    "tcp_probe",
]
