"""A span exporter for the tracing tests: each process appends the spans it ends, one
JSON object a line, to its own file in $TANDEM_TEST_SPANS_DIR.

The tests register it as the ``test_files`` entry point of
``opentelemetry_traces_exporter`` (a dist-info folder they put on the path), so the
driver, replica processes and Ray actors find it the way they find any exporter that
OTEL_TRACES_EXPORTER names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

DIR_ENV = "TANDEM_TEST_SPANS_DIR"


class FileSpanExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        path = Path(os.environ[DIR_ENV]) / f"spans-{os.getpid()}.jsonl"
        with path.open("a") as out:
            for span in spans:
                out.write(json.dumps(record(span)) + "\n")
        return SpanExportResult.SUCCESS


def record(span: ReadableSpan) -> dict[str, object]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "trace_state": context.trace_state.to_header(),
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "events": [event.name for event in span.events],
        "pid": os.getpid(),
    }


def read_spans(directory: Path) -> list[dict[str, object]]:
    return [
        json.loads(line)
        for path in sorted(directory.glob("spans-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
