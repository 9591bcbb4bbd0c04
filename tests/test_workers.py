"""Worker processes for spaCy and feedparser (transforms/workers.py) and their use in the
NER DoFn: same tags as in-process, and a worker that dies costs one dead letter, not a batch."""
import dataclasses
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import pytest
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils import shared
from apache_beam.utils.timestamp import Timestamp

from newsbeam.pipeline.config import NlpSettings
from newsbeam.transforms import timing
from newsbeam.transforms.article import Article
from newsbeam.transforms.clean import clean_article
from newsbeam.transforms.entities import TagEntitiesFn
from newsbeam.transforms.settings import StageSizes
from newsbeam.transforms.workers import WorkerPool
from tests import workerjobs
from tests.support.feedserver import fixture_articles


def test_a_pool_runs_in_order_and_survives_a_dead_worker():
    pool = WorkerPool(2, name="test")
    try:
        futures = [pool.submit(workerjobs.square, chunk) for chunk in ([1, 2], [3], [4, 5])]
        assert [future.result() for future in futures] == [[1, 4], [9], [16, 25]]
        with pytest.raises(BrokenProcessPool):
            pool.submit(workerjobs.die, None).result()
        assert pool.submit(workerjobs.square, [6]).result() == [36]  # a new pool took over
    finally:
        pool.shutdown()


def test_a_pool_says_how_much_more_work_it_takes_from_what_its_tasks_cost(tmp_path):
    """The poller hands spaCy no more than it can do before the next tick: the pool turns the
    units (articles) of its unfinished tasks into seconds with the cost its users report."""
    pool = WorkerPool(1, name="test")
    release = tmp_path / "release"
    try:
        assert pool.room(10.0) is None  # idle and nothing known: no limit
        held = [pool.submit(workerjobs.wait_for, str(release), units=units) for units in (4, 2)]
        assert pool.room(10.0) == 0  # work waits and what it costs is unknown
        pool.record_cost(4, 2.0)  # 0.5 s an article
        assert pool.room(10.0) == pytest.approx(10 / 0.5 - 6)
        pool.record_cost(1, 1.0)  # recent batches weigh most: 0.8 x 0.5 + 0.2 x 1.0
        assert pool.room(10.0) == pytest.approx(10 / 0.6 - 6)
        release.touch()
        for future in held:
            future.result(timeout=60)
        assert pool.room(10.0) == pytest.approx(10 / 0.6)  # finished work takes no room
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_pooled_ner_reports_what_its_batches_cost_to_the_pool():
    from newsbeam.transforms.workers import NLP_POOL, room

    articles = _articles()
    before = timing.snapshot().get("entities", {"seconds": 0.0, "elements": 0})
    fn = TagEntitiesFn(NlpSettings(processes=1), shared.Shared(), sizes=StageSizes(ner_tail_batch=0))
    fn.setup()
    try:
        assert room(NLP_POOL, 5.0) is None
        fn.start_bundle()
        for article in articles:
            list(fn.process(article, timestamp=Timestamp(0), window=GlobalWindow()))
        list(fn.finish_bundle())
        after = timing.snapshot()["entities"]
        seconds = after["seconds"] - before["seconds"]
        assert after["elements"] - before["elements"] == len(articles) <= fn.batch_size  # one batch
        # the pool's cost of an article is the seconds the worker reported (rounded to 1 ms here)
        assert 5.0 / room(NLP_POOL, 5.0) * len(articles) == pytest.approx(seconds, abs=0.002)
    finally:
        fn.teardown()


def _articles() -> list[Article]:
    return [clean_article(Article(title=f["title"], content_html=f["html"], article_id=key, url=key))
            for key, f in fixture_articles().items()]


def poisoned(article: Article, **fields: str) -> Article:
    """A copy of `article` that a test's worker or thread fails on."""
    return dataclasses.replace(article, title="poison", article_id="poison", url="poison", **fields)


def _run(fn: TagEntitiesFn, articles: list[Article]) -> list:
    fn.setup()
    try:
        fn.start_bundle()
        out = []
        for article in articles:
            out += list(fn.process(article, timestamp=Timestamp(0), window=GlobalWindow()))
        out += list(fn.finish_bundle())
        return [o.value if isinstance(o, TaggedOutput) else o for o in out], out
    finally:
        fn.teardown()


@pytest.mark.slow
def test_pooled_ner_tags_exactly_like_in_process_ner():
    articles = _articles()
    in_process, _ = _run(TagEntitiesFn(NlpSettings(processes=0), shared.Shared()), articles)
    pooled, _ = _run(TagEntitiesFn(NlpSettings(processes=2, batch_size=8), shared.Shared()), articles)
    assert [a.value.article_id for a in pooled] == [a.article_id for a in articles]  # order kept
    assert [a.value.entities for a in pooled] == [a.value.entities for a in in_process]
    assert [a.value.lemmas for a in pooled] == [a.value.lemmas for a in in_process]


class _PoisonedFn(TagEntitiesFn):
    worker = staticmethod(workerjobs.tag_or_die)


@pytest.mark.slow
def test_an_article_that_kills_its_worker_is_a_dead_letter_and_the_batch_is_still_tagged():
    articles = _articles()
    articles.insert(2, poisoned(articles[0]))
    values, raw = _run(_PoisonedFn(NlpSettings(processes=2, batch_size=8), shared.Shared()), articles)
    dead = [o.value.value for o in raw if isinstance(o, TaggedOutput)]
    assert [(d["stage"], d["article_id"]) for d in dead] == [("entities", "poison")]
    assert "BrokenProcessPool" in dead[0]["reason"]
    tagged = [v.value for v in values if isinstance(v.value, Article)]
    assert sorted(a.article_id for a in tagged) == sorted(fixture_articles())


def test_in_process_ner_runs_on_a_thread_and_an_article_that_breaks_it_is_a_dead_letter(monkeypatch):
    from newsbeam.transforms import entities

    threads, intervals = set(), set()

    def tag_or_raise(nlp, articles, settings):
        threads.add(threading.current_thread().name)
        intervals.add(sys.getswitchinterval())
        if any(article.article_id == "poison" for article in articles):
            raise ValueError("cannot tag this")
        return real_tag(nlp, articles, settings)

    real_tag = entities.tag_entities
    monkeypatch.setattr(entities, "tag_entities", tag_or_raise)
    articles = _articles()
    articles.insert(2, poisoned(articles[0]))
    before, interval = timing.snapshot(), sys.getswitchinterval()
    values, raw = _run(TagEntitiesFn(NlpSettings(processes=0, batch_size=8), shared.Shared()), articles)
    # while spaCy's thread runs it gets the GIL back sooner than the default 5 ms allow; not after
    assert intervals == {entities.GIL_SWITCH_INTERVAL} and entities.GIL_SWITCH_INTERVAL < interval
    assert sys.getswitchinterval() == interval
    spent = {name: {key: value[key] - before.get(name, {}).get(key, 0) for key in value}
             for name, value in timing.snapshot().items() if name.startswith("entities")}
    # wall time, the spaCy thread's CPU time and its run-queue wait, for every tagged article
    assert {name: value["elements"] for name, value in spent.items()} == {
        "entities": len(articles) - 1, "entities_cpu": len(articles) - 1, "entities_run_queue": len(articles) - 1}
    assert 0 < spent["entities_cpu"]["seconds"] <= spent["entities"]["seconds"] * 1.05 + 0.01
    dead = [o.value.value for o in raw if isinstance(o, TaggedOutput)]
    assert [(d["stage"], d["article_id"], d["reason"], d["error"]) for d in dead] == [
        ("entities", "poison", "ValueError", "cannot tag this")]
    tagged = [v.value.article_id for v in values if isinstance(v.value, Article)]
    assert tagged == [a.article_id for a in articles if a.article_id != "poison"]  # order kept
    assert threads and all(name.startswith("newsbeam-spacy") for name in threads)


def test_the_switch_interval_comes_back_when_the_last_in_process_tagger_is_torn_down():
    from newsbeam.transforms import entities

    interval, model = sys.getswitchinterval(), shared.Shared()
    broken = TagEntitiesFn(NlpSettings(processes=0, model="no_such_model"), shared.Shared())
    with pytest.raises(RuntimeError, match="no_such_model"):
        broken.setup()
    broken.teardown()  # Beam tears down after a failed setup too: that must not count as a tagger
    first, second = (TagEntitiesFn(NlpSettings(processes=0), model) for _ in range(2))
    first.setup()
    second.setup()
    try:
        first.teardown()
        first.teardown()
        assert sys.getswitchinterval() == entities.GIL_SWITCH_INTERVAL  # the second still tags
    finally:
        second.teardown()
    assert sys.getswitchinterval() == interval


def test_the_fnapi_runner_merges_metrics_into_lists_not_a_chain_of_generators():
    """Beam's FnApiRunner keeps `consolidate(chain(new, previous))` per stage; a generator there
    holds every earlier bundle for the rest of a streaming run (pipeline/beam_fixes.py)."""
    from apache_beam.metrics import monitoring_infos
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    from newsbeam.pipeline.beam_fixes import bound_fnapi_metrics

    bound_fnapi_metrics()
    bound_fnapi_metrics()  # idempotent
    merged: list = []
    for value in range(1000):  # what the runner does once per bundle
        counter = monitoring_infos.int64_user_counter("newsbeam", "n", value)
        merged = fn_runner.consolidate_monitoring_infos([counter, *merged])
    assert isinstance(merged, list) and len(merged) == 1
    assert monitoring_infos.extract_counter_value(merged[0]) == sum(range(1000))


def test_state_values_weigh_the_same_without_collecting_module_globals_each_time():
    """pipeline/beam_fixes.py: the state cache's weights (what bounds its memory) must not change."""
    import objsize
    from apache_beam.runners.worker import statecache

    from newsbeam.pipeline.beam_fixes import cheap_state_weights

    articles = list(fixture_articles().values())
    values = [True, None, ("feed", 1.5, None), b"\x00" * 300, articles[0],
              [dict(article, entities=[{"text": "Vladimir Putin", "label": "PERSON"}]) for article in articles]]
    before = [objsize.get_deep_size(value, get_size_func=statecache._size_func,  # Beam's own weighing
                                    get_referents_func=statecache._get_referents_func,
                                    filter_func=statecache._filter_func) for value in values]
    cheap_state_weights()
    cheap_state_weights()  # idempotent
    assert getattr(statecache.get_deep_size, "newsbeam_cheap", False)
    assert [statecache.get_deep_size(value) for value in values] == before
    assert before[-1] > before[-2] > before[0] > 0  # real weights, not a constant


@pytest.mark.parametrize("schedstat", [True, False], ids=["schedstat", "thread_time"])
def test_the_thread_clock_counts_cpu_time_not_sleep(monkeypatch, schedstat):
    if not schedstat:  # other systems: no /proc/thread-self
        def no_proc(*_, **__):
            raise OSError("no /proc")
        monkeypatch.setattr(timing, "open", no_proc, raising=False)
    cpu = timing.thread_clock()[0]
    time.sleep(0.3)
    slept = timing.thread_clock()[0] - cpu
    # Busy until the process has used 0.2 s of CPU (however long a loaded machine takes to give
    # it that): the thread's clock must have counted that much, and no more.
    cpu, process, give_up = timing.thread_clock()[0], time.process_time(), time.monotonic() + 60
    while time.process_time() - process < 0.2 and time.monotonic() < give_up:
        pass
    busy, spent = timing.thread_clock()[0] - cpu, time.process_time() - process
    assert slept < 0.05
    assert spent >= 0.2 and 0.15 < busy <= spent + 0.05


def test_instances_of_a_dofn_in_one_process_share_one_pool_that_goes_with_the_last():
    """A runner may run several instances of a DoFn in one process at once (Prism's loopback
    worker does): one pool of worker processes between them, not one each."""
    from newsbeam.transforms.workers import shared_pool

    first, second = shared_pool(2, name="test"), shared_pool(2, name="test")
    other = shared_pool(1, name="test")
    try:
        assert first._pool is second._pool and other._pool is not first._pool
        assert first.submit(workerjobs.square, [3]).result() == [9]
        pool = first._pool
        first.shutdown()
        assert second.submit(workerjobs.square, [4]).result() == [16]  # still up for the other user
        second.shutdown()
        with pytest.raises(RuntimeError):
            pool.submit(workerjobs.square, [5]).result()  # the last user shut it down
    finally:
        other.shutdown()


def test_with_no_processes_a_pool_is_one_thread_and_a_stuck_task_holds_up_none_queued_behind_it():
    """In-process spaCy and feedparser: one thread for every DoFn instance of the process. A task
    past its deadline cannot be stopped; the tasks queued behind it go to a new thread, not lost."""
    pool, release = WorkerPool(0, name="test"), threading.Event()
    try:
        stuck = pool.submit(lambda: release.wait(120) and threading.get_ident())
        queued = [pool.submit(threading.get_ident, units=2) for _ in range(3)]
        give_up = time.monotonic() + 60
        while not stuck.running() and time.monotonic() < give_up:
            time.sleep(0.01)
        assert pool.started(stuck) and not pool.started(queued[0])
        with pytest.raises(TimeoutError):  # one thread: nothing else runs while the stuck task does
            queued[0].result(timeout=0.5)
        pool.record_cost(2, 1.0)
        assert pool.room(10.0) == pytest.approx(10 / 0.5 - 1 - 6)  # one thread's worth, less what waits
        pool.replace(stuck)
        idents = {future.result(timeout=60) for future in queued}
        assert not stuck.done() and len(idents) == 1  # the stuck one still runs, alone
        assert pool.room(10.0) == pytest.approx(10 / 0.5)  # it no longer holds the queue up
        release.set()
        assert stuck.result(timeout=60) not in idents  # it finished on the old thread
        hold = threading.Event()
        pool.submit(hold.wait, 60)
        waiting = pool.submit(time.sleep, 0)
    finally:
        pool.shutdown()
    hold.set()
    assert waiting.cancelled()  # what had not started is cancelled, not left to hang
    with pytest.raises(RuntimeError):
        pool.submit(time.sleep, 0)


def test_in_process_ner_instances_share_one_spacy_thread_and_tag_one_batch_at_a_time(monkeypatch):
    """Prism runs several bundles of the NER stage at once, each in an instance of its own: with
    spaCy in-process their batches queue for one thread instead of running side by side."""
    from newsbeam.transforms import entities

    lock, running, most, threads = threading.Lock(), [0], [0], set()
    real_tag = entities.tag_entities

    def counted_tag(nlp, articles, settings):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            threads.add(threading.get_ident())
        try:
            time.sleep(0.05)  # long enough for the other instance's batch to arrive meanwhile
            return real_tag(nlp, articles, settings)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(entities, "tag_entities", counted_tag)
    model, articles = shared.Shared(), _articles()
    fns = [TagEntitiesFn(NlpSettings(processes=0), model, sizes=StageSizes(ner_batch=1, ner_in_flight=4))
           for _ in range(2)]
    outputs: list = []
    for fn in fns:
        fn.setup()
    try:
        for fn in fns:
            fn.start_bundle()
        for article in articles:  # both instances have batches in flight at once
            for fn in fns:
                outputs += list(fn.process(article, timestamp=Timestamp(0), window=GlobalWindow()))
        for fn in fns:
            outputs += list(fn.finish_bundle())
    finally:
        for fn in fns:
            fn.teardown()
    tagged = [o.value for o in outputs if isinstance(o.value, Article)]
    assert len(tagged) == 2 * len(articles) and all(article.lemmas for article in tagged)
    assert len(threads) == 1 and most[0] == 1


def test_the_poll_budget_follows_a_spacy_process_pool_but_not_an_in_process_thread():
    from newsbeam.transforms.workers import room, shared_pool

    hold = threading.Event()
    thread, processes = shared_pool(0, name="room-test"), shared_pool(1, name="room-test")
    try:
        for pool in (thread, processes):
            pool.record_cost(1, 1.0)  # one second an article
        thread.submit(hold.wait, 60, units=2)
        assert room("room-test", 5.0) == pytest.approx(5.0)  # the process pool's alone: idle, 5 articles
        processes.submit(hold.wait, 60, units=3)
        assert room("room-test", 5.0) == pytest.approx(5.0 - 3)
    finally:
        hold.set()
        thread.shutdown()
        processes.shutdown()
