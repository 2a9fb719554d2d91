"""``ray.serve.RayServeAPIService``: the gRPC proxy's own ListApplications and Healthz.

The gRPC counterparts of ``/-/routes`` and ``/-/healthz``, under Ray Serve's
proto package, service, method and message names, with its messages' fields,
so a client built from Ray Serve's ``serve.proto`` calls them unchanged. The
messages are described here in code, in a descriptor pool of their own (a
client process that also imports Ray's generated module keeps working).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

import grpc

PACKAGE = "ray.serve"
SERVICE = f"{PACKAGE}.RayServeAPIService"
LIST_APPLICATIONS = f"/{SERVICE}/ListApplications"
HEALTHZ = f"/{SERVICE}/Healthz"

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED

# message -> its fields as (name, number, label); every field is a string.
_MESSAGES: dict[str, tuple[tuple[str, int, int], ...]] = {
    "ListApplicationsRequest": (),
    "ListApplicationsResponse": (("application_names", 1, _REPEATED),),
    "HealthzRequest": (),
    "HealthzResponse": (("message", 1, _OPTIONAL),),
}
_METHODS = {"ListApplications": "ListApplications", "Healthz": "Healthz"}


def _message_classes() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(
        name="tandem/ray_serve_api.proto", package=PACKAGE, syntax="proto3"
    )
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        for field_name, number, label in fields:
            message.field.add(name=field_name, number=number, type=_STRING, label=label)
    service = file.service.add(name="RayServeAPIService")
    for method in _METHODS:
        service.method.add(
            name=method,
            input_type=f".{PACKAGE}.{method}Request",
            output_type=f".{PACKAGE}.{method}Response",
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in _MESSAGES
    }


MESSAGES = _message_classes()
ListApplicationsResponse = MESSAGES["ListApplicationsResponse"]
HealthzResponse = MESSAGES["HealthzResponse"]

# A unary handler of the service: (request, context) -> response message.
Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]


def method_handlers(
    list_applications: Handler, healthz: Handler
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The service's method handlers, by method name, for a grpc.aio server."""
    given = {"ListApplications": list_applications, "Healthz": healthz}
    return {
        method: grpc.unary_unary_rpc_method_handler(
            given[method],
            request_deserializer=MESSAGES[f"{method}Request"].FromString,
            response_serializer=MESSAGES[f"{method}Response"].SerializeToString,
        )
        for method in _METHODS
    }
