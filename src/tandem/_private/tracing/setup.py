"""A TracerProvider from OpenTelemetry's standard environment variables.

``OTEL_TRACES_EXPORTER`` names the exporters (comma-separated), found the way
the SDK finds them: by the ``opentelemetry_traces_exporter`` entry points
(``otlp_proto_http``, ``otlp_proto_grpc``, ``console``, any a package adds).
``otlp`` means the exporter of ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` (or
``OTEL_EXPORTER_OTLP_PROTOCOL``); without either, ``http/protobuf`` (the
``tracing`` extra's), or gRPC if only that one is installed. Everything else
(endpoint, headers, sampler, batching, service name and resource attributes)
the SDK and the exporters read from their own variables.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

logger = logging.getLogger("tandem")

ENTRY_POINTS = "opentelemetry_traces_exporter"
_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}


def provider_from_env(names: str) -> TracerProvider:
    """A provider exporting to each exporter ``names`` lists (in batches), made the
    global one so that spans users start in their own code go there too."""
    provider = TracerProvider(resource=_resource())
    for name in (n.strip() for n in names.split(",")):
        if not name or name.lower() == "none":
            continue
        exporter = _exporter_class(name)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter()))
    trace.set_tracer_provider(provider)
    return provider


def _exporter_class(name: str) -> type[SpanExporter] | None:
    """The exporter ``name`` stands for, or None (and a warning) if none is installed."""
    found = _entry_point(_resolved(name))
    if found is None:
        hint = "" if name.startswith("otlp") else "; check the name"
        logger.warning(
            "OTEL_TRACES_EXPORTER names %r, which no installed package provides%s "
            "(the OTLP HTTP exporter comes with: pip install 'tandem-serve[tracing]'). "
            "Spans are not sent there.",
            name,
            hint,
        )
        return None
    exporter: Any = found.load()
    if not (isinstance(exporter, type) and issubclass(exporter, SpanExporter)):
        logger.warning("OTEL_TRACES_EXPORTER: %r is not a span exporter; skipped.", name)
        return None
    return exporter


def _resolved(name: str) -> str:
    if name != "otlp":
        return name
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or ""
    ).strip()
    if protocol:
        return _BY_PROTOCOL.get(protocol, f"otlp ({protocol})")
    if _entry_point(_BY_PROTOCOL["http/protobuf"]) is None:
        return _BY_PROTOCOL["grpc"]
    return _BY_PROTOCOL["http/protobuf"]


def _entry_point(name: str) -> Any:
    for found in entry_points(group=ENTRY_POINTS, name=name):
        return found
    return None


def _resource() -> Resource:
    """The SDK's resource from the environment, named ``tandem`` unless it names itself."""
    attributes = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in attributes:
        return Resource.create()
    return Resource.create({"service.name": "tandem"})
