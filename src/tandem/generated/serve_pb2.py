"""The messages of ``ray.serve.RayServeAPIService`` (Ray Serve's ``serve_pb2``, the part
its gRPC proxy serves): ListApplications and Healthz requests and responses."""

from __future__ import annotations

from tandem._private.grpc.api_service import MESSAGES

__all__ = [
    "HealthzRequest",
    "HealthzResponse",
    "ListApplicationsRequest",
    "ListApplicationsResponse",
]

HealthzRequest = MESSAGES["HealthzRequest"]
HealthzResponse = MESSAGES["HealthzResponse"]
ListApplicationsRequest = MESSAGES["ListApplicationsRequest"]
ListApplicationsResponse = MESSAGES["ListApplicationsResponse"]
