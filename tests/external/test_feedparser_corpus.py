"""EXTERNAL SUITE: feedparser's own test corpus (../shared/corpus/feedparser-tests/tests/
{wellformed,illformed,encoding,entities}, 2,106 files) served over HTTP on loopback with
each file's `Header:` lines, through our fetch-and-parse functions (not a pipeline per
file, so it takes seconds).

Files without a `Content-type` header line get what a static file server sends for `.xml`
(http.server's guess, application/xml). Checks: zero crashes; every file either parsed or refused with a reason (what would be a
dead letter); and agreement with each file's `Expect:` on the files whose expectation is
about fields we keep (titles, links, summaries and content, dates, ids). Prints the rates.
"""
from __future__ import annotations

import datetime
import re
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from newsbeam.pipeline.config import Feed, FetchSettings
from newsbeam.transforms.fetch import FetchError, fetch, new_session
from newsbeam.transforms.parse import declares_entities, parse_document, read_feed
from tests.support import REPO

CORPUS = REPO.parent / "shared" / "corpus" / "feedparser-tests" / "tests"
if not CORPUS.is_dir():
    pytest.skip(f"EXTERNAL SUITE SKIPPED: {CORPUS} is missing (feedparser's test corpus); CI always provides it",
                allow_module_level=True)

pytestmark = pytest.mark.external
FOLDERS = ("wellformed", "illformed", "encoding", "entities")
_HEADER = re.compile(r"^Header:\s+([^:]+):\s*(.*?)\s*$", re.M)
_EXPECT = re.compile(r"^Expect:\s*(.*?)\s*$", re.M)
_KEPT = re.compile(r"\['(title|link|links|description|summary|content|published|published_parsed|updated|"
                   r"updated_parsed|id|guid|language)'\]")
SETTINGS = FetchSettings(allow_private_addresses=True, connect_timeout=2, read_timeout=2, total_timeout=5)


def comment_of(data: bytes) -> str:
    head = data[:4000].decode("utf-8", "replace")
    if "\x00" in head:  # UTF-16/32 test files
        for codec in ("utf-16", "utf-32"):
            try:
                head = data.decode(codec)[:4000]
                break
            except UnicodeDecodeError:
                continue
    return head


class _CorpusServer:
    """Serves corpus files by relative path with exactly the headers their comments name."""

    def __init__(self):
        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                path = CORPUS / self.path.lstrip("/").split("?")[0]
                data = path.read_bytes()
                headers = _HEADER.findall(comment_of(data))
                self.send_response(200)
                if not any(name.lower() == "content-type" for name, _ in headers):
                    # What a static file server sends (http.server's guess for .xml).
                    self.send_header("Content-Type", self.guess_type(path))
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def expectation_holds(expression: str, parsed) -> bool:
    env = dict(parsed)
    try:
        return bool(eval(expression, {"datetime": datetime, "time": time}, env))  # the corpus's own checks
    except Exception:
        return False


def test_feedparser_corpus_through_fetch_and_parse():
    files = sorted(path for folder in FOLDERS for path in (CORPUS / folder).rglob("*.xml"))
    assert len(files) > 2000
    server = _CorpusServer()
    session = new_session(SETTINGS)
    crashes, refused, parsed_ok = [], Counter(), 0
    kept_total, kept_agree, all_total, all_agree = 0, 0, 0, 0
    disagreements: list[str] = []
    started = time.monotonic()
    try:
        for path in files:
            relative = path.relative_to(CORPUS).as_posix()
            expect = _EXPECT.search(comment_of(path.read_bytes()))
            try:
                result = fetch(session, Feed(url=f"http://127.0.0.1:{server.port}/{relative}"), SETTINGS)
                outcome = read_feed(result, 500)
            except FetchError as err:
                refused[err.kind] += 1
                continue
            except Exception as err:  # a crash: the one thing that must never happen
                crashes.append(f"{relative}: {type(err).__name__}: {err}")
                continue
            if outcome.problem:
                assert outcome.reason, relative
                refused[outcome.reason] += 1
            else:
                parsed_ok += 1
            if not expect:
                continue
            expression = expect.group(1)
            holds = (not declares_entities(result.body)) and expectation_holds(expression, parse_document(result))
            all_total += 1
            all_agree += holds
            if _KEPT.search(expression):
                kept_total += 1
                kept_agree += holds
                if not holds:
                    disagreements.append(f"{relative}: {expression[:120]}")
    finally:
        session.close()
        server.close()
    elapsed = time.monotonic() - started
    print(f"\nfeedparser corpus: {len(files)} files in {elapsed:.0f}s; crashes {len(crashes)}; parsed {parsed_ok}; "
          f"refused {sum(refused.values())} {dict(refused)}")
    print(f"agreement with Expect on fields we keep: {kept_agree}/{kept_total} = {kept_agree / kept_total:.1%}; "
          f"on every expectation: {all_agree}/{all_total} = {all_agree / all_total:.1%}")
    for line in disagreements[:15]:
        print("  disagrees:", line)
    assert crashes == [], crashes[:10]
    assert parsed_ok + sum(refused.values()) == len(files)
    assert kept_agree / kept_total >= 0.95
