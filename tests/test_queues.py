"""queues.bounded: a timeout around a periodic call that a close may cancel at any moment."""

from __future__ import annotations

import asyncio

import pytest

from tandem._private.queues import bounded


def test_bounded_returns_the_result_or_times_out_and_cancels() -> None:
    cancelled: list[bool] = []

    async def slow() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "late"

    async def quick() -> str:
        return "now"

    async def main() -> None:
        assert await bounded(quick(), 1.0) == "now"
        with pytest.raises(asyncio.TimeoutError):
            await bounded(slow(), 0.01)
        assert cancelled == [True]

    asyncio.run(main())


@pytest.mark.parametrize("offset_s", [-0.002, -0.001, 0.0, 0.001, 0.002])
def test_a_cancel_that_comes_as_the_timeout_fires_is_never_lost(offset_s: float) -> None:
    """A cancel that comes about as the timeout fires still cancels: a periodic loop that
    took it for a timeout would go on, and the replica's stop (which awaits the loop)
    would hang."""

    async def main() -> None:
        for _ in range(20):
            task = asyncio.ensure_future(bounded(asyncio.sleep(10), 0.01))
            await asyncio.sleep(0.01 + offset_s)
            if not task.cancel():
                continue  # it had already timed out: nothing to lose
            done, _ = await asyncio.wait([task], timeout=2)
            assert done and task.cancelled(), "the cancel was lost"

    asyncio.run(main())
