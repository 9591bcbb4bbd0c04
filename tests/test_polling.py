"""Polite, adaptive polling: the schedule (intervals, feed hints, back-off, dead feeds),
per-host politeness, and a stalled host that never holds back the others."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from apache_beam.utils.timestamp import Timestamp

from newsbeam.pipeline.config import ConfigError, Feed, FetchSettings, load_feeds, load_settings
from newsbeam.transforms.article import Article
from newsbeam.transforms.feedstate import FeedState, max_age, on_failure, on_success
from newsbeam.transforms.fetch import FetchResult, PoliteExecutor, _Timers, shard_feeds
from newsbeam.transforms.parse import parse_document, refresh_hint
from newsbeam.transforms.poll import Budget, PollShardFn, tick_wait
from tests import workerjobs
from tests.support.feedserver import rss
from tests.support.hostileserver import HostileServer, respond, stall
from tests.support.waiting import wait_until

SETTINGS = FetchSettings(allow_private_addresses=True, max_poll_interval=86_400, dead_after=3,
                         dead_retry_interval=21_600, connect_timeout=1, read_timeout=1, total_timeout=4,
                         per_host_delay=0.01)
FEED = Feed(url="https://news.example.org/rss")
NOW = 1_000_000.0


def success(state: FeedState, items: list[str] | None, hint=None, status=200, feed=FEED, settings=SETTINGS):
    return on_success(state, feed, now=NOW, status=status, items=items, etag=None, last_modified=None,
                      digest=None, hint=hint, final_url=feed.url, default_interval=300, settings=settings)[0]


def test_the_configured_interval_and_a_per_feed_override():
    assert success(FeedState(FEED.url), ["a"]).next_due == NOW + 300
    own = Feed(url=FEED.url, poll_interval=60)
    assert success(FeedState(FEED.url), ["a"], feed=own).next_due == NOW + 60


def test_feed_hints_slow_polling_down_but_never_speed_it_up():
    assert success(FeedState(FEED.url), ["a"], hint=3600).next_due == NOW + 3600
    assert success(FeedState(FEED.url), ["a"], hint=10).next_due == NOW + 300
    assert success(FeedState(FEED.url), ["a"], hint=10 ** 9).next_due == NOW + 86_400  # capped


def test_ttl_and_syndication_hints_and_cache_control_are_read():
    doc = (b'<?xml version="1.0"?><rss version="2.0" xmlns:sy="http://purl.org/rss/1.0/modules/syndication/">'
           b"<channel><title>t</title><ttl>30</ttl><sy:updatePeriod>hourly</sy:updatePeriod>"
           b"<sy:updateFrequency>4</sy:updateFrequency></channel></rss>")
    parsed = parse_document(FetchResult(FEED, FEED.url, 200, {}, doc, NOW, 0.1))
    assert refresh_hint(parsed) == 1800  # ttl 30 min beats 4 per hour (900 s)
    daily = doc.replace(b"<ttl>30</ttl>", b"").replace(b"hourly", b"daily").replace(b">4<", b">2<")
    assert refresh_hint(parse_document(FetchResult(FEED, FEED.url, 200, {}, daily, NOW, 0.1))) == 43_200
    assert max_age({"cache-control": "public, max-age=900"}) == 900
    assert max_age({"cache-control": "no-cache"}) is None


def test_feeds_that_do_not_change_are_polled_less_often_up_to_a_bound():
    state = success(FeedState(FEED.url), ["a", "b"])
    gaps = []
    for _ in range(10):
        state = success(state, ["a", "b"])  # same items again
        gaps.append(state.next_due - NOW)
    assert gaps[:2] == [300, 300]  # two unchanged polls before backing off
    assert gaps[2] == 450 and gaps == sorted(gaps)
    assert gaps[-1] == 300 * SETTINGS.unchanged_backoff_max
    assert success(state, ["a", "b", "c"]).next_due == NOW + 300  # new items: back to the interval
    assert success(state, None, status=304).unchanged_polls == state.unchanged_polls + 1
    flat = dataclasses.replace(SETTINGS, unchanged_backoff_max=1)
    assert success(state, ["a", "b"], settings=flat).next_due == NOW + 300


def test_failures_back_off_then_the_feed_is_dead_then_it_recovers_by_itself():
    state = FeedState(FEED.url)
    delays = []
    for _ in range(SETTINGS.dead_after):
        state = on_failure(state, FEED, now=NOW, error_class="timeout", error="slow", status=None,
                           retry_after=None, default_interval=300, settings=SETTINGS)
        delays.append(state.next_due - NOW)
    assert delays[:2] == [300, 600] and state.dead and state.consecutive_failures == 3
    assert delays[-1] == SETTINGS.dead_retry_interval  # dead feeds are still tried, rarely
    state = success(state, ["a"])
    assert not state.dead and state.consecutive_failures == 0 and state.error_class is None
    busy = on_failure(state, FEED, now=NOW, error_class="http_5xx", error="503", status=503, retry_after=7200,
                      default_interval=300, settings=SETTINGS)
    assert busy.next_due == NOW + 7200


def test_shards_keep_a_host_together():
    feeds = [Feed(url=f"https://host{i % 7}.example/feed{i}") for i in range(70)]
    shards = shard_feeds(feeds, 4)
    hosts_per_shard = [{f.url.split("/")[2] for f in group} for _, group in shards]
    for i, hosts in enumerate(hosts_per_shard):
        for other in hosts_per_shard[i + 1:]:
            assert not hosts & other


def test_polite_executor_limits_each_host_and_spaces_its_requests():
    timers = _Timers("test-timers")
    delay = 0.3
    executor = PoliteExecutor(workers=8, per_host=2, delay=delay, timers=timers)
    active: dict[str, int] = {}
    peak: dict[str, int] = {}
    starts: dict[str, list[float]] = {}
    lock = threading.Condition()

    def work(host: str) -> None:
        with lock:
            active[host] = active.get(host, 0) + 1
            peak[host] = max(peak.get(host, 0), active[host])
            starts.setdefault(host, []).append(time.monotonic())
            lock.notify_all()
            # Held until two of the host's requests have run at once, however slowly they start.
            lock.wait_for(lambda: peak[host] >= 2, timeout=30)
        time.sleep(3 * delay)  # longer than the delay: a third start would overlap if per_host were not kept
        with lock:
            active[host] -= 1

    futures = [executor.submit(host, work, host) for host in ("a", "b") for _ in range(5)]
    for future in futures:
        future.result(timeout=10)
    executor.shutdown()
    timers.close()
    assert peak == {"a": 2, "b": 2}
    for host_starts in starts.values():
        gaps = [b - a for a, b in zip(host_starts, host_starts[1:])]
        # The executor spaces the planned starts; a thread that starts late on a loaded machine
        # shortens the gap to the next start that is on time, so the bound leaves it 50 ms.
        assert min(gaps) >= delay - 0.05, gaps


class _State:
    """Beam's ReadModifyWriteState, in memory, for calling the DoFn directly."""

    def __init__(self):
        self.value = None

    def read(self):
        return self.value

    def write(self, value):
        self.value = value


@pytest.mark.slow
def test_a_stalled_host_stays_in_flight_while_the_others_are_delivered(es_settings):
    with HostileServer() as server, HostileServer(host="127.0.0.2") as slow_host:
        fast = Feed(url=server.route("/fast.xml", respond(200, rss([{
            "title": "Fast news", "link": "https://example.org/fast", "html": "<p>x</p>"}]),
            {"Content-Type": "application/rss+xml"})))
        slow = Feed(url=slow_host.route("/slow.xml", stall(60)))
        # The fast feed has 5 s to be delivered (a loaded machine needs more than 0.5 s); the slow
        # one stays in flight past that until its 20 s read timeout.
        settings = dataclasses.replace(SETTINGS, read_timeout=20, total_timeout=25)
        fn = PollShardFn(settings, es_settings, default_interval=300, settle=5.0, slack=0, tick=1.0, shards=1)
        fn.setup()
        fn.start_bundle()
        try:
            state = _State()
            first = list(fn.process((0, (slow, fast)), tick=Timestamp.now(), states=state, backlog_state=_State()))
            assert [a.title for a in first if isinstance(a, Article)] == ["Fast news"]
            assert slow.url in fn._in_flight  # the bundle did not wait for the stalled host
            wait_until(lambda: fn._in_flight[slow.url][0].done(), 60, "the stalled fetch to time out")
            fn.start_bundle()
            later = list(fn.process((0, (slow, fast)), tick=Timestamp.now(), states=state, backlog_state=_State()))
            health = [o.value for o in later if getattr(o, "tag", None) == "health"]
            assert [(h["feed_url"], h["error_class"]) for h in health] == [(slow.url, "timeout")]
            assert state.value[fast.url].next_due > time.time() + 200  # not polled again early
        finally:
            fn.teardown()


def test_instances_of_the_poller_in_one_process_share_polls_in_flight_and_host_limits(es_settings):
    """A runner may run several instances of the poller in one process and hand a shard's
    next tick to another instance (Prism does): that instance collects the poll the first one
    left in flight instead of fetching the feed again, and both keep to one host's limits."""
    import pickle

    with HostileServer() as server, HostileServer(host="127.0.0.2") as slow_host:
        fast = Feed(url=server.route("/fast.xml", respond(200, rss([{
            "title": "Fast news", "link": "https://example.org/fast", "html": "<p>x</p>"}]),
            {"Content-Type": "application/rss+xml"})))
        slow = Feed(url=slow_host.route("/slow.xml", stall(10)))  # read timeout after 1 s
        first = PollShardFn(SETTINGS, es_settings, default_interval=300, settle=0.5, slack=0, tick=1.0, shards=1)
        second = pickle.loads(pickle.dumps(first))  # how a runner makes another instance
        first.setup()
        second.setup()
        try:
            state = _State()
            first.start_bundle()
            list(first.process((0, (slow, fast)), tick=Timestamp.now(), states=state, backlog_state=_State()))
            time.sleep(1.2)
            second.start_bundle()
            later = list(second.process((0, (slow, fast)), tick=Timestamp.now(), states=state,
                                        backlog_state=_State()))
            health = [o.value for o in later if getattr(o, "tag", None) == "health"]
            assert [(h["feed_url"], h["error_class"]) for h in health] == [(slow.url, "timeout")]
            assert slow_host.hits("/slow.xml") == 1  # not fetched again by the second instance
            assert first._executor is second._executor  # one host's limits over both
        finally:
            first.teardown()
            second.teardown()


@pytest.mark.parametrize("parse_processes", [0, 1], ids=["parse-thread", "parse-process"])
def test_a_big_first_poll_is_handed_downstream_in_budgets_and_nothing_is_lost(es_settings, parse_processes):
    """A feed with 40 items: 8 articles leave on the first tick, the rest wait in the backlog
    state (not in memory only) for the next ticks, and every article leaves exactly once;
    the same whether feedparser runs on a thread or in a worker process."""
    items = [{"title": f"Story {n}", "link": f"https://example.org/{n}", "html": "<p>x</p>"} for n in range(40)]
    with HostileServer() as server:
        feed = Feed(url=server.route("/big.xml", respond(200, rss(items), {"Content-Type": "application/rss+xml"})))
        settings = dataclasses.replace(SETTINGS, parse_processes=parse_processes)
        # a long settle: the first tick also waits for the parser process to start
        fn = PollShardFn(settings, es_settings, default_interval=300, settle=15.0, slack=0, tick=30.0, shards=8)
        fn.setup()
        try:
            state, backlog = _State(), _State()
            emitted = []
            for _ in range(6):
                fn.start_bundle()
                out = list(fn.process((0, (feed,)), tick=Timestamp.now(), states=state, backlog_state=backlog))
                emitted.append([a.title for a in out if isinstance(a, Article)])
            sizes = [len(batch) for batch in emitted]
            assert sizes[0] == 8  # the first budget: 64 per tick over 8 shards
            assert sizes[1] == 11  # ticks on time and the budget used up: it grows (8 * 1.25 + 1)
            assert sorted(sum(emitted, [])) == sorted(item["title"] for item in items)
            assert backlog.value == []
        finally:
            fn.teardown()


@pytest.mark.slow
def test_shards_hand_over_only_what_the_spacy_pool_can_take_before_the_next_ticks(es_settings, tmp_path):
    """Prism runs 8 bundles at once; bundles waiting for spaCy took them all and the ticks
    waited minutes for a slot, while holding a whole tick back left spaCy idle. The shards of a
    tick share what this process's spaCy pool can take before its queue lasts NLP_QUEUE_TICKS,
    the cost of an article as its users report it, and hand over the rest once it has caught up."""
    from newsbeam.transforms.poll import NLP_QUEUE_TICKS
    from newsbeam.transforms.workers import NLP_POOL, shared_pool

    tick, release = 30.0, tmp_path / "release"
    nlp = shared_pool(1, name=NLP_POOL)
    with HostileServer() as server:
        feeds = [Feed(url=server.route(f"/{name}.xml", respond(200, rss(
            [{"title": f"{name} {n}", "link": f"https://example.org/{name}/{n}", "html": "<p>x</p>"}
             for n in range(20)]), {"Content-Type": "application/rss+xml"}))) for name in ("one", "two")]
        fn = PollShardFn(SETTINGS, es_settings, default_interval=300, settle=5.0, slack=0, tick=tick, shards=8)
        fn.setup()
        try:
            nlp.record_cost(1, 1.0)  # one second an article, one process
            busy = nlp.submit(workerjobs.wait_for, str(release), units=NLP_QUEUE_TICKS * tick - 5)
            shards = [(number, feed, _State(), _State()) for number, feed in enumerate(feeds)]

            def tick_of(number, feed, state, backlog):
                fn.start_bundle()
                out = fn.process((number, (feed,)), tick=Timestamp.now(), states=state, backlog_state=backlog)
                return [article for article in out if isinstance(article, Article)]

            first, second = (tick_of(*shard) for shard in shards)
            assert len(first) == 5  # the pool's room, not the first budget of 8
            assert second == [] and len(shards[1][3].value) == 20  # the first shard took the room
            release.touch()
            busy.result(timeout=60)
            later = tick_of(*shards[1])
            assert len(later) == 8  # caught up: the first budget
        finally:
            fn.teardown()
            nlp.shutdown()


def test_a_budget_cut_short_by_downstream_does_not_grow():
    budget = Budget(tick=5.0, start=10)
    sent, rest = budget.take(list(range(100)), limit=3.7)
    assert (len(sent), len(rest)) == (3, 97)
    budget.tick(5.5, due=5.0)  # on time, but downstream was the limit: no reason to grow
    assert budget.size == 10
    sent, _ = budget.take(rest)
    assert len(sent) == 10
    budget.tick(10.5, due=10.0)  # used up without a limit: it grows
    assert budget.size == pytest.approx(13.5)


def test_the_last_tick_of_a_bounded_run_hands_over_the_whole_backlog(es_settings):
    """`newsbeam run --duration`: nothing fetched may stay behind in the backlog at the end."""
    items = [{"title": f"Story {n}", "link": f"https://example.org/{n}", "html": "<p>x</p>"} for n in range(40)]
    with HostileServer() as server:
        feed = Feed(url=server.route("/big.xml", respond(200, rss(items), {"Content-Type": "application/rss+xml"})))
        now = time.time()
        fn = PollShardFn(SETTINGS, es_settings, default_interval=300, settle=5.0, slack=0, tick=30.0, shards=8,
                         stop=now + 10)
        fn.setup()
        try:
            fn.start_bundle()
            backlog = _State()
            out = list(fn.process((0, (feed,)), tick=Timestamp.of(now), states=_State(), backlog_state=backlog))
            assert len([a for a in out if isinstance(a, Article)]) == 40  # not the first budget of 8
            assert backlog.value == []
        finally:
            fn.teardown()


def test_the_budget_shrinks_when_ticks_come_late_and_grows_back_when_they_are_on_time():
    budget = Budget(tick=5.0, start=40)
    budget.tick(0.5, due=0.0)
    budget.tick(25.0, due=5.0)  # downstream held the next tick for 20 s: a quarter of the budget
    assert budget.size == pytest.approx(10)
    sent, rest = budget.take(list(range(100)))
    assert (len(sent), len(rest)) == (10, 90)
    budget.tick(25.5, due=25.0)  # on time and the budget was used up: it grows
    assert budget.size == pytest.approx(13.5)
    budget.take([])  # nothing waiting: no reason to grow
    budget.tick(30.5, due=30.0)
    assert budget.size == pytest.approx(13.5)


def test_ticks_that_queued_behind_downstream_work_each_shrink_the_budget():
    """A runner running stages concurrently queues ticks while downstream bundles hold its
    slots, then delivers them back to back: each was late, so none may grow the budget or hand
    a full one downstream."""
    budget = Budget(tick=5.0, start=40)
    budget.tick(0.5, due=0.0)
    budget.take(list(range(100)))
    sent = []
    for due in (5.0, 10.0, 15.0, 20.0):  # four ticks held back, processed at 60 s
        budget.tick(60.0, due=due)
        sent += budget.take(list(range(100)))[0]
    assert budget.size == Budget.FLOOR and len(sent) <= 5
    # Below one article per tick the budget adds up over ticks: one article in ten.
    released = [len(budget.take(list(range(100)))[0]) for _ in range(20)]
    assert sum(released) == 2 and max(released) == 1


def test_the_tick_generator_waits_until_its_next_tick_is_due_and_no_longer():
    """The local runner resumes the tick generator at once after it defers; it sleeps until
    the tick is due instead of cycling through empty bundles (transforms/poll.py `Ticks`)."""
    from apache_beam.io.restriction_trackers import OffsetRange
    element = (Timestamp.of(1000.0), Timestamp.of(2000.0), 5.0)  # ticks at 1000, 1005, 1010, ...
    assert tick_wait(element, OffsetRange(3, 200), now=1012.5) == pytest.approx(2.5)  # tick 3 due at 1015
    assert tick_wait(element, OffsetRange(3, 200), now=1016.0) == 0.0  # late: fire now
    assert tick_wait(element, OffsetRange(3, 200), now=990.0) == 5.0  # never more than one interval
    assert tick_wait(element, OffsetRange(200, 200), now=1012.5) == 0.0  # range done: nothing to wait for


def test_feed_and_fetch_settings_are_validated(tmp_path):
    feeds_file = tmp_path / "feeds.yaml"
    feeds_file.write_text("feeds:\n  - url: https://a.example/rss\n    poll_interval: 900\n    full_text: true\n"
                          "  - https://b.example/rss\n")
    first, second = load_feeds(feeds_file)
    assert (first.poll_interval, first.full_text) == (900, True)
    assert (second.poll_interval, second.full_text) == (None, False)
    feeds_file.write_text("feeds:\n  - url: https://a.example/rss\n    full_text: yes please\n")
    with pytest.raises(ConfigError, match="full_text must be true or false"):
        load_feeds(feeds_file)
    config = tmp_path / "pipeline.yaml"
    config.write_text("fetch:\n  allow_private_addresses: 1\n")
    with pytest.raises(ConfigError, match="allow_private_addresses must be true or false"):
        load_settings(config)
    config.write_text("fetch:\n  allow_private_addresses: true\n  per_host_delay: 0.5\n")
    assert load_settings(config).fetch.allow_private_addresses and not FetchSettings().allow_private_addresses
