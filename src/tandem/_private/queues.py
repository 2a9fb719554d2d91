"""Reading a queue that a producer task fills: items, then an end marker or an error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any


async def drain(items: asyncio.Queue[Any], end: Any) -> AsyncGenerator[Any, None]:
    """Yield items until ``end``; an exception put in the queue is raised here."""
    while True:
        item = await items.get()
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
