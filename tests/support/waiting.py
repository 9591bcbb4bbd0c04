"""Waiting in tests: until a condition holds or a generous deadline passes, never a fixed
sleep followed by an exact count."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 60.0, every: float = 0.1) -> T:
    """The condition's first truthy value, or its value at the deadline (falsy: the caller
    asserts on it and says what did not happen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    return condition()
