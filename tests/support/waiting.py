"""Waiting for a condition instead of sleeping for a guess: a test's verdict must not depend on
how loaded the machine is, so it polls until the condition holds or a generous deadline passes."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 60.0, what: str = "the condition held",
               every: float = 0.2) -> T:
    """The first truthy value of `condition()`, polled every `every` seconds; AssertionError
    naming `what` when `timeout` seconds pass without one."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(every)
