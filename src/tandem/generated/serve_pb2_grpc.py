"""A client stub of ``ray.serve.RayServeAPIService`` (Ray Serve's ``serve_pb2_grpc``):
``RayServeAPIServiceStub(channel).ListApplications(ListApplicationsRequest())``."""

from __future__ import annotations

from typing import Any

import grpc

from tandem._private.grpc.api_service import HEALTHZ, LIST_APPLICATIONS, MESSAGES

__all__ = ["RayServeAPIServiceStub"]


class RayServeAPIServiceStub:
    """Calls the gRPC proxy's own service over ``channel``."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.ListApplications: Any = channel.unary_unary(
            LIST_APPLICATIONS,
            request_serializer=MESSAGES["ListApplicationsRequest"].SerializeToString,
            response_deserializer=MESSAGES["ListApplicationsResponse"].FromString,
        )
        self.Healthz: Any = channel.unary_unary(
            HEALTHZ,
            request_serializer=MESSAGES["HealthzRequest"].SerializeToString,
            response_deserializer=MESSAGES["HealthzResponse"].FromString,
        )
