"""`newsbeam feeds status` (the feed-health table from Elasticsearch) and
`newsbeam feeds import FILE.opml` (adds an OPML list's feeds to a feeds YAML file)."""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from newsbeam.pipeline.config import DEFAULT_CONFIG, ConfigError, Feed, load_feeds, load_settings, load_yaml
from newsbeam.transforms.parse import declares_entities

_BARE_AMPERSAND = re.compile(rb"&(?!(?:[A-Za-z][\w.-]*|#[0-9]+|#x[0-9A-Fa-f]+);)")
_STATUS_FIELDS = ("feed_url", "dead", "error_class", "http_status", "consecutive_failures", "items_seen",
                  "last_success", "last_attempt", "next_poll", "error")


def add_parser(sub: Any) -> None:
    feeds = sub.add_parser("feeds", help="feed health and feed lists")
    actions = feeds.add_subparsers(dest="feeds_command", required=True)
    status = actions.add_parser("status", help="one line per feed: health, errors, next poll")
    status.add_argument("--config", default=None)
    status.add_argument("--es-url", dest="es_url", default=None)
    status.add_argument("--failing", action="store_true", help="only feeds whose last attempt failed")
    status.add_argument("--limit", type=int, default=1000)
    imported = actions.add_parser("import", help="add the feeds of an OPML file to a feeds YAML file")
    imported.add_argument("opml", help="an OPML file (outline elements with xmlUrl)")
    imported.add_argument("--feeds-file", dest="feeds_file", default=None,
                          help="the YAML feed list to extend (default: the one configs/pipeline.yaml names)")


def run(args: argparse.Namespace) -> int:
    if args.feeds_command == "status":
        return cmd_status(args)
    return cmd_import(args)


# ---------------------------------------------------------------- status

def status_rows(client: Any, index: str, failing: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
    """Health documents, the worst first: dead, then by failures, then by URL."""
    query: dict[str, Any] = {"exists": {"field": "error_class"}} if failing else {"match_all": {}}
    response = client.search(index=index, query=query, size=limit, source=list(_STATUS_FIELDS),
                             sort=[{"dead": "desc"}, {"consecutive_failures": "desc"}, {"feed_url": "asc"}],
                             ignore_unavailable=True)
    return [hit["_source"] for hit in response["hits"]["hits"]]


def _when(iso: str | None) -> str:
    return iso.replace("T", " ").rstrip("Z")[:16] if iso else "-"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("STATE", "FAILS", "HTTP", "ITEMS", "LAST SUCCESS", "NEXT POLL", "FEED", "PROBLEM")
    lines = [header]
    for row in rows:
        state = "DEAD" if row.get("dead") else (row.get("error_class") or "ok")
        problem = (row.get("error") or "").replace("\n", " ")[:80]
        lines.append((state, str(row.get("consecutive_failures") or 0), str(row.get("http_status") or "-"),
                      str(row.get("items_seen") or 0), _when(row.get("last_success")), _when(row.get("next_poll")),
                      row.get("feed_url", ""), problem))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1]
                     for line in lines).rstrip()


def cmd_status(args: argparse.Namespace) -> int:
    from newsbeam.transforms.elastic import connect

    settings = load_settings(args.config)
    if args.es_url:
        settings = dataclasses.replace(settings, elasticsearch=dataclasses.replace(settings.elasticsearch,
                                                                                   url=args.es_url))
    client = connect(settings.elasticsearch)
    rows = status_rows(client, settings.elasticsearch.feeds_index, args.failing, args.limit)
    if rows:
        print(format_table(rows))
    dead = sum(1 for row in rows if row.get("dead"))
    failing = sum(1 for row in rows if row.get("error_class"))
    print(f"{len(rows)} feed(s): {failing} failing, {dead} dead", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- import

def read_opml(path: Path) -> list[Feed]:
    """Feeds of an OPML file (every outline with an http(s) `xmlUrl`, nested or not)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror}") from None
    if declares_entities(data):
        raise ConfigError(f"{path}: the file declares XML entities; refused")
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        # Real OPML exports often carry bare '&' in titles ("News & Headlines").
        try:
            root = ElementTree.fromstring(_BARE_AMPERSAND.sub(b"&amp;", data))
        except ElementTree.ParseError as err:
            raise ConfigError(f"{path}: not valid OPML/XML: {err}") from None
    feeds, seen = [], set()
    for outline in root.iter("outline"):
        url = (outline.get("xmlUrl") or outline.get("xmlurl") or "").strip()
        if not url or url in seen:
            continue
        try:
            feed = Feed(url=url, name=(outline.get("title") or outline.get("text") or "").strip())
        except ConfigError:
            continue  # not http(s): nothing we would fetch
        seen.add(url)
        feeds.append(feed)
    return feeds


def _yaml_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def append_feeds(feeds_file: Path, feeds: list[Feed]) -> list[Feed]:
    """Appends the feeds not yet listed to `feeds_file` as text (comments and order of the
    existing file are kept); returns the ones added. The result is validated."""
    existing: tuple[Feed, ...] = ()
    original = ""
    if feeds_file.exists():
        original = feeds_file.read_text(encoding="utf-8")
        raw = load_yaml(feeds_file)
        if not (isinstance(raw, dict) and isinstance(raw.get("feeds"), list)) and raw is not None:
            raise ConfigError(f"{feeds_file}: expected 'feeds:' with a list to append to")
        existing = load_feeds(feeds_file) if raw else ()
    known = {feed.url for feed in existing}
    added = [feed for feed in feeds if feed.url not in known]
    if not added:
        return []
    text = original if original.strip() else "# Feeds polled by `newsbeam run`.\nfeeds:\n"
    if not text.endswith("\n"):
        text += "\n"
    for feed in added:
        text += f"  - url: {_yaml_quote(feed.url)}\n"
        if feed.name:
            text += f"    name: {_yaml_quote(feed.name)}\n"
    feeds_file.write_text(text, encoding="utf-8")
    try:
        if {f.url for f in load_feeds(feeds_file)} != known | {f.url for f in added}:
            raise ConfigError(f"{feeds_file}: appending did not give the expected list")
    except ConfigError:
        feeds_file.write_text(original, encoding="utf-8")
        raise
    return added


def cmd_import(args: argparse.Namespace) -> int:
    if args.feeds_file:
        feeds_file = Path(args.feeds_file)
    else:
        raw = load_yaml(DEFAULT_CONFIG) or {}
        feeds_file = DEFAULT_CONFIG.parent / raw.get("feeds_file", "feeds.yaml")
    feeds = read_opml(Path(args.opml))
    added = append_feeds(feeds_file, feeds)
    print(f"{len(feeds)} feed(s) in {args.opml}; {len(added)} added to {feeds_file}, "
          f"{len(feeds) - len(added)} already listed", file=sys.stderr)
    return 0
