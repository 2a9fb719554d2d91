"""The access log of the gRPC proxy: one line per RPC, in HTTP's access log.

A line reads ``GRPC /package.Service/Method OK 1.2ms <request id>``; JSON lines
carry ``protocol: "grpc"``, the method, the status code's name, the latency, the
request id and the application. ``logging_config`` silences it as it does HTTP's.
"""

from __future__ import annotations

import logging

from tandem._private.http.logs import access_logger


def log_rpc(path: str, code: str, seconds: float, request_id: str, app: str | None) -> None:
    """Log one RPC: its full method name, status code name, latency and request id."""
    if not access_logger.isEnabledFor(logging.INFO) or access_logger.disabled:
        return
    access_logger.info(
        "GRPC %s %s %.1fms %s",
        path,  # a registered method's name: the server answers others itself
        code,
        seconds * 1e3,
        request_id,
        extra={
            "protocol": "grpc",
            "method": path,
            "status": code,
            "latency_ms": round(seconds * 1e3, 3),
            "request_id": request_id,
            "application": app,
        },
    )
