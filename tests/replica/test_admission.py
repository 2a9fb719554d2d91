"""Admission (replica/admission.py): turns by priority then arrival order, slots never lost."""

from __future__ import annotations

import asyncio

import pytest

from tandem._private.replica.admission import Admission


class Refused(Exception):
    pass


def _admission(capacity: int) -> Admission:
    admission = Admission(capacity, Refused)
    admission.open = True
    return admission


def test_a_freed_slot_goes_to_the_first_waiter_not_to_a_newcomer() -> None:
    async def main() -> list[str]:
        admission = _admission(1)
        order: list[str] = []
        held = await admission.acquire()

        async def take(name: str) -> None:
            slot = await admission.acquire()
            order.append(name)
            await asyncio.sleep(0)
            slot.release()

        waiter = asyncio.ensure_future(take("waiter"))
        await asyncio.sleep(0)  # it waits now
        held.release()
        # This task arrives right after the release, before the waiter runs again
        # (as a caller on the same loop does): it must queue behind the waiter.
        await take("newcomer")
        await waiter
        assert admission.in_flight == 0
        return order

    assert asyncio.run(main()) == ["waiter", "newcomer"]


def test_a_waiter_cancelled_after_it_was_handed_a_slot_passes_it_on() -> None:
    async def main() -> None:
        admission = _admission(1)
        held = await admission.acquire()
        first = asyncio.ensure_future(admission.acquire())
        second = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0)
        held.release()  # handed to `first`...
        first.cancel()  # ...which leaves before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        slot = await asyncio.wait_for(second, 1)
        assert admission.in_flight == 1
        slot.release()
        assert admission.in_flight == 0

    asyncio.run(main())


def test_waiters_are_refused_once_the_door_closes() -> None:
    async def main() -> None:
        admission = _admission(1)
        held = await admission.acquire()
        waiter = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0)
        admission.open = False
        held.release()  # handed over, but the door is closed: refused
        with pytest.raises(Refused):
            await waiter
        assert admission.in_flight == 0
        with pytest.raises(Refused):
            await admission.acquire()

    asyncio.run(main())


def test_waiters_take_freed_slots_by_priority_then_in_order_of_arrival() -> None:
    async def main() -> list[str]:
        admission = _admission(1)
        order: list[str] = []
        held = await admission.acquire()

        async def take(name: str, priority: int) -> None:
            slot = await admission.acquire(priority)
            order.append(name)
            slot.release()

        waiters = []
        for name, priority in (("a", 0), ("low", -1), ("b", 0), ("high", 2), ("c", 0)):
            waiters.append(asyncio.ensure_future(take(name, priority)))
            await asyncio.sleep(0)
        held.release()
        await asyncio.gather(*waiters)
        return order

    assert asyncio.run(main()) == ["high", "a", "b", "c", "low"]
