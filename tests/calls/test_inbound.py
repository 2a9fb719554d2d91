"""Inbound streams (``calls.inbound``): a caller's async iterator, sent to a replica in
another process while the call runs, in order, with a bounded buffer, its error
after its items, and nothing left behind when either side ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from tandem._private.calls.flow import STREAM_BUFFER
from tandem._private.calls.inbound import (
    ORPHAN_S,
    Inbound,
    InboundQueues,
    InboundRef,
    detach,
    pump,
)


async def _numbers(count: int, error: Exception | None = None) -> AsyncGenerator[int, None]:
    for i in range(count):
        yield i
    if error is not None:
        raise error


def test_detach_replaces_the_inbound_with_its_token() -> None:
    inbound = Inbound(_numbers(1))
    args, kwargs, found = detach(("data", inbound), {"k": 1})
    assert found is inbound
    assert (args, kwargs) == (("data", InboundRef(inbound.token)), {"k": 1})
    args, kwargs, found = detach(("data",), {"items": inbound})
    assert found is inbound
    assert (args, kwargs) == (("data",), {"items": InboundRef(inbound.token)})
    assert detach(("data",), {}) == (("data",), {}, None)


def test_an_inbound_refuses_to_be_pickled() -> None:
    import pickle

    with pytest.raises(TypeError, match="top-level argument"):
        pickle.dumps(Inbound(_numbers(1)))


def test_items_arrive_in_order_with_the_error_last_and_the_buffer_bounded() -> None:
    async def scenario() -> tuple[list[int], BaseException | None, int]:
        queues = InboundQueues()
        inbound = Inbound(_numbers(500, ValueError("upstream broke")))
        args, _, _ = queues.claim((InboundRef(inbound.token),), {})
        queue = args[0]
        most_waiting = 0
        sending = asyncio.ensure_future(
            pump(inbound, lambda items, end, error: queues.push(inbound.token, items, end, error))
        )
        await asyncio.sleep(0.05)  # the reader has not started: the pump must stop
        most_waiting = len(queue._items)
        assert not sending.done()
        got: list[int] = []
        error = None
        try:
            async for item in queue:
                got.append(item)
        except ValueError as exc:
            error = exc
        await sending
        return got, error, most_waiting

    got, error, most_waiting = asyncio.run(scenario())
    assert got == list(range(500))
    assert isinstance(error, ValueError) and str(error) == "upstream broke"
    assert 0 < most_waiting <= 2 * STREAM_BUFFER


def test_a_push_that_overtakes_its_call_is_kept_for_it() -> None:
    async def scenario() -> list[Any]:
        queues = InboundQueues()
        assert await queues.push("t1", ["a", "b"], True, None)
        args, _, token = queues.claim(("x", InboundRef("t1")), {})
        assert token == "t1"
        return [item async for item in args[1]]

    assert asyncio.run(scenario()) == ["a", "b"]


def test_pushes_after_the_call_ended_are_refused_and_orphans_are_dropped() -> None:
    now = [0.0]

    async def scenario() -> None:
        queues = InboundQueues(clock=lambda: now[0])
        queues.claim((InboundRef("done"),), {})
        queues.close("done")
        assert not await queues.push("done", ["late"], False, None)
        assert await queues.push("orphan", ["x"], False, None)  # its call never came
        now[0] += ORPHAN_S + 1
        assert await queues.push("other", ["y"], False, None)  # sweeps the orphan
        assert "orphan" not in queues._queues
        assert not await queues.push("orphan", ["z"], False, None)

    asyncio.run(scenario())


def test_a_pump_stops_when_the_replica_closes_and_the_reader_ends() -> None:
    async def scenario() -> list[int]:
        queues = InboundQueues()

        async def endless() -> AsyncGenerator[int, None]:
            i = 0
            while True:
                yield i
                i += 1

        inbound = Inbound(endless())
        args, _, token = queues.claim((InboundRef(inbound.token),), {})
        sending = asyncio.ensure_future(
            pump(inbound, lambda items, end, error: queues.push(inbound.token, items, end, error))
        )
        got = []
        async for item in args[0]:
            got.append(item)
            if len(got) == 10:
                assert token is not None
                queues.close(token)  # the call ended: the reader sees the end too
        await asyncio.wait_for(sending, 10)
        return got

    assert asyncio.run(scenario())[:10] == list(range(10))
