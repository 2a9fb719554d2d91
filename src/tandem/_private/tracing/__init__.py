"""OpenTelemetry traces across hops: whether they are on in this process.

Tracing is decided when a runtime starts here (``tandem.start``, ``tandem.run``,
``tandem run``) and when a replica host starts (a replica process or Ray actor):
it is on if the user's own code already set a global TracerProvider, or if
``OTEL_TRACES_EXPORTER`` names an exporter other than ``none`` and the
OpenTelemetry SDK is installed (``tracing.setup`` builds the provider from the
standard environment variables). Otherwise :data:`SPANS` stays None, the only
thing a hot path checks, and opentelemetry is never imported.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem._private.tracing.spans import Spans

logger = logging.getLogger("tandem")

# What makes spans, while tracing is on in this process; None while it is off.
SPANS: Spans | None = None

# The TracerProvider tandem made from the environment. OpenTelemetry lets the
# global provider be set once per process, so a later start reuses it.
_own_provider: Any = None
_warned_no_sdk = False

EXPORTER_ENV = "OTEL_TRACES_EXPORTER"
INSTALL_HINT = "pip install 'tandem-serve[tracing]'"


def configure() -> None:
    """Turn tracing on or off in this process, from the global TracerProvider and the
    environment as they are now (see the module docstring)."""
    global SPANS, _own_provider, _warned_no_sdk
    SPANS = None
    names = os.environ.get(EXPORTER_ENV, "").strip()
    wanted = bool(names) and names.lower() != "none"
    provider = _users_provider()
    if provider is None and not wanted:
        return
    try:
        from tandem._private.tracing import setup
    except ImportError as exc:
        if not _warned_no_sdk:
            _warned_no_sdk = True
            logger.warning(
                "%s=%s asks for traces, but the OpenTelemetry SDK is not installed "
                "(%s); tracing is off. Install it with: %s",
                EXPORTER_ENV,
                names,
                exc,
                INSTALL_HINT,
            )
        return
    if provider is None:
        if _own_provider is None:
            _own_provider = setup.provider_from_env(names)
        provider = _own_provider
    from tandem._private.tracing.spans import Spans

    SPANS = Spans(provider)


def _users_provider() -> Any:
    """The global TracerProvider, if code other than tandem's set one (checked only if
    opentelemetry is already imported: tandem never imports it to find out)."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider) or provider is _own_provider:
        return None
    return provider


def get_trace_context() -> Any:
    """The OpenTelemetry context of the request being served (its span is the parent of
    spans started with it), or None while tracing is off."""
    spans = SPANS
    return None if spans is None else spans.current()


def flush(timeout_s: float = 5.0) -> None:
    """Export the spans that wait in this process (before it stops)."""
    spans = SPANS
    if spans is not None:
        spans.flush(timeout_s)


def worker_env() -> dict[str, str]:
    """OpenTelemetry's variables of this process, for replicas started elsewhere (a Ray
    actor on another node does not inherit them); none while tracing is off."""
    if SPANS is None:
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}
