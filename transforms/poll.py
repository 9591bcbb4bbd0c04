"""PollFeeds: a polite, adaptive scheduler that fetches and parses the feeds that are due.

A PeriodicImpulse (`Ticks`) ticks every `fetch.scheduler_interval` seconds (at most the poll
interval) and emits every shard of feeds; a stateful DoFn keyed by shard keeps each feed's
schedule and validators in Beam state (`transforms/feedstate.py` decides when a feed is
due) and hands due feeds to a `PoliteExecutor` (per-host concurrency and delay). Fetches
that are still running when a tick has waited `settle` seconds (at most 1 s, shared by the
shards of a tick) stay in flight and are collected on a later tick, so a stalled host never
holds back the other feeds.

Per feed and attempt: a conditional GET; a 304 or a body identical to the last one costs
no parsing; a changed body is parsed here (the schedule needs the feed's `ttl` hints and
the health needs the parse outcome). Outputs: articles (main), `health` (one document per
attempt for the `newsbeam-feeds` index) and `dead` (stage, feed, reason).

Shards are by host, so a distributed runner spreads polling over workers while all of a
host's feeds stay in one place for politeness.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.periodicsequence import ImpulseSeqGenDoFn, ImpulseSeqGenRestrictionProvider
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

from newsbeam.transforms import timing
from newsbeam.transforms.article import Article
from newsbeam.transforms.deadletter import DEAD, dead_letter
from newsbeam.transforms.feedstate import FeedState, body_hash, health_doc, load_states, max_age, on_failure, on_success
from newsbeam.transforms.fetch import FetchError, FetchResult, PoliteExecutor, fetch, host_of, new_session, shard_feeds
from newsbeam.transforms.parse import ParsedFeed, parse_dead_letter, safe_read_feed, timed_read_feed
from newsbeam.transforms.redact import redact_url, redact_urls_in
from newsbeam.transforms.settings import ElasticsearchSettings, Feed, FetchSettings, process_count
from newsbeam.transforms.workers import NLP_POOL, room, shared_pool

_LOG = logging.getLogger(__name__)
HEALTH = "health"
# How much spaCy work, in ticks, this process's pool may have queued once a tick's articles are
# handed over: on a runner that runs stages concurrently more would wait in bundles, and bundles
# waiting for NLP take every bundle slot the runner has, the ticks' too; less leaves the pool
# idle before the next tick's articles reach it.
NLP_QUEUE_TICKS = 1.5


@dataclasses.dataclass
class PollOutcome:
    """What one attempt produced; made in a fetch thread, applied to state in the DoFn."""
    started: float
    result: FetchResult | None = None
    error: FetchError | None = None
    digest: str | None = None
    parsed: ParsedFeed | None = None  # None: not parsed (304 or unchanged body)


def poll_one(session, feed: Feed, etag: str | None, last_modified: str | None, last_digest: str | None,
             settings: FetchSettings, parse: bool = True) -> PollOutcome:
    """Fetches one feed and (with `parse`) parses it when its body changed. Never raises."""
    outcome = PollOutcome(started=time.time())
    try:
        outcome.result = fetch(session, feed, settings, etag=etag, last_modified=last_modified)
    except FetchError as err:
        outcome.error = err
        return outcome
    except Exception as err:  # a bug or a surprise in a library: still one bad feed
        outcome.error = FetchError("internal", f"{type(err).__name__}: {err}")
        return outcome
    if outcome.result.status == 304:
        return outcome
    outcome.digest = body_hash(outcome.result.body)
    if parse and needs_parse(outcome, last_digest):
        outcome.parsed = safe_read_feed(outcome.result, settings.max_items_per_feed, settings.max_entry_chars,
                                        settings.max_parse_bytes, settings.max_sanitized_tags)
    return outcome


def needs_parse(outcome: PollOutcome, last_digest: str | None) -> bool:
    """A body arrived and it differs from the last one."""
    return outcome.result is not None and outcome.result.status != 304 and outcome.digest != last_digest


def apply_outcome(state: FeedState, feed: Feed, outcome: PollOutcome, default_interval: float, settings: FetchSettings,
                  due: float | None = None) -> tuple[FeedState, list[Article], list[dict[str, Any]]]:
    """(new state, articles, dead letters) for one attempt. After a success the next poll is
    counted from when this one was `due` (else from its start): time spent waiting in a
    host's polite queue or for a tick must not push every later poll back, cycle after cycle."""
    now = outcome.started
    if outcome.error is not None:
        err = outcome.error
        state = on_failure(state, feed, now=now, error_class=err.kind, error=str(err), status=err.status,
                           retry_after=err.retry_after, default_interval=default_interval, settings=settings)
        return state, [], [dead_letter("fetch", err.kind, str(err), feed_url=feed.url)]
    result = outcome.result
    assert result is not None
    parsed = outcome.parsed
    # Refresh hints: Cache-Control max-age always; ttl / sy:updatePeriod only when parsed.
    hints = [h for h in (max_age(result.headers), parsed.refresh_hint if parsed else state.hint) if h]
    hint = max(hints) if hints else None
    if parsed is not None and parsed.problem:
        kind = "parse" if parsed.reason == "unparseable_feed" else parsed.reason
        state = on_failure(state, feed, now=now, error_class=kind, error=parsed.problem, status=result.status,
                           retry_after=None, default_interval=default_interval, settings=settings)
        return state, [], [parse_dead_letter(result, parsed)]
    state_before = state
    state, changed = on_success(
        state, feed, now=now, status=result.status,
        items=[article.article_id for article in parsed.articles] if parsed is not None else None,
        etag=result.headers.get("etag"), last_modified=result.headers.get("last-modified"),
        digest=outcome.digest, hint=hint, final_url=result.final_url, default_interval=default_interval,
        settings=settings)
    late = now - due if due is not None else 0.0
    if 0.0 < late < state.next_due - now:  # a poll later than a whole interval starts a new rhythm
        state = dataclasses.replace(state, next_due=state.next_due - late)
    if parsed is None or (not changed and state_before.item_ids is not None):
        return state, [], []
    # Only items new since the last parse go downstream: a busy feed re-lists the same 50 items
    # each poll, and they would take NLP budget (and a dedupe lookup) for nothing. A run's first
    # parse sends all: which of them the index holds is for the duplicate check to say.
    seen = state_before.item_ids or frozenset()
    state = dataclasses.replace(state, item_ids=frozenset(short_id(a) for a in parsed.articles))
    return state, [a for a in parsed.articles if short_id(a) not in seen], []


def short_id(article: Article) -> str:
    return article.article_id[:16]


class PollShardFn(beam.DoFn):
    """Keyed by shard: `(shard, feeds)` on every tick -> articles, health docs, dead letters."""

    STATES = ReadModifyWriteStateSpec("feed_states", PickleCoder())
    # Articles parsed but not yet handed downstream (see `Budget`). A restart that loses this
    # state loses no article: its first poll of each feed parses it whole (FeedState.validators).
    BACKLOG = ReadModifyWriteStateSpec("backlog", PickleCoder())

    def __init__(self, settings: FetchSettings, es_settings: ElasticsearchSettings, default_interval: float,
                 settle: float, slack: float, tick: float, shards: int, stop: float | None = None,
                 budget: bool = True):
        self._settings = settings
        self._tick = tick
        self._budget = budget  # False: each tick hands the whole backlog downstream
        self._stop = stop  # a bounded run: its last tick hands the whole backlog downstream
        self._shards = max(1, shards)
        self._max_backlog = max(1, settings.max_backlog // self._shards)
        self._slack = slack  # ticks are not exact: a feed due this soon is polled now
        self._es_settings = es_settings
        self._default_interval = default_interval
        self._settle = settle
        self._token = uuid.uuid4().hex  # the same in every instance made from this one (pickled)
        self._fetched = Metrics.counter("newsbeam", "feeds_fetched")
        self._not_modified = Metrics.counter("newsbeam", "feeds_not_modified")
        self._unchanged = Metrics.counter("newsbeam", "feeds_unchanged")
        self._failed = Metrics.counter("newsbeam", "feeds_failed")
        self._parsed = Metrics.counter("newsbeam", "articles_parsed")
        self._lag = Metrics.distribution("newsbeam", "poll_lag_ms")

    def setup(self) -> None:
        from newsbeam.transforms.elastic import connect
        shared = _share_polling(self._token, self._settings)
        self._session, self._executor = shared.session, shared.executor
        # Polls still running at the end of a tick: collected on a later tick, by whichever
        # instance gets the shard then.
        self._in_flight = shared.in_flight
        self._budgets = shared.budgets
        self._handed, self._handing = shared.handed, shared.handing
        # Parsing is CPU work (a first poll of 1,000 real feeds is minutes of feedparser): worker
        # processes when configured, else one thread of this process; neither the fetches nor the
        # ticks wait for it. The initializer imports the parser's module, so a deadline on a first
        # parse never counts it.
        self._parser = shared_pool(process_count(self._settings.parse_processes), importlib.import_module,
                                   (timed_read_feed.__module__,), name="feedparser")
        self._client = connect(self._es_settings, check=False)

    def _poll(self, feed: Feed, state: FeedState) -> concurrent.futures.Future:
        """Fetch on the polite pool, then parse on the parser; one future for both."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def settle(outcome: PollOutcome) -> None:
            try:
                done.set_result(outcome)
            except concurrent.futures.InvalidStateError:  # the parse deadline came first
                pass

        def parsed(outcome: PollOutcome, future: concurrent.futures.Future, retried: bool) -> None:
            if done.done():
                return
            try:
                outcome.parsed, seconds = future.result()
                timing.record("parse", 1, seconds)
            except concurrent.futures.CancelledError:  # shutting down
                done.cancel()
                return
            except BrokenProcessPool:  # killed with another feed's overdue parse: this one deserves a try
                if not retried:
                    parse(outcome, retried=True)
                    return
                outcome.parsed = ParsedFeed([], "parser process died twice on this feed", "unparseable_feed")
            except Exception as err:  # the parser process died on this feed: a dead letter, not a hang
                outcome.parsed = ParsedFeed([], f"parser failed: {type(err).__name__}: {err}", "unparseable_feed")
            settle(outcome)

        def overdue(outcome: PollOutcome, future: concurrent.futures.Future) -> None:
            if future.done() or done.done():
                return
            if not self._parser.started(future):  # still queued behind others: its clock has not run
                self._session.timers.at(time.monotonic() + self._settings.parse_timeout,
                                        lambda: overdue(outcome, future))
                return
            outcome.parsed = ParsedFeed([], f"parsing took longer than fetch.parse_timeout "
                                            f"({self._settings.parse_timeout:g}s)", "fetch.parse_timeout")
            settle(outcome)
            _LOG.warning("a feed's parse passed fetch.parse_timeout; replacing the parser")
            self._parser.replace(future)

        def parse(outcome: PollOutcome, retried: bool = False) -> None:
            try:
                future = self._parser.submit(timed_read_feed, outcome.result, self._settings.max_items_per_feed,
                                             self._settings.max_entry_chars, self._settings.max_parse_bytes,
                                             self._settings.max_sanitized_tags)
            except (concurrent.futures.CancelledError, RuntimeError):  # shutting down
                done.cancel()
                return
            future.add_done_callback(lambda future: parsed(outcome, future, retried))
            self._session.timers.at(time.monotonic() + self._settings.parse_timeout,
                                    lambda: overdue(outcome, future))

        etag, last_modified, digest = state.validators()

        def fetched(future: concurrent.futures.Future) -> None:
            outcome: PollOutcome = future.result()
            if not needs_parse(outcome, digest):
                done.set_result(outcome)
                return
            parse(outcome)

        self._executor.submit(host_of(feed.url), poll_one, self._session, feed, etag, last_modified, digest,
                              self._settings, False).add_done_callback(fetched)
        return done

    def start_bundle(self) -> None:
        self._settle_until: float | None = None
        self._bundle_shards = 0

    def finish_bundle(self) -> None:
        timing.observe("poll_shards_per_bundle", self._bundle_shards)

    def process(self, shard: tuple[int, tuple[Feed, ...]], tick=beam.DoFn.TimestampParam,
                states=beam.DoFn.StateParam(STATES), backlog_state=beam.DoFn.StateParam(BACKLOG)) -> Iterator:
        number, feeds = shard
        now = time.time()
        self._bundle_shards += 1
        tick_due = float(tick.micros) / 1e6 if tick.micros > 0 else now
        timing.observe("tick_lag_s", now - tick_due)
        # The first budget: 64 articles per tick over all shards, then it adapts.
        budget = self._budgets.setdefault(number, Budget(self._tick, start=max(4.0, 64 / self._shards)))
        budget.tick(now, tick_due)
        backlog: list[Any] = backlog_state.read() or []
        # One settle budget per bundle: the shards of a tick share it instead of adding up.
        self._settle_until = self._settle_until or now + self._settle
        known: dict[str, FeedState] = states.read() or {}
        missing = [feed.url for feed in feeds if feed.url not in known]
        if missing:  # first sight (or a restart): validators and back-off come from the index
            known.update(load_states(self._client, self._es_settings.feeds_index, missing, min(now, tick_due)))
        by_url = {feed.url: feed for feed in feeds}
        known = {url: state for url, state in known.items() if url in by_url}
        # Back-pressure: while this shard's backlog is full, due feeds wait (their lag shows it).
        for feed in feeds if len(backlog) < self._max_backlog else ():
            state = known[feed.url]
            if feed.url not in self._in_flight and state.next_due <= now + self._slack:
                self._in_flight[feed.url] = (self._poll(feed, state), state.next_due)
        pending = [self._in_flight[url][0] for url in by_url if url in self._in_flight]
        if pending:
            waited = time.time()
            concurrent.futures.wait(pending, timeout=max(0.0, self._settle_until - time.time()))
            timing.record("poll_settle", 1, time.time() - waited)
        for url, feed in by_url.items():
            future, due = self._in_flight.get(url, (None, 0.0))
            if future is None or not future.done():
                continue
            del self._in_flight[url]
            if future.cancelled():
                continue
            outcome: PollOutcome = future.result()
            state, articles, dead = apply_outcome(known[url], feed, outcome, self._default_interval,
                                                  self._settings, due)
            known[url] = state
            self._count(outcome, articles)
            if outcome.error is not None:
                _LOG.warning("fetch failed for %s: %s", redact_url(url), redact_urls_in(str(outcome.error)))
            self._lag.update(int(max(0.0, outcome.started - due) * 1000))
            timing.observe("poll_lag_s", max(0.0, outcome.started - due))
            backlog.extend(articles)
            for record in dead:
                yield beam.pvalue.TaggedOutput(DEAD, record)
            doc = health_doc(state, feed)
            doc["last_lag_seconds"] = round(max(0.0, outcome.started - due), 3)
            yield beam.pvalue.TaggedOutput(HEALTH, doc)
        states.write(known)
        # (1 ms of slack: tick timestamps are rounded to microseconds)
        last_tick = self._stop is not None and float(tick.micros) / 1e6 + self._tick >= self._stop - 0.001
        if not self._budget or last_tick:
            emitted, backlog = backlog, []
        else:
            emitted, backlog = self._hand_over(budget, backlog, now)
        if last_tick:
            unfinished = sum(url in self._in_flight for url in by_url)
            _LOG.info("shard %d, last tick: %d articles handed over%s", number, len(emitted),
                      f"; {unfinished} polls unfinished (polled again on the next run)" if unfinished else "")
        backlog_state.write(backlog)
        yield from emitted

    def _hand_over(self, budget: Budget, backlog: list[Any], now: float) -> tuple[list[Any], list[Any]]:
        """The tick's budget, cut to what this process's spaCy pool can take before its queue
        lasts `NLP_QUEUE_TICKS`, less what other shards handed over within the last half tick
        (still on their way to it). Without a pool (spaCy in this process) the budget alone."""
        with self._handing:  # the shards of a tick share the room
            space = room(NLP_POOL, NLP_QUEUE_TICKS * self._tick)
            while self._handed and now - self._handed[0][0] > self._tick / 2:
                self._handed.popleft()
            if space is not None:
                space -= sum(count for _, count in self._handed)
                if space < 1:  # NLP in this process is behind
                    return budget.hold(), backlog
            emitted, backlog = budget.take(backlog, limit=space)
            self._handed.append((now, len(emitted)))
            return emitted, backlog

    def _count(self, outcome: PollOutcome, articles: list[Article]) -> None:
        if outcome.error is not None:
            self._failed.inc()
        elif outcome.result is not None and outcome.result.status == 304:
            self._not_modified.inc()
        elif outcome.parsed is None:
            self._unchanged.inc()
        else:
            self._fetched.inc()
            self._parsed.inc(len(articles))

    def teardown(self) -> None:
        _release_polling(self._token)
        self._parser.shutdown(wait=False, cancel_futures=True)
        self._client.close()


@dataclasses.dataclass
class _SharedPolling:
    """What every instance of one PollShardFn in a process shares. A runner may run several
    instances at once (Prism does) and hand a shard's next tick to any of them: the polls left
    in flight, the budgets and one host's limits (the polite executor) must not depend on which."""
    session: Any
    executor: PoliteExecutor
    in_flight: dict[str, tuple[concurrent.futures.Future, float]] = dataclasses.field(default_factory=dict)
    budgets: dict[int, Budget] = dataclasses.field(default_factory=dict)
    # (time, articles) each shard handed downstream, oldest first: the shards of one tick share the spaCy room.
    handed: collections.deque[tuple[float, int]] = dataclasses.field(default_factory=collections.deque)
    handing: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    handles: int = 0


_shared_lock = threading.Lock()
_shared: dict[str, _SharedPolling] = {}  # by the token of the PollShardFn the instances were made from


def _share_polling(token: str, settings: FetchSettings) -> _SharedPolling:
    with _shared_lock:
        shared = _shared.get(token)
        if shared is None:
            session = new_session(settings)
            shared = _shared[token] = _SharedPolling(session, PoliteExecutor(
                settings.concurrency, settings.per_host_concurrency, settings.per_host_delay, session.timers))
        shared.handles += 1
        return shared


def _release_polling(token: str) -> None:
    """The last instance to go shuts the executor and the session down."""
    with _shared_lock:
        shared = _shared[token]
        shared.handles -= 1
        if shared.handles:
            return
        del _shared[token]
    shared.executor.shutdown()
    shared.session.close()


class Budget:
    """How many articles one shard hands downstream per tick (when the runner profile asks).

    Articles piling up downstream hold the next ticks back: a runner that runs stages one
    after the other polls again only once the last tick's articles are through NLP; one that
    runs them concurrently runs only so many bundles at once, and bundles waiting for NLP take
    them all. Handing 5,000 articles of a first poll downstream at once would hold polling for
    minutes; so the shard releases a budget per tick and keeps the rest in its backlog. The
    budget follows how late ticks are processed: a tick processed more than 1.5 ticks after it
    was due means downstream took too long (shrink in proportion; each of several queued ticks
    shrinks it again); a budget used up on a tick processed on time grows by a quarter."""

    FLOOR = 0.1  # articles per tick: a shard always moves on, if only one article in ten ticks

    def __init__(self, tick: float, start: float = 16.0, limit: float = 10_000.0):
        self._tick = tick
        self._limit = limit
        self.size = start
        self._credit = 0.0
        self._used_up = False

    def tick(self, now: float, due: float) -> None:
        late = now - due
        if late > 1.5 * self._tick:
            self.size = max(self.FLOOR, self.size * self._tick / late)
        elif self._used_up:
            self.size = min(self._limit, self.size * 1.25 + 1)

    def hold(self) -> list[Any]:
        """Nothing handed over this tick: the budget neither grows nor saves up."""
        self._used_up = False
        return []

    def take(self, backlog: list[Any], limit: float | None = None) -> tuple[list[Any], list[Any]]:
        """This tick's articles, at most `limit` (what downstream can take now): a budget cut
        short by the limit does not grow."""
        # A budget below one article per tick adds up over ticks; an idle shard saves no more
        # than one tick's worth.
        self._credit = min(self._credit + self.size, max(self.size, 1.0))
        count = int(self._credit + 1e-9)  # ten tenths make one
        if limit is not None and limit < count:
            count = max(0, int(limit))
            self._used_up = False
        else:
            self._used_up = len(backlog) >= count
        sent = backlog[:count]
        self._credit -= len(sent)
        return sent, backlog[count:]


class Ticks(ImpulseSeqGenDoFn):
    """PeriodicImpulse's generator, waiting for its next tick instead of deferring early (when
    the runner profile asks).

    An SDF that defers its remainder asks to be resumed at the next fire time; a runner that
    resumes it at once instead cycles through empty bundles and keeps a core busy while the
    pipeline is idle. There the generator sleeps until the tick is due."""

    def process(self, element, restriction_tracker=beam.DoFn.RestrictionParam(ImpulseSeqGenRestrictionProvider()),
                watermark_estimator=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider())):
        time.sleep(tick_wait(element, restriction_tracker.current_restriction(), time.time()))
        yield from super().process(element, restriction_tracker, watermark_estimator)


def tick_wait(element: tuple[Any, Any, float], restriction: Any, now: float) -> float:
    """Seconds until the next tick of `element` (first, last, interval) is due: 0 when it is
    due or the range is done, never more than one interval."""
    first, _, interval = element
    if restriction.start >= restriction.stop:
        return 0.0
    first = first.micros / 1e6 if isinstance(first, Timestamp) else first
    return max(0.0, min(interval, first + interval * restriction.start - now))


class PollFeeds(beam.PTransform):
    """Fetches and parses due feeds every scheduler tick; stops after `duration` seconds when
    given, which lets the pipeline drain and finish cleanly. Outputs `articles` (main),
    `health` and `dead`."""

    def __init__(self, feeds: tuple[Feed, ...], interval: float, settings: FetchSettings,
                 es_settings: ElasticsearchSettings, duration: float | None = None, shards: int = 8,
                 tick_budget: bool = True, wait_for_tick: bool = True):
        super().__init__()
        self._tick_budget = tick_budget
        self._wait_for_tick = wait_for_tick
        if not feeds:
            raise ValueError("no feeds to poll: add some to configs/feeds.yaml or pass --feed URL")
        self._shards = shard_feeds(feeds, shards)
        self._interval = interval
        self._tick = min(interval, settings.scheduler_interval,
                         *(feed.poll_interval for feed in feeds if feed.poll_interval))
        self._settings = settings
        self._es_settings = es_settings
        self._duration = duration

    def expand(self, pbegin):
        start = time.time()
        stop = Timestamp.of(start + self._duration) if self._duration else MAX_TIMESTAMP
        shards = self._shards
        # Long enough for healthy feeds to be delivered within their tick, short enough that a
        # stalled host (left in flight, collected on a later tick) barely delays other shards.
        settle = min(1.0, self._tick / 4, self._settings.total_timeout)
        return (pbegin
                | "TickRange" >> beam.Create([(Timestamp.of(start), stop, self._tick)])
                | "Tick" >> beam.ParDo(Ticks() if self._wait_for_tick else ImpulseSeqGenDoFn())
                | "DueShards" >> beam.FlatMap(lambda _tick: shards)
                | "FetchDueFeeds" >> beam.ParDo(PollShardFn(
                    self._settings, self._es_settings, self._interval, settle, slack=self._tick / 4,
                    tick=self._tick, shards=len(shards), stop=start + self._duration if self._duration else None,
                    budget=self._tick_budget)
                ).with_outputs(HEALTH, DEAD, main="articles"))

