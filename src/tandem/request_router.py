"""Custom request routers: ``from ray.serve.request_router import RequestRouter``
becomes ``from tandem.request_router import RequestRouter``.

Subclass :class:`RequestRouter`, implement ``choose_replicas``, and name the
class in a deployment's ``request_router_config``
(``tandem.config.RequestRouterConfig``).
"""

from tandem._private.calls.context import ReplicaID
from tandem._private.calls.request_routers import (
    PendingRequest,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)
from tandem._private.calls.routing_mixins import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PowerOfTwoChoicesRequestRouter,
)

__all__ = [
    "FIFOMixin",
    "LocalityMixin",
    "MultiplexMixin",
    "PendingRequest",
    "PowerOfTwoChoicesRequestRouter",
    "ReplicaID",
    "ReplicaResult",
    "RequestRouter",
    "RunningReplica",
]
