"""A real HTTP server on 127.0.0.1 for tests: serves feeds we build, can change them
while a pipeline runs, and can misbehave on purpose (slow, huge, erroring)."""
from __future__ import annotations

import html
import json
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from tests.support.loopback import LoopbackServer, QuietHandler

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def fixture_articles() -> dict[str, dict[str, Any]]:
    return {a["key"]: a for a in json.loads((FIXTURES / "articles.json").read_text())}


def rss(items: list[dict[str, Any]], title: str = "Example World News") -> bytes:
    """An RSS 2.0 document; each item has title, link, html and optionally published/guid."""
    parts = [f'<?xml version="1.0" encoding="UTF-8"?>\n<rss version="2.0" '
             f'xmlns:content="http://purl.org/rss/1.0/modules/content/"><channel>'
             f'<title>{html.escape(title)}</title><link>https://news.example.org/</link>'
             f'<description>Test feed</description><language>en-us</language>']
    for item in items:
        published = item.get("published") or format_datetime(datetime.now(UTC))
        parts.append(
            f"<item><title>{html.escape(item['title'])}</title><link>{html.escape(item['link'])}</link>"
            f"<guid isPermaLink=\"false\">{html.escape(item.get('guid', item['link']))}</guid>"
            f"<pubDate>{published}</pubDate>"
            f"<description>{html.escape(item.get('summary', item['title']))}</description>"
            f"<content:encoded>{html.escape(item['html'])}</content:encoded></item>")
    parts.append("</channel></rss>")
    return "".join(parts).encode("utf-8")


class FeedServer(LoopbackServer):
    """Routes path -> (status, headers, body or callable, delay). Counts requests per path."""

    def __init__(self):
        self.routes: dict[str, tuple[int, dict[str, str], Any, float]] = {}
        self.hits: dict[str, int] = {}
        self.log: list[tuple[float, str]] = []
        server = self

        class Handler(QuietHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                server.hits[path] = server.hits.get(path, 0) + 1
                server.log.append((time.time(), path))
                status, headers, body, delay = server.routes.get(path, (404, {}, b"not found", 0.0))
                if callable(body):
                    body = body()
                if delay:
                    time.sleep(delay)
                self.send_response(status)
                headers = {"Content-Type": "application/rss+xml; charset=utf-8", **headers}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        super().__init__(Handler)

    def serve(self, path: str, body: Any, status: int = 200, headers: dict[str, str] | None = None,
              delay: float = 0.0) -> str:
        self.routes[path] = (status, headers or {}, body, delay)
        return self.url(path)
