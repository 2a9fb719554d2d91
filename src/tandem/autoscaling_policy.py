"""Autoscaling policies users name: ``from ray.serve.autoscaling_policy import
default_autoscaling_policy`` becomes ``from tandem.autoscaling_policy import
default_autoscaling_policy``.

``replica_queue_length_autoscaling_policy`` (also ``default_autoscaling_policy``)
is the built-in policy: it asks for ``total_num_requests / target_ongoing_requests``
replicas, and the autoscaler applies the factors, delays and bounds, as to every
policy. A custom policy may call it and adjust its answer. (Ray Serve's
Prometheus-based helpers are not provided.)
"""

from tandem._private.controller.autoscaling_context import AutoscalingContext
from tandem._private.controller.autoscaling_policies import (
    default_autoscaling_policy,
    replica_queue_length_autoscaling_policy,
)

__all__ = [
    "AutoscalingContext",
    "default_autoscaling_policy",
    "replica_queue_length_autoscaling_policy",
]
