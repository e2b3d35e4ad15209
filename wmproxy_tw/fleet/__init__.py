"""Fleet mode: several instances sharing limits, the node list and reloads through Redis.

:mod:`.redis` is the one Redis connection manager; :mod:`.feature` the
``[fleet]`` feature (node record with a lease, ``/status``).
"""

from .feature import FleetFeature, build, node_id_of

__all__ = ["FleetFeature", "build", "node_id_of"]
