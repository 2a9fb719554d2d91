"""Custom metrics, as ``ray.serve.metrics``: ``from ray.serve import metrics`` becomes
``from tandem import metrics``.

``Counter``, ``Gauge`` and ``Histogram`` take Ray's arguments and raise Ray's
errors. Made inside a deployment (its constructor or methods), a metric carries
the tags ``deployment``, ``replica`` and ``application``; one that declares a
``route`` tag key gets the route prefix of the HTTP request being served ("" for
handle calls) unless the record gives one. The data port's ``/metrics`` exports
them under Ray's Prometheus names: ``ray_<name>`` (``ray_<name>_total`` for a
counter), from every replica on every backend, and from the driver.
"""

from tandem._private.user_metrics import Counter, Gauge, Histogram

__all__ = ["Counter", "Gauge", "Histogram"]
