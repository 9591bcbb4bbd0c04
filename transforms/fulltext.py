"""FetchFullText: for feeds marked `full_text: true` (feeds that carry only summaries),
fetch each new article's page with the same guarded client and per-host politeness as
feeds, and extract its main text with trafilatura. Pages get a much smaller size cap than feeds
(`fetch.max_page_bytes`, after inflating: trafilatura's memory grows many times a page's size),
and a batch waits at most `fetch.full_text_timeout` for its pages. `body_source` records which text the
article carries: `feed` or `extracted`. A page that cannot be fetched or yields less text
than the feed leaves the feed's text in place; why is logged and counted (`full_text_failed`).
"""
from __future__ import annotations

import dataclasses
import html
import logging
from collections.abc import Iterator
from concurrent.futures import Future, wait
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from newsbeam.transforms.article import Article
from newsbeam.transforms.batching import BatchingDoFn
from newsbeam.transforms.fetch import FetchError, PoliteExecutor, fetch, host_of, new_session
from newsbeam.transforms.redact import redact_url
from newsbeam.transforms.settings import Feed, FetchSettings, StageSizes

_LOG = logging.getLogger(__name__)
PAGE_ACCEPT = "text/html, application/xhtml+xml;q=0.9, */*;q=0.5"


def extract_main_text(page: bytes, url: str) -> str:
    """The main text of an article page ('' when trafilatura finds none)."""
    import trafilatura
    return trafilatura.extract(page, url=url, include_comments=False, include_tables=False) or ""


def as_html(text: str) -> str:
    return "".join(f"<p>{html.escape(line)}</p>" for line in text.split("\n") if line.strip())


def fetch_full_text(session, feed: Feed, article: Article, settings: FetchSettings) -> tuple[Article, str]:
    """(the article with its page's main text as `content_html`, "") or (the article unchanged,
    why not). Never raises FetchError: the feed's text is a fine fallback."""
    try:
        result = fetch(session, feed, settings, url=article.url, accept=PAGE_ACCEPT)
        text = extract_main_text(result.body, result.final_url)
    except FetchError as err:
        return article, str(err)
    if len(text) < min(200, max(len(article.content_html), len(article.summary_html))):
        return article, "no main text found"
    return dataclasses.replace(article, content_html=as_html(text)[:settings.max_entry_chars],
                               body_source="extracted"), ""


class FetchFullTextFn(BatchingDoFn):
    stage = "full_text"
    def __init__(self, feeds: tuple[Feed, ...], settings: FetchSettings,
                 batch_size: int = StageSizes.lookup_batch):
        # Articles carry the redacted feed URL (transforms/parse.py).
        self._feeds = {redact_url(feed.url): feed for feed in feeds if feed.full_text}
        self._settings = dataclasses.replace(settings, max_bytes=min(settings.max_bytes, settings.max_page_bytes),
                                             max_decompressed_bytes=min(settings.max_decompressed_bytes,
                                                                        settings.max_page_bytes))
        self.batch_size = batch_size
        self._extracted = Metrics.counter("newsbeam", "full_text_extracted")
        self._failed = Metrics.counter("newsbeam", "full_text_failed")

    def setup(self) -> None:
        self._session = new_session(self._settings)
        self._executor = PoliteExecutor(self._settings.concurrency, self._settings.per_host_concurrency,
                                        self._settings.per_host_delay, self._session.timers)

    def handle_batch(self, articles: list[Article]) -> Iterator[list[Any]]:
        futures = {}
        for position, article in enumerate(articles):
            feed = self._feeds.get(article.feed_url)
            if feed and article.url.startswith(("http://", "https://")):
                futures[position] = self._executor.submit(host_of(article.url), fetch_full_text, self._session,
                                                          feed, article, self._settings)
        wait(list(futures.values()), timeout=self._settings.full_text_timeout)
        for position, article in enumerate(articles):
            if position in futures:
                try:
                    article, error = self._page_result(futures[position], article)
                except Exception as err:  # trafilatura on a hostile page: keep the feed's text
                    error = f"{type(err).__name__}: {err}"
                if error:
                    self._failed.inc()
                    _LOG.info("full text of %s not used: %s", article.url, error)
                else:
                    self._extracted.inc()
            yield [article]

    def _page_result(self, future: Future, article: Article) -> tuple[Article, str]:
        if future.done():
            return future.result()
        future.cancel()  # still queued behind its host, or running: its result is not waited for
        return article, (f"page not fetched and extracted within fetch.full_text_timeout "
                         f"({self._settings.full_text_timeout:g}s)")

    def teardown(self) -> None:
        self._executor.shutdown()
        self._session.close()


class FetchFullText(beam.PTransform):
    def __init__(self, feeds: tuple[Feed, ...], settings: FetchSettings, batch_size: int = StageSizes.lookup_batch):
        super().__init__()
        self._feeds = feeds
        self._settings = settings
        self._batch_size = batch_size

    def expand(self, articles):
        return articles | "FetchAndExtract" >> beam.ParDo(
            FetchFullTextFn(self._feeds, self._settings, self._batch_size))
