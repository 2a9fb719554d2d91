"""calls.flow's begin and chained: how a caller takes a whole answer or a begun stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from tandem._private.calls.flow import Last, Opened, begin, chained


class Source:
    """An async generator of ``items`` that records how it ended."""

    def __init__(self, *items: Any, fail: BaseException | None = None) -> None:
        self.items = items
        self.fail = fail
        self.ended: str | None = None

    async def run(self) -> AsyncGenerator[Any, None]:
        try:
            for item in self.items:
                yield item
            if self.fail is not None:
                raise self.fail
            self.ended = "finished"
        except GeneratorExit:
            self.ended = "closed"
            raise
        except BaseException:
            self.ended = "raised"
            raise


def test_a_whole_answer_comes_back_and_its_source_finishes_on_its_own() -> None:
    source = Source(Last("all"))
    answered = asyncio.run(begin(source.run()))
    assert isinstance(answered, Last) and answered.value == "all"
    # Finished, not closed: closing would count a cancellation (and over a wire,
    # tell the producer to stop what is already done).
    assert source.ended == "finished"


def test_a_stream_comes_back_begun_with_its_first_item() -> None:
    source = Source(1, 2, 3)

    async def take() -> list[Any]:
        answered = await begin(source.run())
        assert isinstance(answered, Opened)
        return [answered.first, *[item async for item in answered.rest]]

    assert asyncio.run(take()) == [1, 2, 3]
    assert source.ended == "finished"


def test_an_empty_source_is_an_empty_whole_answer() -> None:
    answered = asyncio.run(begin(Source().run()))
    assert isinstance(answered, Last) and answered.value == ()


def test_a_source_that_fails_first_raises_its_error() -> None:
    source = Source(fail=KeyError("boom"))
    with pytest.raises(KeyError, match="boom"):
        asyncio.run(begin(source.run()))
    assert source.ended == "raised"


def test_a_stream_that_goes_on_after_its_last_item_is_an_error_and_is_closed() -> None:
    source = Source(Last("all"), "more")
    with pytest.raises(RuntimeError, match="after its last item"):
        asyncio.run(begin(source.run()))
    assert source.ended == "closed"


@pytest.mark.parametrize("how", ["read", "closed early", "failed"])
def test_chained_calls_its_end_once_however_the_stream_ends(how: str) -> None:
    source = Source(1, 2, 3, fail=ValueError("late") if how == "failed" else None)
    ends: list[str] = []

    async def take() -> list[Any]:
        opened = await begin(source.run())
        assert isinstance(opened, Opened)
        rest = await begin(chained(opened, lambda: ends.append("end")))
        assert isinstance(rest, Opened)
        taken = [rest.first]
        try:
            async for item in rest.rest:
                taken.append(item)
                if how == "closed early":
                    break
        finally:
            await rest.rest.aclose()
        return taken

    if how == "failed":
        with pytest.raises(ValueError, match="late"):
            asyncio.run(take())
    else:
        taken = asyncio.run(take())
        assert taken == ([1, 2] if how == "closed early" else [1, 2, 3])
    assert ends == ["end"]
    assert source.ended == {"read": "finished", "closed early": "closed", "failed": "raised"}[how]
