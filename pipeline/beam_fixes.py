"""Work-arounds for Beam's local FnApiRunner (checked on Beam 2.77)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def bound_fnapi_metrics() -> None:
    """The FnApiRunner merges each bundle's metrics into the stage's earlier ones with
    `monitoring_infos.consolidate`, which is a generator: every bundle adds one nested
    generator that holds that bundle's metrics for the rest of the run. A streaming run makes
    bundles forever (when there is nothing to do it cycles through empty ones), so memory grows
    without bound and reading the metrics recurses once per bundle (docs/benchmarks.md).
    Materialising each merge keeps one short list per stage. Idempotent."""
    from apache_beam.metrics import monitoring_infos
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    if getattr(fn_runner.consolidate_monitoring_infos, "newsbeam_bounded", False):
        return

    def consolidate(metrics: Iterable[Any]) -> list[Any]:
        return list(monitoring_infos.consolidate(metrics))

    consolidate.newsbeam_bounded = True  # type: ignore[attr-defined]
    fn_runner.consolidate_monitoring_infos = consolidate


def cheap_state_weights() -> None:
    """The SDK worker's state cache weighs every value it loads or stores (`get_deep_size`,
    objsize), and objsize starts each weighing by collecting the globals dict of every loaded
    module (costly with Beam, spaCy and the Elasticsearch client loaded), for every read and
    write of every key: each article's dedupe flag paid it two or three times. Beam's filter
    already skips modules, types and functions, so a state value never reaches a module's globals
    and weighing without collecting them gives the same weights. Idempotent."""
    from apache_beam.runners.worker import statecache
    from objsize.traverse import ObjSizeSettings

    if getattr(statecache.get_deep_size, "newsbeam_cheap", False):
        return
    settings = ObjSizeSettings(get_referents_func=statecache._get_referents_func, filter_func=statecache._filter_func,
                               get_size_func=statecache._size_func, exclude_modules_globals=False)

    def get_deep_size(*objs: Any) -> int:
        return settings.get_deep_size(*objs)

    get_deep_size.newsbeam_cheap = True  # type: ignore[attr-defined]
    statecache.get_deep_size = get_deep_size
