"""A replica's recent log lines (replica/log_buffer.py): what is kept, with what, how long."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from tandem._private.calls.context import (
    ReplicaContext,
    ReplicaRank,
    RequestMetadata,
    _replica_context,
    _request,
)
from tandem._private.replica.log_buffer import MAX_TEXT, LogBuffer, capture_logs

user = logging.getLogger("tandem.replica.test_log_buffer")
other = logging.getLogger("some_library.test_log_buffer")


@pytest.fixture(autouse=True)
def _loggers_let_info_through() -> Iterator[None]:
    capture_logs()
    saved = user.level, other.level
    user.setLevel(logging.INFO)
    other.setLevel(logging.DEBUG)
    yield
    user.setLevel(saved[0])
    other.setLevel(saved[1])


def _in_replica(buffer: LogBuffer, request_id: str | None = None) -> list[object]:
    """Enter the buffer's replica (and a request): what the replica sets while serving."""
    context = ReplicaContext(
        buffer.application,
        buffer.deployment,
        buffer.replica,
        ReplicaRank.of(0),
        1,
        _replica=SimpleNamespace(log_buffer=buffer),
    )
    tokens: list[object] = [_replica_context.set(context)]
    if request_id is not None:
        tokens.append(_request.set(RequestMetadata(request_id, buffer.application, "D")))
    return tokens


def _leave(tokens: list[object]) -> None:
    _replica_context.reset(tokens[0])  # type: ignore[arg-type]
    if len(tokens) > 1:
        _request.reset(tokens[1])  # type: ignore[arg-type]


def test_lines_name_their_replica_and_request_and_keep_tracebacks() -> None:
    buffer = LogBuffer("app", "Model", "app#Model#a1")
    outside = LogBuffer("app", "Model", "app#Model#b2")
    tokens = _in_replica(buffer, "req-1")
    try:
        user.info("loaded %s in %d ms", "weights", 12)
        user.debug("below the logger's level: never made")
        try:
            raise ValueError("bad input")
        except ValueError:
            other.exception("predict failed")
    finally:
        _leave(tokens)
    user.warning("outside any replica")
    first, second = buffer.read().lines
    assert first["message"] == "loaded weights in 12 ms"
    assert (first["level"], first["logger"]) == ("INFO", user.name)
    assert (first["application"], first["deployment"], first["replica"]) == (
        "app",
        "Model",
        "app#Model#a1",
    )
    assert first["request_id"] == "req-1" and first["exception"] is None
    assert first["time"] > 1e9  # wall clock
    assert second["logger"] == other.name and second["level"] == "ERROR"
    assert "Traceback" in second["exception"] and "ValueError: bad input" in second["exception"]
    assert outside.read().lines == []


def test_the_buffer_keeps_the_newest_lines_and_readers_follow_by_seq() -> None:
    buffer = LogBuffer("app", "Model", "app#Model#a1", size=5)
    tokens = _in_replica(buffer)
    try:
        for i in range(8):
            user.info("line %d", i)
    finally:
        _leave(tokens)
    read = buffer.read()
    assert [line["message"] for line in read.lines] == [f"line {i}" for i in range(3, 8)]
    assert [line["seq"] for line in read.lines] == [4, 5, 6, 7, 8] and read.last == 8
    assert all(line["request_id"] is None for line in read.lines)
    assert [line["seq"] for line in buffer.read(after=6).lines] == [7, 8]
    assert [line["seq"] for line in buffer.read(limit=2).lines] == [7, 8]
    assert buffer.read(after=8) == ([], 8)


def test_log_level_of_the_logging_config_and_request_filter() -> None:
    buffer = LogBuffer("app", "Model", "app#Model#a1", level=logging.WARNING)
    for request_id in ("r1", "r2"):
        tokens = _in_replica(buffer, request_id)
        try:
            user.info("info of %s", request_id)
            user.warning("warning of %s", request_id)
        finally:
            _leave(tokens)
    assert [line["message"] for line in buffer.read().lines] == ["warning of r1", "warning of r2"]
    [line] = buffer.read(request_id="r2").lines
    assert line["message"] == "warning of r2" and line["seq"] == 2


def test_worker_threads_log_into_their_replica_and_long_texts_are_cut() -> None:
    buffer = LogBuffer("app", "Model", "app#Model#a1")

    async def serve() -> None:
        tokens = _in_replica(buffer, "req-9")
        try:
            await asyncio.to_thread(user.info, "x" * (MAX_TEXT + 10))
        finally:
            _leave(tokens)

    asyncio.run(serve())
    [line] = buffer.read().lines
    assert line["request_id"] == "req-9"
    assert line["message"].endswith("… (10 more characters)")


def test_a_failed_request_leaves_its_traceback() -> None:
    buffer = LogBuffer("app", "Model", "app#Model#a1")
    tokens = _in_replica(buffer, "req-3")
    try:
        try:
            {}["missing"]
        except KeyError as exc:
            buffer.request_failed("predict", exc)
    finally:
        _leave(tokens)
    [line] = buffer.read(request_id="req-3").lines
    assert line["message"] == "Request to method 'predict' failed: KeyError: 'missing'"
    assert line["level"] == "ERROR" and "Traceback" in line["exception"]


def test_a_replica_without_logging_config_ignores_levels_lowered_for_another() -> None:
    # Local backend: one replica's log_level DEBUG lowers tandem.replica's level for all.
    from tandem._private.app.logging_config import LoggingConfig
    from tandem._private.replica.logs import ReplicaLogs

    chatty = LogBuffer("app", "Chatty", "app#Chatty#c1", level=logging.DEBUG)
    plain = LogBuffer("app", "Plain", "app#Plain#p1")
    context = ReplicaContext("app", "Chatty", "app#Chatty#c1", ReplicaRank.of(0), 1)
    user.setLevel(logging.NOTSET)  # as a user's logger is: tandem.replica decides
    routing = ReplicaLogs(LoggingConfig(log_level="DEBUG"), context)
    routing.open()
    try:
        for buffer in (chatty, plain):
            tokens = _in_replica(buffer)
            try:
                user.debug("debug in %s", buffer.deployment)
            finally:
                _leave(tokens)
    finally:
        routing.close()
    assert [line["message"] for line in chatty.read().lines] == ["debug in Chatty"]
    assert plain.read().lines == []
