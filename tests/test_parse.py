import dataclasses
import time

from newsbeam.pipeline.config import Feed
from newsbeam.transforms import clock
from newsbeam.transforms.fetch import FetchResult
from newsbeam.transforms.parse import article_id, canonical_url, safe_read_feed
from tests.support.feedserver import fixture_articles, rss


def result(body: bytes, url: str = "https://news.example.org/feed.xml", headers=None) -> FetchResult:
    return FetchResult(feed=Feed(url=url), final_url=url, status=200, headers=headers or {}, body=body,
                       fetched_at=time.time(), elapsed=0.1)


def parse(fetched: FetchResult, max_items: int) -> tuple[list[dict], str | None]:
    """What PollFeeds' parser runs: (articles, problem)."""
    parsed = safe_read_feed(fetched, max_items, 200_000)
    return parsed.articles, parsed.problem


def test_canonical_url_drops_tracking_and_normalises_host():
    assert canonical_url("HTTP://WWW.Example.org:80/a/b/?utm_source=x&id=3&fbclid=y#top") == \
        "https://example.org/a/b?id=3"
    assert canonical_url("https://example.org/a?b=2&a=1") == "https://example.org/a?a=1&b=2"


def test_article_id_is_stable_across_tracking_variants_and_falls_back_to_guid():
    assert article_id("https://example.org/story?utm_campaign=rss") == article_id("http://www.example.org/story")
    assert article_id("https://example.org/story") != article_id("https://example.org/other")
    assert article_id("", "tag:example.org,2020:1") == article_id("", "tag:example.org,2020:1")
    assert article_id("", "tag:example.org,2020:1") != article_id("", "tag:example.org,2020:2")


def test_parse_feed_extracts_articles():
    fixture = fixture_articles()["ventilators"]
    articles, problem = parse(result(rss([fixture], title="Example Wire")), max_items=10)
    assert problem is None
    (article,) = articles
    assert article.title == fixture["title"]
    assert article.url == fixture["link"]
    assert article.article_id == article_id(fixture["link"])
    assert article.published_at == "2020-05-21T14:05:00Z"
    assert article.publisher == "Example Wire"
    assert article.source == "news.example.org"
    assert article.language == "en"
    assert "<script" not in article.content_html  # feedparser's sanitiser dropped it
    assert "ventilators to Russia" in article.content_html


def test_placeholder_and_far_future_dates_are_dropped_not_sent_to_elasticsearch():
    """Real feeds carry "0001-01-01" (strftime writes year 1 as "1-01-01", which Elasticsearch
    rejects) and the epoch; an article keeps no published_at rather than a wrong one."""
    items = [{"title": f"t{n}", "link": f"https://example.org/{n}", "html": "<p>x</p>", "published": published}
             for n, published in enumerate(["Mon, 01 Jan 0001 00:00:00 +0000", "Thu, 01 Jan 1970 00:00:00 GMT",
                                             "Fri, 01 Jan 2100 00:00:00 GMT", "Thu, 21 May 2020 14:05:00 GMT"])]
    articles, problem = parse(result(rss(items)), max_items=10)
    assert problem is None
    assert [a.published_at for a in articles] == [None, None, None, "2020-05-21T14:05:00Z"]


def test_parse_feed_caps_items():
    items = [{"title": f"t{i}", "link": f"https://example.org/{i}", "html": "<p>x</p>"} for i in range(30)]
    articles, _ = parse(result(rss(items)), max_items=7)
    assert len(articles) == 7


def test_parse_feed_reports_garbage_as_problem():
    articles, problem = parse(result(b"<html><body>definitely not a feed"), max_items=10)
    assert articles == []
    assert problem


def test_well_formed_non_feeds_are_problems_but_empty_feeds_are_not():
    page = result(b"<html><body>a web page</body></html>", headers={"content-type": "text/xml"})
    articles, problem = parse(page, max_items=10)
    assert articles == [] and problem.startswith("not a feed")
    assert parse(result(rss([]), headers={"content-type": "application/rss+xml"}), max_items=10) == ([], None)


def test_parse_feed_reads_atom():
    atom = b"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xml:lang="fr"><title>Atom News</title>
<entry><title>Un titre</title><link href="https://example.fr/a1"/><id>urn:a1</id>
<updated>2021-03-04T05:06:07+02:00</updated><content type="html">&lt;p&gt;Texte&lt;/p&gt;</content></entry></feed>"""
    (article,), _ = parse(result(atom), max_items=10)
    assert article.url == "https://example.fr/a1"
    assert article.published_at == "2021-03-04T03:06:07Z"
    assert article.language == "fr"


def test_parse_feed_never_fetches_a_url_it_is_given_as_the_body(feed_server):
    """feedparser fetches a string that looks like a URL; the parser must read it as (bad) content.
    The URL names a live server with a real feed, so fetching it would show as a hit or an article."""
    url = feed_server.serve("/never-fetched.xml", rss([fixture_articles()["ventilators"]]))
    articles, problem = parse(result(url.encode()), max_items=10)
    assert articles == [] and problem
    assert feed_server.hits == {}


def test_fetched_at_is_kept_to_the_millisecond():
    fixture = fixture_articles()["ventilators"]
    fetched = dataclasses.replace(result(rss([fixture])), fetched_at=1_800_000_000.25)
    articles, _ = parse(fetched, max_items=10)
    assert articles[0].fetched_at == "2027-01-15T08:00:00.250Z"
    assert clock.epoch(articles[0].fetched_at) == 1_800_000_000.25
    assert clock.epoch("2027-01-15T08:00:00Z") == 1_800_000_000.0  # documents of earlier releases
