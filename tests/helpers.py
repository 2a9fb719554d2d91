"""Waiting helpers the test modules share: poll until a condition holds, with a
deadline, instead of sleeping a fixed time that a loaded machine may not honour."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout_s: float = 5.0, interval_s: float = 0.02) -> T:
    """Call ``predicate`` until it returns something truthy or ``timeout_s`` passes;
    return its last value (falsy on timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


def eventually(
    read: Callable[[], T],
    until: Callable[[T], Any],
    timeout_s: float = 5.0,
    interval_s: float = 0.05,
) -> T:
    """``read()`` until ``until`` holds for its value or ``timeout_s`` passes; return the
    last value read, for the caller's assertion (and its message) to check."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if until(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)
