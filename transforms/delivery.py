"""Alert delivery: an outbox in Elasticsearch, the senders (log, stdout, webhook,
Slack-compatible webhook, email over SMTP) and the loop that runs them.

Every alert document carries one delivery record per target: the target's id and a
redacted label (never its address: webhook and Slack URLs and recipient lists are secrets
that live only in the rules index), `pending` or `delivered`, attempts, the last error. The
`Outbox` sends what is due, target by target:

* Each target is swept on its own (its oldest pending alerts, a page at a time), so a
  target that is down, slow or has thousands pending never holds back the others.
* A sender first claims an alert (an update conditional on its sequence number that
  sets `claimed_until`), then sends, then records the result under the same condition.
  Two senders never send the same alert at once; a sender that dies mid-way leaves a claim
  that expires, and the alert is sent again: at-least-once. Every send has an overall
  deadline shorter than the claim, so a slow endpoint cannot outlive its claim.
* A failure keeps the delivery pending and backs the target off exponentially (from
  `retry_initial`, doubling, capped at `retry_max`). The back-off is a document per target
  in `<alerts index>-targets`, shared by every deliverer and kept across restarts.
* A digest target (rule with `digest_seconds`) is due when its oldest pending alert is
  that old: then one message lists every pending alert of that rule for that target.
* The address of a target is looked up in the rules index at send time; an alert whose
  target no rule names any more is marked `dropped` (with the reason), not retried forever.

`DeliveryLoop` runs the sweeps (and any extra `PeriodicJob`s) in one thread: `newsbeam run`
starts it beside the pipeline, `newsbeam alerts deliver` runs it on its own.
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import html
import http.client
import json
import logging
import os
import random
import re
import smtplib
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

from elasticsearch import (
    ApiError,
    AuthorizationException,
    ConflictError,
    Elasticsearch,
    NotFoundError,
    TransportError,
)

from newsbeam.transforms.clock import epoch, iso
from newsbeam.transforms.elastic import connect, target_state_index
from newsbeam.transforms.redact import scrub
from newsbeam.transforms.rules import RuleError, Target, parse_target
from newsbeam.transforms.settings import AlertSettings, ConfigError, ElasticsearchSettings, SmtpSettings

_LOG = logging.getLogger(__name__)
PENDING, DELIVERED, DROPPED = "pending", "delivered", "dropped"
_DIGEST_LIMIT = 5000  # alerts listed in one digest message; more go out in the next one
_PAGE = 100  # alerts of one target claimed per sweep; a full page asks for another sweep at once
# Alerts matched in one batch share `matched_at` to the millisecond: the id breaks the tie, so
# every sweep agrees on which alert is a target's oldest.
OLDEST_FIRST = [{"matched_at": "asc"}, {"alert_id": "asc"}]
_ERROR_BODY_BYTES = 2048  # of a refusing endpoint's answer, read for the error message
_CLAIM_MARGIN = 5.0  # seconds a claim outlives the longest send (writes before and after it)


class DeliveryError(Exception):
    """A target did not take the message; it will be retried."""


# --- targets -----------------------------------------------------------------------------

def target_id(target: Target) -> str:
    """The key of a target in alert documents and the back-off index: a hash, any length in."""
    return "t-" + hashlib.sha256(str(target).encode("utf-8")).hexdigest()[:24]


def target_label(target: Target) -> str:
    """What people see of a target outside the rules index: its kind and host, no secret."""
    if target.kind in ("webhook", "slack"):
        return f"{target.kind}:{urlsplit(target.address).hostname or '?'} ({target_id(target)[2:10]})"
    if target.kind == "email":
        recipients = target.address.split(",")
        domains = sorted({r.rpartition("@")[2] for r in recipients})
        return f"email:{len(recipients)} recipient(s) at {', '.join(domains[:3])}" + (" …" if len(domains) > 3 else "")
    return str(target)


# --- delivery records --------------------------------------------------------------------

def new_deliveries(targets: tuple[Target, ...], digest_seconds: int, now: float) -> list[dict[str, Any]]:
    """Pending delivery records for a new alert: due now, or when its digest window closes."""
    return [{"target_id": target_id(target), "target_label": target_label(target), "status": PENDING,
             "attempts": 0, "digest_seconds": digest_seconds, "next_attempt": iso(now + digest_seconds),
             "claimed_until": None, "last_error": "", "delivered_at": None}
            for target in targets]


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Sets the top-level fields the outbox queries: the pending target ids and when the
    earliest of them is due (not before a claim on it expires)."""
    pending = [d for d in doc["deliveries"] if d["status"] == PENDING]
    doc["pending_targets"] = [d["target_id"] for d in pending]
    due = [max(epoch(d["next_attempt"]), epoch(d.get("claimed_until") or iso(0))) for d in pending]
    doc["next_attempt"] = iso(min(due)) if due else None
    return doc


# --- rendering ---------------------------------------------------------------------------

_HIGHLIGHT = re.compile(r"\*\*(.+?)\*\*")
_VOLUME_PAYLOAD = ("kind", "volume_key", "window_start", "window_end", "count", "distinct_sources", "baseline",
                   "baseline_counts", "threshold", "articles")


def safe_link(url: Any) -> str:
    """The article link if it is a plain http(s) URL, else "": a `javascript:` or `data:`
    link from a feed must never become something a reader clicks."""
    if not isinstance(url, str):
        return ""
    url = url.strip()
    if not url or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    return url if parts.scheme.lower() in ("http", "https") and parts.hostname else ""


def alert_payload(alert: dict[str, Any]) -> dict[str, Any]:
    """What a webhook receives for one alert (and, in a list, for a digest); a volume alert
    adds its evidence under `volume`."""
    article = {key: alert.get(key) for key in ("article_id", "title", "source", "publisher", "published_at", "topics")}
    payload = {"alert_id": alert["alert_id"], "rule": alert["rule"], "matched_terms": alert.get("matched_terms", []),
               "snippet": alert.get("snippet", ""), "matched_at": alert.get("matched_at"),
               "article": {**article, "url": safe_link(alert.get("url")) or None}}
    if alert.get("kind"):
        payload["volume"] = {key: alert.get(key) for key in _VOLUME_PAYLOAD}
    return payload


def digest_payload(rule: str, alerts: list[dict[str, Any]], now: float) -> dict[str, Any]:
    return {"type": "digest", "rule": rule, "count": len(alerts),
            "window_start": min(a["matched_at"] for a in alerts), "window_end": iso(now),
            "alerts": [alert_payload(a) for a in alerts]}


def _one_line(text: str) -> str:
    return " ".join((text or "").split())


def render_text(alerts: list[dict[str, Any]], rule: str) -> tuple[str, str]:
    """(subject, plain-text body) for email and logs; highlights stay as **word**."""
    if len(alerts) == 1:
        subject = f"[newsbeam] {rule}: {_one_line(alerts[0].get('title', ''))}"
    else:
        subject = f"[newsbeam] {rule}: {len(alerts)} new matches"
    blocks = []
    for alert in alerts:
        lines = [_one_line(alert.get("title", "")) or "(untitled)", safe_link(alert.get("url")) or "(no http link)"]
        meta = " · ".join(x for x in (alert.get("source"), alert.get("published_at")) if x)
        if meta:
            lines.append(meta)
        lines.append("matched: " + ", ".join(alert.get("matched_terms", [])))
        if alert.get("snippet"):
            lines.append(alert["snippet"])
        blocks.append("\n".join(lines))
    return subject, "\n\n".join(blocks) + f"\n\n-- newsbeam alert rule {rule!r}\n"


def render_html(alerts: list[dict[str, Any]], rule: str) -> str:
    """The HTML alternative: every piece of article text escaped, highlights as <mark>, and a
    link only to an http(s) URL."""
    def text(value: Any) -> str:
        return _HIGHLIGHT.sub(r"<mark>\1</mark>", html.escape(str(value or ""), quote=True))
    items = []
    for alert in alerts:
        title = text(_one_line(alert.get("title", ""))) or "(untitled)"
        url = safe_link(alert.get("url"))
        heading = f'<a href="{html.escape(url, quote=True)}">{title}</a>' if url else title
        items.append(f'<li>{heading} <small>{text(alert.get("source"))}</small><br>'
                     f'matched: {text(", ".join(alert.get("matched_terms", [])))}<br>'
                     f'<blockquote>{text(alert.get("snippet"))}</blockquote></li>')
    return f"<p>newsbeam alert rule <b>{html.escape(rule)}</b></p><ul>{''.join(items)}</ul>"


# Slack formats *bold*, _italic_, ~strike~ and `code`, and links any URL, domain or address it
# sees: in article text those characters become look-alikes that Slack leaves alone.
_SLACK_INERT = str.maketrans({"*": "∗", "_": "ˍ", "~": "∼", "`": "ˋ"})
_LINKABLE = re.compile(r"(?<=\w)\.(?=\w)|:(?=//)|(?<=\w)@(?=\w)")
_INERT_LINK_PARTS = {".": "․", ":": "˸", "@": "＠"}


def slack_escape(text: str) -> str:
    """Slack's control characters: with <, > and & escaped, article text cannot mention
    @channel/@here (`<!channel>`), users or smuggle links."""
    return (text or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_text(text: str) -> str:
    """Article text for a Slack message: escaped, no formatting, nothing Slack would link."""
    inert = _LINKABLE.sub(lambda m: _INERT_LINK_PARTS[m.group()], (text or "").translate(_SLACK_INERT))
    return slack_escape(inert)


def _slack_snippet(snippet: str) -> str:
    """The snippet with our own highlights (**word**) as Slack bold, the rest inert."""
    parts = _HIGHLIGHT.split(_one_line(snippet))  # odd indexes are the highlighted words
    return "".join(f"*{slack_text(part)}*" if i % 2 else slack_text(part) for i, part in enumerate(parts))


def _slack_link(url: str, title: str) -> str:
    # Slack links nothing inside a link's label: only escaping and formatting matter there.
    label = slack_escape(_one_line(title).translate(_SLACK_INERT)).replace("|", "¦") or "untitled"
    url = safe_link(url)
    if not url:
        return label
    return f"<{slack_escape(url).replace('|', '%7C').replace(' ', '%20')}|{label}>"


def render_slack(alerts: list[dict[str, Any]], rule: str) -> dict[str, Any]:
    lines = [f"*newsbeam: {slack_text(rule)}*" + (f" ({len(alerts)} matches)" if len(alerts) > 1 else "")]
    for alert in alerts:
        snippet = _slack_snippet(alert.get("snippet", ""))
        lines.append(f"• {_slack_link(alert.get('url', ''), alert.get('title', ''))} "
                     f"({slack_text(alert.get('source') or '')}; matched "
                     f"{slack_text(', '.join(alert.get('matched_terms', [])))})")
        if snippet:
            lines.append(f">{snippet}")
    return {"text": "\n".join(lines), "unfurl_links": False, "unfurl_media": False}


# --- senders -----------------------------------------------------------------------------

class _Watchdog:
    """Shuts a connection's socket when the deadline passes: socket timeouts bound each read,
    this bounds the whole exchange (a peer trickling one byte a second never times out)."""

    def __init__(self, seconds: float, socket_of: Callable[[], socket.socket | None]):
        self.expired = False
        self._socket_of = socket_of
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        sock = self._socket_of()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()


def post_json(url: str, payload: dict[str, Any], headers: dict[str, str], deadline: float) -> None:
    """POSTs JSON to a webhook within `deadline` seconds in all; raises DeliveryError. Plain
    http.client: no proxies, no .netrc, no redirects followed, and of a refusal's body only
    the first bytes are read (a 2xx is success without reading its body)."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=deadline, context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=deadline)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    watchdog = _Watchdog(deadline, lambda: connection.sock)
    try:
        connection.request("POST", path, body=body, headers={
            "Content-Type": "application/json", "User-Agent": "newsbeam-alerts/0.1", "Connection": "close",
            **headers})
        response = connection.getresponse()
        if watchdog.expired:  # the socket was shut mid-headers: http.client takes that as their end
            raise OSError("deadline")
        if 200 <= response.status < 300:
            return
        answer = response.read(_ERROR_BODY_BYTES).decode("utf-8", "replace")
        raise DeliveryError(f"HTTP {response.status}: {_one_line(answer)[:200]}")
    except (OSError, http.client.HTTPException) as err:
        if watchdog.expired:
            raise DeliveryError(f"no complete answer within {deadline:g}s") from None
        raise DeliveryError(f"{type(err).__name__}: {getattr(err, 'strerror', None) or err}") from None
    finally:
        watchdog.cancel()
        connection.close()


def send_email(smtp: SmtpSettings, recipients: list[str], subject: str, text: str, html_body: str) -> None:
    """One message over SMTP within `smtp.timeout` seconds in all; credentials only from
    NEWSBEAM_SMTP_USERNAME/PASSWORD. Errors name the server, never the recipients."""
    message = EmailMessage()
    message["From"] = smtp.sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = _one_line(subject)[:200]
    message.set_content(text)
    message.add_alternative(html_body, subtype="html")
    context = ssl.create_default_context(cafile=smtp.ca_certs or None)
    server = (smtplib.SMTP_SSL(timeout=smtp.timeout, context=context) if smtp.security == "ssl"
              else smtplib.SMTP(timeout=smtp.timeout))
    watchdog = _Watchdog(smtp.timeout, lambda: getattr(server, "sock", None))
    try:
        server.connect(smtp.host, smtp.port)
        with server:
            if smtp.security == "starttls":
                server.starttls(context=context)
            if os.environ.get("NEWSBEAM_SMTP_USERNAME"):
                server.login(os.environ["NEWSBEAM_SMTP_USERNAME"], os.environ.get("NEWSBEAM_SMTP_PASSWORD", ""))
            server.send_message(message)
    except (smtplib.SMTPException, OSError) as err:
        if watchdog.expired:
            raise DeliveryError(f"SMTP {smtp.host}:{smtp.port}: no complete exchange within {smtp.timeout:g}s") from None
        code = getattr(err, "smtp_code", None)
        detail = f"{type(err).__name__}" + (f" {code}" if code else "")
        if isinstance(err, smtplib.SMTPResponseException):
            detail += ": " + err.smtp_error.decode("utf-8", "replace")[:200]
        elif isinstance(err, OSError):
            detail += f": {err.strerror or err}"
        raise DeliveryError(f"SMTP {smtp.host}:{smtp.port}: {scrub(detail, tuple(recipients), '<recipient>')}") from None
    finally:
        watchdog.cancel()


class Senders:
    """Sends one alert, or one digest of alerts, to a target; raises DeliveryError whose
    message never contains the target's address."""

    def __init__(self, settings: AlertSettings):
        self._settings = settings

    @property
    def longest_send(self) -> float:
        """The most one send can take: every sender has an overall deadline."""
        return max(self._settings.webhook_timeout, self._settings.smtp.timeout)

    def send(self, target: Target, rule: str, alerts: list[dict[str, Any]], digest: bool, now: float) -> None:
        try:
            self._send(target, rule, alerts, digest, now)
        except DeliveryError as err:
            raise DeliveryError(scrub(str(err), (target.address,), target_label(target))) from None

    def _send(self, target: Target, rule: str, alerts: list[dict[str, Any]], digest: bool, now: float) -> None:
        payload = digest_payload(rule, alerts, now) if digest else {"type": "alert", **alert_payload(alerts[0])}
        if target.kind == "log":
            subject, body = render_text(alerts, rule)
            _LOG.info("%s\n%s", subject, body)
        elif target.kind == "stdout":
            print(json.dumps(payload, ensure_ascii=False), file=sys.stdout, flush=True)
        elif target.kind == "webhook":
            key = hashlib.sha256("|".join(a["alert_id"] for a in alerts).encode()).hexdigest()[:32]
            post_json(target.address, payload, {"Idempotency-Key": key}, self._settings.webhook_timeout)
        elif target.kind == "slack":
            post_json(target.address, render_slack(alerts, rule), {}, self._settings.webhook_timeout)
        elif target.kind == "email":
            subject, body = render_text(alerts, rule)
            send_email(self._settings.smtp, target.address.split(","), subject, body, render_html(alerts, rule))
        else:
            raise DeliveryError(f"unknown target kind {target.kind!r}")


# --- per-target back-off -----------------------------------------------------------------

class TargetStates:
    """Back-off per target, one document per failing target in `<alerts index>-targets`:
    every deliverer sees it, and a restart does not hammer a target that was down."""

    def __init__(self, client: Elasticsearch, settings: AlertSettings, clock: Callable[[], float] = time.time):
        self._client = client
        self._settings = settings
        self._index = target_state_index(settings)
        self._clock = clock

    def read(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        try:
            docs = self._client.mget(index=self._index, ids=ids)["docs"]
        except NotFoundError:
            return {}
        return {doc["_id"]: doc["_source"] for doc in docs if doc.get("found")}

    def failed(self, tid: str, label: str, error: str, state: dict[str, Any] | None) -> dict[str, Any]:
        """Records a failure; returns the new state, whose `not_before` is the next try."""
        failures = (state or {}).get("failures", 0) + 1
        delay = min(self._settings.retry_max, self._settings.retry_initial * 2 ** (failures - 1))
        now = self._clock()
        new = {"target_id": tid, "target_label": label, "failures": failures,
               "not_before": iso(now + delay * random.uniform(0.8, 1.0)), "last_error": error[:500],
               "updated_at": iso(now)}
        self._client.index(index=self._index, id=tid, document=new)
        return new

    def succeeded(self, tid: str, state: dict[str, Any] | None) -> None:
        if state:
            try:
                self._client.delete(index=self._index, id=tid)
            except NotFoundError:
                pass


# --- the outbox --------------------------------------------------------------------------

@dataclasses.dataclass
class _Held:
    """An alert this sender has claimed: its id, document, the version it wrote and the
    targets whose delivery records it claimed (the only records it may change)."""
    id: str
    doc: dict[str, Any]
    seq_no: int
    primary_term: int
    targets: tuple[str, ...] = ()


def _give_targets_ids(alert: dict[str, Any]) -> bool:
    """Replaces the address in delivery records of older alerts (`target`) by its id and
    label; True if there were any."""
    changed = False
    for record in alert["deliveries"]:
        if "target" in record and "target_id" not in record:
            try:
                target = parse_target(record.pop("target"))
            except RuleError:
                target = Target("unknown")
            record.update(target_id=target_id(target), target_label=target_label(target))
            changed = True
    return changed


def _records_of(alert: _Held) -> list[dict[str, Any]]:
    """The delivery records of the alert that its holder claimed."""
    return [r for r in alert.doc["deliveries"] if r.get("target_id") in alert.targets]


def _claimable(record: dict[str, Any], now: float) -> bool:
    return record["status"] == PENDING and epoch(record.get("claimed_until") or iso(0)) <= now


class Outbox:
    """Sends due deliveries from the alerts index; `sweep()` does one pass over every target
    with something pending. `more` is True after a sweep that left due work behind (a full
    page), so the caller sweeps again at once. Setting `stopping` ends a sweep after the
    delivery in progress. `clock` is the time the outbox goes by (tests move it on to close
    a digest window)."""

    def __init__(self, client: Elasticsearch, settings: AlertSettings, senders: Senders | None = None,
                 stopping: threading.Event | None = None, clock: Callable[[], float] = time.time):
        self._client = client
        self._settings = settings
        self._clock = clock
        self._senders = senders or Senders(settings)
        if settings.claim_seconds < self._senders.longest_send + _CLAIM_MARGIN:
            raise ConfigError(f"alerts.claim_seconds ({settings.claim_seconds:g}) must exceed the longest send "
                             f"(webhook_timeout, smtp.timeout: {self._senders.longest_send:g}s) by "
                             f"{_CLAIM_MARGIN:g}s, or slow targets get duplicate sends")
        self.longest_send = self._senders.longest_send
        self._states = TargetStates(client, settings, clock)
        self.stopping = stopping or threading.Event()
        self.more = False
        self.unrecorded: list[_Held] = []  # outcomes of sends not yet written back: retried first

    def sweep(self) -> int:
        """Sends everything due now; returns how many deliveries succeeded. Outcomes that
        could not be recorded are written first; a refresh makes alerts written a moment
        ago visible to the search."""
        self.more = False
        self.record_unrecorded()
        return self._sweep()

    def record_unrecorded(self) -> None:
        """Writes back the outcomes a sweep could not record (Elasticsearch was unreachable);
        raises while it still cannot, keeping them for the next try."""
        while self.unrecorded:
            if not self._record(self.unrecorded[0]):
                return
            _LOG.info("alert %s: its delivery outcome is recorded now", self.unrecorded.pop(0).id)

    def _sweep(self) -> int:
        if not self._refresh():
            return 0
        pending = self._pending_target_ids()
        if not pending:
            return 0
        addresses = self._addresses()
        states = self._states.read(pending)
        delivered = 0
        for tid in pending:
            if self.stopping.is_set():
                break
            if addresses is not None and tid not in addresses:
                self._drop(tid)
            elif addresses is not None and epoch(states.get(tid, {}).get("not_before") or iso(0)) <= self._clock():
                delivered += self._deliver_to(tid, addresses[tid], states.get(tid))
        return delivered

    def _refresh(self) -> bool:
        try:
            self._client.indices.refresh(index=self._settings.alerts_index)
        except NotFoundError:
            return False
        return True

    def _pending_target_ids(self) -> list[str]:
        response = self._client.search(index=self._settings.alerts_index, size=0, aggs={
            "targets": {"terms": {"field": "pending_targets", "size": 10_000, "order": {"_key": "asc"}}}})
        return [bucket["key"] for bucket in response["aggregations"]["targets"]["buckets"]]

    def _addresses(self) -> dict[str, Target] | None:
        """Target id -> target, from the rules (the only place addresses are kept); None while
        the rules index does not exist."""
        try:
            hits = self._client.search(index=self._settings.rules_index, size=10_000, source_includes=["notify"],
                                       query={"match_all": {}})["hits"]["hits"]
        except NotFoundError:
            return None
        targets: dict[str, Target] = {}
        for hit in hits:
            for text in hit["_source"].get("notify") or []:
                try:
                    target = parse_target(text)
                except RuleError:
                    continue
                targets[target_id(target)] = target
        return targets

    def _search(self, query: dict[str, Any], sort: list[Any], size: int) -> list[dict[str, Any]]:
        try:
            response = self._client.search(index=self._settings.alerts_index, query=query, sort=sort, size=size,
                                           seq_no_primary_term=True)
        except NotFoundError:
            return []
        return response["hits"]["hits"]

    def _deliver_to(self, tid: str, target: Target, state: dict[str, Any] | None) -> int:
        """The oldest page of this target's pending alerts: each sent on its own, digests of
        a rule as one message. The first failure backs the target off and ends its turn."""
        hits = self._search({"term": {"pending_targets": tid}}, sort=OLDEST_FIRST, size=_PAGE)
        now = self._clock()

        def mine(alert: dict[str, Any]) -> list[dict[str, Any]]:
            return [r for r in alert["deliveries"] if r.get("target_id") == tid and _claimable(r, now)]

        delivered = 0
        digests: set[str] = set()
        for hit in hits:
            if self.stopping.is_set():
                return delivered
            records = mine(hit["_source"])
            if any(r["digest_seconds"] for r in records):
                if any(epoch(r["next_attempt"]) <= now for r in records):
                    digests.add(hit["_source"]["rule"])
                continue
            claim = self._claim(hit, mine)
            if claim is None:
                continue
            held, claimed = claim
            try:
                sent, state = self._send(tid, target, held.doc["rule"], claimed, [held.doc], False, state)
            finally:  # whatever happened after the claim, the outcome is recorded and the claim let go
                self._release([held])
            if not sent:
                return delivered
            delivered += sent
        for rule in sorted(digests):
            if self.stopping.is_set():
                break
            sent, state = self._deliver_digest(rule, tid, target, state)
            if not sent:
                break
            delivered += sent
        # Another page at once only after progress: a page of alerts claimed by another
        # deliverer must not make this one spin.
        self.more = self.more or (len(hits) == _PAGE and delivered > 0)
        return delivered

    def _drop(self, tid: str) -> None:
        """No rule sends to this target any more (removed, or its address changed): its pending
        deliveries are marked dropped, with the reason, instead of waiting forever. Alerts
        written before targets had ids are first given them (and so their address leaves
        the alert), then delivered by the next sweep."""
        hits = self._search({"term": {"pending_targets": tid}}, sort=OLDEST_FIRST, size=_PAGE)
        now = self._clock()
        dropped: list[str] = []
        for hit in hits:
            if _give_targets_ids(hit["_source"]):
                self._write(_Held(hit["_id"], hit["_source"], hit["_seq_no"], hit["_primary_term"]))
                self.more = True  # sent by the next sweep, at once
                continue
            claim = self._claim(hit, lambda alert: [r for r in alert["deliveries"]
                                                     if r.get("target_id") == tid and _claimable(r, now)])
            if claim is None:
                continue
            held, records = claim
            for record in records:
                record.update(status=DROPPED, last_error="no rule sends to this target any more")
                dropped.append(record.get("target_label", "?"))
            self._release([held])
        self.more = self.more or (len(hits) == _PAGE and bool(dropped))
        if dropped:
            _LOG.warning("alert target %s: no rule names it any more; %d pending alert(s) dropped (see their "
                         "deliveries.last_error)", dropped[0], len(dropped))

    def _write(self, held: _Held) -> _Held | None:
        """Writes the alert if nobody changed it since we read it; None when someone did."""
        try:
            response = self._client.index(index=self._settings.alerts_index, id=held.id,
                                          document=summarize(held.doc), if_seq_no=held.seq_no,
                                          if_primary_term=held.primary_term)
        except ConflictError:
            return None
        return _Held(held.id, held.doc, response["_seq_no"], response["_primary_term"], held.targets)

    def _claim(self, hit: dict[str, Any], select: Callable[[dict[str, Any]], list[dict[str, Any]]]
               ) -> tuple[_Held, list[dict[str, Any]]] | None:
        """Claims the delivery records `select` picks in the alert. A search result can be a
        moment old: on a version conflict the alert is read again (real-time) and claimed
        if what we wanted is still unclaimed; None when it is not."""
        for _attempt in range(2):
            records = select(hit["_source"])
            if not records:
                return None
            until = iso(self._clock() + self._settings.claim_seconds)
            for record in records:
                record["claimed_until"] = until
            held = self._write(_Held(hit["_id"], hit["_source"], hit["_seq_no"], hit["_primary_term"],
                                     tuple(r["target_id"] for r in records)))
            if held is not None:
                return held, records
            try:
                hit = self._client.get(index=self._settings.alerts_index, id=hit["_id"])
            except NotFoundError:
                return None
        return None

    def _release(self, held: list[_Held]) -> None:
        """Records the outcome of the claimed deliveries and lets go of their claims. An alert
        that cannot be written now is kept in `unrecorded` and written by the next sweep: a
        delivered alert must be recorded delivered, or it is sent again once its claim expires."""
        for record in (r for alert in held for r in _records_of(alert)):
            record["claimed_until"] = None
        for number, alert in enumerate(held):
            try:
                recorded = self._record(alert)
            except (ApiError, TransportError) as err:
                self._keep(held[number:], type(err).__name__)
                raise
            if not recorded:
                self._keep([alert], "it changed on every write")

    def _keep(self, held: list[_Held], why: str) -> None:
        self.unrecorded.extend(held)
        for alert in held:
            for record in _records_of(alert):
                _LOG.warning("alert %s %s %s, but recording that failed (%s); retried at the next sweep", alert.id,
                             "was sent to" if record["status"] == DELIVERED else "was tried at",
                             record.get("target_label", "?"), why)

    def _record(self, alert: _Held) -> bool:
        """Writes the alert; when someone changed it since it was claimed, writes this sender's
        records into the current version instead (the other records stay as they are there).
        False if it changed again on every try."""
        for _attempt in range(5):
            if self._write(alert) is not None:
                return True
            try:
                current = self._client.get(index=self._settings.alerts_index, id=alert.id)
            except NotFoundError:
                _LOG.warning("alert %s was deleted while it was being sent; its outcome is not recorded", alert.id)
                return True
            mine = {r["target_id"]: r for r in _records_of(alert)}
            records = current["_source"]["deliveries"]
            for number, record in enumerate(records):
                ours = mine.get(record.get("target_id"))
                if ours is not None and record["status"] == PENDING:
                    records[number] = ours
                elif ours is not None and ours["status"] == DELIVERED and record != ours:  # not our own write
                    _LOG.warning("alert %s was delivered to %s twice (another deliverer recorded it %s)", alert.id,
                                 ours.get("target_label", "?"), record["status"])
            alert = _Held(alert.id, current["_source"], current["_seq_no"], current["_primary_term"], alert.targets)
        return False

    def _deliver_digest(self, rule: str, tid: str, target: Target, state: dict[str, Any] | None
                        ) -> tuple[int, dict[str, Any] | None]:
        """One message listing every pending alert of `rule` for the target."""
        now = self._clock()
        hits = self._search({"bool": {"filter": [{"term": {"rule": rule}}, {"term": {"pending_targets": tid}}]}},
                            sort=OLDEST_FIRST, size=_DIGEST_LIMIT)
        held, records = [], []
        for hit in hits:
            claim = self._claim(hit, lambda alert: [r for r in alert["deliveries"] if r.get("target_id") == tid
                                                     and r["digest_seconds"] and _claimable(r, now)][:1])
            if claim is not None:
                held.append(claim[0])
                records += claim[1]
        if not held:
            return 0, state
        try:
            return self._send(tid, target, rule, records, [h.doc for h in held], True, state)
        finally:
            self._release(held)

    def _send(self, tid: str, target: Target, rule: str, records: list[dict[str, Any]],
              alerts: list[dict[str, Any]], digest: bool, state: dict[str, Any] | None
              ) -> tuple[int, dict[str, Any] | None]:
        """Sends one message about `alerts` to the target and records the outcome in `records`
        and in the target's back-off; returns (deliveries made, the target's state)."""
        label = target_label(target)
        try:
            self._senders.send(target, rule, alerts, digest, self._clock())
        except DeliveryError as err:
            state = self._states.failed(tid, label, str(err), state)
            _LOG.warning("alert delivery to %s failed (%s); failure %d in a row, next try at %s", label, err,
                         state["failures"], state["not_before"])
            for record in records:
                record.update(attempts=record["attempts"] + 1, next_attempt=state["not_before"],
                              last_error=str(err)[:500])
            return 0, state
        for record in records:  # before the back-off write: an outage there must not lose the delivery
            record.update(status=DELIVERED, attempts=record["attempts"] + 1, delivered_at=iso(self._clock()),
                          last_error="")
        self._states.succeeded(tid, state)
        return len(records), None


# --- the delivery loop -------------------------------------------------------------------

def _refusal_reason(err: AuthorizationException) -> str:
    """Elasticsearch's one-line reason for a 403 (it names the action, privilege and index)."""
    body = err.body if isinstance(err.body, dict) else {}
    error = body.get("error")
    reason = error.get("reason") if isinstance(error, dict) else None
    return _one_line(str(reason or err.message))[:500]


@dataclasses.dataclass(frozen=True)
class PeriodicJob:
    """Extra work for the delivery loop (e.g. evaluating volume rules): `run()` is called at
    start and then every `interval` seconds, in the loop's thread, between sweeps. An
    exception is logged and the job runs again at its next time; a job should return well
    within its interval, since deliveries wait while it runs."""
    name: str
    interval: float
    run: Callable[[], object]


class DeliveryLoop:
    """The delivery service: an outbox sweep every `sweep_interval` seconds (at once after
    `wake()` or a sweep that left work behind) and the given periodic jobs, in one thread.

    `newsbeam run` starts it beside the pipeline, so one command does everything locally;
    `newsbeam alerts deliver` runs it on its own, next to a pipeline on a distributed runner.
    Any number of loops may run at once: claims keep them from sending an alert twice."""

    def __init__(self, client: Elasticsearch, settings: AlertSettings, jobs: Sequence[PeriodicJob] = (),
                 senders: Senders | None = None):
        self._settings = settings
        self._jobs = tuple(jobs)
        self._stopping = threading.Event()
        self.outbox = Outbox(client, settings, senders, self._stopping)
        self._wakeup = threading.Event()
        self._progress = threading.Condition()
        self._sweeps = 0
        self._busy = False
        self._refusals_said: set[str] = set()  # each permission refusal is logged once, not every sweep
        self._thread: threading.Thread | None = None

    @classmethod
    def connect(cls, es: ElasticsearchSettings, settings: AlertSettings, jobs: Sequence[PeriodicJob] = ()
                ) -> DeliveryLoop:
        return cls(connect(es, check=False), settings, jobs)

    def start(self) -> DeliveryLoop:
        self._thread = threading.Thread(target=self._run, name="newsbeam-delivery", daemon=True)
        self._thread.start()
        # Interpreter exit kills daemon threads where they stand: a sweep killed between claim
        # and release would hold its alerts back for `claim_seconds`. Registered after the client
        # exists, so it runs before (atexit is LIFO) urllib3's pool finalizers.
        atexit.register(self.stop)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Ends the loop after the delivery in progress (bounded by its deadline), whose claim
        is released; what is still pending stays pending for the next run. Waits at most
        `timeout` seconds (default: the longest send and some)."""
        atexit.unregister(self.stop)
        self._stopping.set()
        self._wakeup.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.outbox.longest_send + 30 if timeout is None else timeout)

    def wake(self) -> None:
        """New alerts were written: sweep now rather than at the next interval."""
        self._wakeup.set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until a sweep that started after this call has finished; False on timeout."""
        with self._progress:
            wanted = self._sweeps + (2 if self._busy else 1)
            self.wake()
        deadline = time.monotonic() + timeout
        with self._progress:
            while self._sweeps < wanted:
                if not self._progress.wait(max(0.0, deadline - time.monotonic())):
                    return False
        return True

    def _run(self) -> None:
        next_sweep = time.monotonic()
        next_job = [time.monotonic()] * len(self._jobs)
        while not self._stopping.is_set():
            self._wakeup.wait(max(0.0, min([next_sweep, *next_job]) - time.monotonic()))
            if self._stopping.is_set():
                break
            if self._wakeup.is_set() or time.monotonic() >= next_sweep:
                self._sweep()
                next_sweep = time.monotonic() + (0.0 if self.outbox.more else self._settings.sweep_interval)
            for number, job in enumerate(self._jobs):
                if time.monotonic() >= next_job[number] and not self._stopping.is_set():
                    self._run_job(job)
                    next_job[number] = time.monotonic() + job.interval
        self._record_before_exit()

    def _record_before_exit(self) -> None:
        """A last try at the outcomes not yet written back; what is still unwritten is said,
        since those alerts are sent again once their claims expire."""
        try:
            self.outbox.record_unrecorded()
        except (ApiError, TransportError) as err:
            _LOG.warning("alert delivery: Elasticsearch unavailable at the stop (%s)", type(err).__name__)
        if self.outbox.unrecorded:
            _LOG.error("alert delivery stopped with %d alert outcome(s) unrecorded (%s): they are sent again "
                       "once their claims expire", len(self.outbox.unrecorded),
                       ", ".join(a.id for a in self.outbox.unrecorded[:5]))

    def _sweep(self) -> None:
        with self._progress:
            self._wakeup.clear()
            self._busy = True
        try:
            self.outbox.sweep()
        except AuthorizationException as err:
            self._say_refused("alert delivery", err)
        except (ApiError, TransportError) as err:
            _LOG.warning("alert delivery: Elasticsearch unavailable (%s); will retry", type(err).__name__)
        except Exception:  # the loop must outlive any one bad alert
            _LOG.exception("alert delivery: sweep failed; will retry")
        with self._progress:
            self._busy = False
            self._sweeps += 1
            self._progress.notify_all()

    def _say_refused(self, what: str, err: AuthorizationException) -> None:
        """A 403 is a missing privilege (or a blocked index), not an outage: said once, with
        Elasticsearch's reason, which names the action, the privilege and the index."""
        reason = _refusal_reason(err)
        if reason in self._refusals_said:
            _LOG.debug("%s: still refused by Elasticsearch: %s", what, reason)
            return
        self._refusals_said.add(reason)
        _LOG.error("%s: Elasticsearch refused (HTTP 403): %s; the role of newsbeam's credentials lacks that "
                   "privilege (docs/operations.md lists the role); retried every sweep, not logged again",
                   what, reason)

    def _run_job(self, job: PeriodicJob) -> None:
        try:
            job.run()
        except AuthorizationException as err:
            self._say_refused(f"delivery loop: periodic job {job.name}", err)
        except (ApiError, TransportError) as err:
            _LOG.warning("delivery loop: periodic job %s: Elasticsearch unavailable (%s); it runs again in %gs",
                         job.name, type(err).__name__, job.interval)
        except Exception:  # one failing job must not stop delivery or the other jobs
            _LOG.exception("delivery loop: periodic job %s failed; it runs again in %gs", job.name, job.interval)
