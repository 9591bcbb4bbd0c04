"""Functions that worker processes run in tests: importable by name, as "spawn" requires."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from newsbeam.pipeline.config import NlpSettings
from newsbeam.transforms import entities
from newsbeam.transforms.article import Article


def square(numbers: list[int]) -> list[int]:
    return [n * n for n in numbers]


def wait_for(path: str, patience: float = 60.0) -> None:
    """Holds a worker until `path` exists (a test's way of keeping a task unfinished)."""
    give_up = time.monotonic() + patience
    while not Path(path).exists() and time.monotonic() < give_up:
        time.sleep(0.05)


def die(_: Any) -> None:
    os._exit(3)  # what a segfault in a C extension looks like to the pool


def tag_or_die(articles: list[Article], settings: NlpSettings):
    """The real worker function, except that an article titled "poison" kills the process."""
    if any(article.title == "poison" for article in articles):
        os._exit(3)
    return entities._tag_in_worker(articles, settings)
