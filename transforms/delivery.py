"""Alert delivery: an outbox in Elasticsearch, and the senders (log, stdout, webhook,
Slack-compatible webhook, email over SMTP).

Every alert document carries one delivery record per target (`pending` or `delivered`,
attempts, next_attempt, last error). The `Outbox` sends what is due:

* A sender first claims an alert (an update conditional on its sequence number that
  pushes `next_attempt` forward by `claim_seconds`), then sends, then records the result
  under the same condition. Two senders never send the same alert at once; a sender that
  dies mid-way leaves a claim that expires, and the alert is sent again: at-least-once.
* A failure keeps the delivery pending and backs the target off exponentially (from
  `retry_initial`, doubling, capped at `retry_max`); while a target is backing off it is
  not tried for any alert, and when it answers again everything pending goes out.
* A digest target (rule with `digest_seconds`) is due when its oldest pending alert is
  that old: then one message lists every pending alert of that rule for that target.

The outbox state lives in the index, so a restarted pipeline sends what was pending and
never re-sends what was delivered.
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import html
import json
import logging
import os
import random
import re
import smtplib
import ssl
import sys
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import requests
from elasticsearch import ApiError, ConflictError, Elasticsearch, NotFoundError, TransportError

from newsbeam.transforms.clock import epoch, iso
from newsbeam.transforms.elastic import connect
from newsbeam.transforms.rules import Target, parse_target
from newsbeam.transforms.settings import AlertSettings, ElasticsearchSettings, SmtpSettings

_LOG = logging.getLogger(__name__)
PENDING, DELIVERED = "pending", "delivered"
_DIGEST_LIMIT = 5000  # alerts listed in one digest message; more go out in the next one


class DeliveryError(Exception):
    """A target did not take the message; it will be retried."""


# --- delivery records --------------------------------------------------------------------

def new_deliveries(targets: tuple[Target, ...], digest_seconds: int, now: float) -> list[dict[str, Any]]:
    """Pending delivery records for a new alert: due now, or when its digest window closes."""
    return [{"target": str(target), "status": PENDING, "attempts": 0, "digest_seconds": digest_seconds,
             "next_attempt": iso(now + digest_seconds), "claimed_until": None, "last_error": "",
             "delivered_at": None}
            for target in targets]


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Sets the top-level fields the outbox queries: the pending targets and when the
    earliest of them is due (not before a claim on it expires)."""
    pending = [d for d in doc["deliveries"] if d["status"] == PENDING]
    doc["pending_targets"] = [d["target"] for d in pending]
    due = [max(epoch(d["next_attempt"]), epoch(d.get("claimed_until") or iso(0))) for d in pending]
    doc["next_attempt"] = iso(min(due)) if due else None
    return doc


# --- rendering ---------------------------------------------------------------------------

_HIGHLIGHT = re.compile(r"\*\*(.+?)\*\*")
_VOLUME_PAYLOAD = ("kind", "volume_key", "window_start", "window_end", "count", "distinct_sources", "baseline",
                   "baseline_counts", "threshold", "articles")


def alert_payload(alert: dict[str, Any]) -> dict[str, Any]:
    """What a webhook receives for one alert (and, in a list, for a digest); a volume alert
    adds its evidence under `volume`."""
    payload = {"alert_id": alert["alert_id"], "rule": alert["rule"], "matched_terms": alert.get("matched_terms", []),
               "snippet": alert.get("snippet", ""), "matched_at": alert.get("matched_at"),
               "article": {key: alert.get(key) for key in
                           ("article_id", "title", "url", "source", "publisher", "published_at", "topics")}}
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
        lines = [_one_line(alert.get("title", "")) or "(untitled)", alert.get("url", "")]
        meta = " · ".join(x for x in (alert.get("source"), alert.get("published_at")) if x)
        if meta:
            lines.append(meta)
        lines.append("matched: " + ", ".join(alert.get("matched_terms", [])))
        if alert.get("snippet"):
            lines.append(alert["snippet"])
        blocks.append("\n".join(lines))
    return subject, "\n\n".join(blocks) + f"\n\n-- newsbeam alert rule {rule!r}\n"


def render_html(alerts: list[dict[str, Any]], rule: str) -> str:
    """The HTML alternative: every piece of article text escaped, highlights as <mark>."""
    def text(value: Any) -> str:
        return _HIGHLIGHT.sub(r"<mark>\1</mark>", html.escape(str(value or ""), quote=True))
    items = []
    for alert in alerts:
        url = html.escape(alert.get("url", ""), quote=True)
        items.append(f'<li><a href="{url}">{text(_one_line(alert.get("title", "")))}</a> '
                     f'<small>{text(alert.get("source"))}</small><br>'
                     f'matched: {text(", ".join(alert.get("matched_terms", [])))}<br>'
                     f'<blockquote>{text(alert.get("snippet"))}</blockquote></li>')
    return f"<p>newsbeam alert rule <b>{html.escape(rule)}</b></p><ul>{''.join(items)}</ul>"


def slack_escape(text: str) -> str:
    """Slack's control characters: with <, > and & escaped, article text cannot mention
    @channel/@here (`<!channel>`), users or smuggle links."""
    return (text or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_link(url: str, title: str) -> str:
    safe_url = slack_escape(url).replace("|", "%7C").replace(" ", "%20")
    return f"<{safe_url}|{slack_escape(_one_line(title)).replace('|', '¦') or 'untitled'}>"


def render_slack(alerts: list[dict[str, Any]], rule: str) -> dict[str, Any]:
    lines = [f"*newsbeam: {slack_escape(rule)}*" + (f" ({len(alerts)} matches)" if len(alerts) > 1 else "")]
    for alert in alerts:
        snippet = _HIGHLIGHT.sub(r"*\1*", slack_escape(_one_line(alert.get("snippet", ""))))
        lines.append(f"• {_slack_link(alert.get('url', ''), alert.get('title', ''))} "
                     f"({slack_escape(alert.get('source') or '')}; matched "
                     f"{slack_escape(', '.join(alert.get('matched_terms', [])))})")
        if snippet:
            lines.append(f">{snippet}")
    return {"text": "\n".join(lines), "unfurl_links": False, "unfurl_media": False}


# --- senders -----------------------------------------------------------------------------

def send_email(smtp: SmtpSettings, recipients: list[str], subject: str, text: str, html_body: str) -> None:
    """One message over SMTP; credentials only from NEWSBEAM_SMTP_USERNAME/PASSWORD."""
    message = EmailMessage()
    message["From"] = smtp.sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = _one_line(subject)[:200]
    message.set_content(text)
    message.add_alternative(html_body, subtype="html")
    context = ssl.create_default_context(cafile=smtp.ca_certs or None)
    try:
        if smtp.security == "ssl":
            server = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout, context=context)
        else:
            server = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
        with server:
            if smtp.security == "starttls":
                server.starttls(context=context)
            if os.environ.get("NEWSBEAM_SMTP_USERNAME"):
                server.login(os.environ["NEWSBEAM_SMTP_USERNAME"], os.environ.get("NEWSBEAM_SMTP_PASSWORD", ""))
            server.send_message(message)
    except (smtplib.SMTPException, OSError) as err:
        raise DeliveryError(f"SMTP {smtp.host}:{smtp.port}: {type(err).__name__}: {err}") from None


class Senders:
    """Sends one alert, or one digest of alerts, to a target; raises DeliveryError."""

    def __init__(self, settings: AlertSettings):
        self._settings = settings
        self._http = requests.Session()
        self._http.headers["User-Agent"] = "newsbeam-alerts/0.1"

    def send(self, target: Target, rule: str, alerts: list[dict[str, Any]], digest: bool, now: float) -> None:
        payload = digest_payload(rule, alerts, now) if digest else {"type": "alert", **alert_payload(alerts[0])}
        if target.kind == "log":
            subject, body = render_text(alerts, rule)
            _LOG.info("%s\n%s", subject, body)
        elif target.kind == "stdout":
            print(json.dumps(payload, ensure_ascii=False), file=sys.stdout, flush=True)
        elif target.kind == "webhook":
            key = hashlib.sha256("|".join(a["alert_id"] for a in alerts).encode()).hexdigest()[:32]
            self._post(target.address, payload, {"Idempotency-Key": key})
        elif target.kind == "slack":
            self._post(target.address, render_slack(alerts, rule), {})
        elif target.kind == "email":
            subject, body = render_text(alerts, rule)
            send_email(self._settings.smtp, target.address.split(","), subject, body, render_html(alerts, rule))
        else:
            raise DeliveryError(f"unknown target kind {target.kind!r}")

    def _post(self, url: str, payload: dict[str, Any], headers: dict[str, str]) -> None:
        try:
            response = self._http.post(url, json=payload, headers=headers, timeout=self._settings.webhook_timeout,
                                       allow_redirects=False)
        except requests.RequestException as err:
            raise DeliveryError(f"{type(err).__name__}: {err}") from None
        if not 200 <= response.status_code < 300:
            raise DeliveryError(f"HTTP {response.status_code}: {response.text[:200]}")


# --- the outbox --------------------------------------------------------------------------

@dataclasses.dataclass
class _Held:
    """An alert this sender has claimed: its id, document and the version it wrote."""
    id: str
    doc: dict[str, Any]
    seq_no: int
    primary_term: int


def _claimable(record: dict[str, Any], now: float) -> bool:
    return record["status"] == PENDING and epoch(record.get("claimed_until") or iso(0)) <= now


class Outbox:
    """Sends due deliveries from the alerts index. `sweep()` does one pass; `start()` runs
    passes every `sweep_interval` seconds, or at once after `wake()`, in a daemon thread."""

    _shared: dict[tuple[str, str], Outbox] = {}
    _shared_lock = threading.Lock()
    _exit_hook = False

    def __init__(self, client: Elasticsearch, settings: AlertSettings, senders: Senders | None = None):
        self._client = client
        self._settings = settings
        self._senders = senders or Senders(settings)
        self._backoff: dict[str, tuple[float, int]] = {}  # target -> (not before, failures in a row)
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._sweeps = 0
        self._busy = False
        self._thread: threading.Thread | None = None
        self._periodic: dict[str, Callable[[], Any]] = {}

    def also_run(self, name: str, work: Callable[[], Any]) -> None:
        """Runs `work` before every sweep (once per name: the volume alerts' evaluation)."""
        self._periodic.setdefault(name, work)

    @classmethod
    def shared(cls, es: ElasticsearchSettings, settings: AlertSettings) -> Outbox:
        """The process's running outbox for these indices (one per worker process)."""
        key = (es.url, settings.alerts_index)
        with cls._shared_lock:
            if key not in cls._shared:
                cls._shared[key] = cls(connect(es, check=False), settings).start()
                cls._stop_at_exit()
            return cls._shared[key]

    @classmethod
    def _stop_at_exit(cls) -> None:
        """Interpreter exit kills daemon threads where they stand: a sweep killed between claim
        and release would hold its alerts back for `claim_seconds`. Registered after the client
        exists so that it runs before (atexit is LIFO) urllib3's pool finalizers, which would
        leave the sweep's last write waiting for a connection forever."""
        if not cls._exit_hook:
            atexit.register(cls.stop_shared)
            cls._exit_hook = True

    @classmethod
    def stop_shared(cls) -> None:
        """Stops every shared outbox of this process (tests; orderly shutdown)."""
        with cls._shared_lock:
            outboxes, cls._shared = list(cls._shared.values()), {}
        for outbox in outboxes:
            outbox.stop()

    def start(self) -> Outbox:
        self._thread = threading.Thread(target=self._run, name="newsbeam-outbox", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends the sweeps after the delivery in progress, whose claim is released."""
        self._stop.set()
        self._wakeup.set()
        if self._thread:
            self._thread.join(timeout=60)

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
        while not self._stop.is_set():
            self._wakeup.wait(self._settings.sweep_interval)
            with self._progress:
                self._wakeup.clear()
                self._busy = True
            for work in list(self._periodic.values()):
                try:
                    work()
                except (ApiError, TransportError) as err:
                    _LOG.warning("alert outbox: periodic work: Elasticsearch unavailable (%s); will retry",
                                 type(err).__name__)
                except Exception:  # periodic work never holds deliveries up
                    _LOG.exception("alert outbox: periodic work failed; will retry")
            try:
                self.sweep()
            except (ApiError, TransportError) as err:
                _LOG.warning("alert outbox: Elasticsearch unavailable (%s); will retry", type(err).__name__)
            except Exception:  # the outbox must outlive any one bad alert
                _LOG.exception("alert outbox: sweep failed; will retry")
            with self._progress:
                self._busy = False
                self._sweeps += 1
                self._progress.notify_all()

    def sweep(self) -> int:
        """Sends everything due now; returns how many deliveries succeeded. A refresh first
        makes alerts written a moment ago visible to the search."""
        if not self._refresh():
            return 0
        now = time.time()
        due = self._search({"bool": {"filter": [{"exists": {"field": "pending_targets"}},
                                               {"range": {"next_attempt": {"lte": int(now * 1000)}}}]}},
                           sort=[{"next_attempt": "asc"}], size=500)
        delivered = 0
        digests: set[tuple[str, str]] = set()
        for hit in due:
            if self._stop.is_set():
                return delivered
            doc = hit["_source"]
            digests.update((doc["rule"], r["target"]) for r in doc["deliveries"]
                           if r["digest_seconds"] and self._due(r, now))
            claim = self._claim(hit, lambda alert: [r for r in alert["deliveries"]
                                                     if not r["digest_seconds"] and self._due(r, now)])
            if claim is not None:
                held, records = claim
                delivered += sum(self._send(record["target"], held.doc["rule"], [record], [held.doc], digest=False)
                                 for record in records)
                self._release([held])
        for rule, target in sorted(digests):
            if self._stop.is_set():
                break
            delivered += self._deliver_digest(rule, target)
        return delivered

    def _refresh(self) -> bool:
        try:
            self._client.indices.refresh(index=self._settings.alerts_index)
        except NotFoundError:
            return False
        return True

    def _search(self, query: dict[str, Any], sort: list[Any], size: int) -> list[dict[str, Any]]:
        try:
            response = self._client.search(index=self._settings.alerts_index, query=query, sort=sort, size=size,
                                           seq_no_primary_term=True)
        except NotFoundError:
            return []
        return response["hits"]["hits"]

    def _due(self, record: dict[str, Any], now: float) -> bool:
        return (_claimable(record, now) and epoch(record["next_attempt"]) <= now
                and self._backoff.get(record["target"], (0.0, 0))[0] <= now)

    def _write(self, held: _Held) -> _Held | None:
        """Writes the alert if nobody changed it since we read it; None when someone did."""
        try:
            response = self._client.index(index=self._settings.alerts_index, id=held.id,
                                          document=summarize(held.doc), if_seq_no=held.seq_no,
                                          if_primary_term=held.primary_term)
        except ConflictError:
            return None
        return _Held(held.id, held.doc, response["_seq_no"], response["_primary_term"])

    def _claim(self, hit: dict[str, Any], select: Callable[[dict[str, Any]], list[dict[str, Any]]]
               ) -> tuple[_Held, list[dict[str, Any]]] | None:
        """Claims the delivery records `select` picks in the alert. A search result can be a
        moment old: on a version conflict the alert is read again (real-time) and claimed
        if what we wanted is still unclaimed; None when it is not."""
        for _attempt in range(2):
            records = select(hit["_source"])
            if not records:
                return None
            until = iso(time.time() + self._settings.claim_seconds)
            for record in records:
                record["claimed_until"] = until
            held = self._write(_Held(hit["_id"], hit["_source"], hit["_seq_no"], hit["_primary_term"]))
            if held is not None:
                return held, records
            try:
                hit = self._client.get(index=self._settings.alerts_index, id=hit["_id"])
            except NotFoundError:
                return None
        return None

    def _release(self, held: list[_Held]) -> None:
        for alert in held:
            for record in alert.doc["deliveries"]:
                record["claimed_until"] = None
            if self._write(alert) is None:
                _LOG.warning("alert %s changed while it was being sent (claim expired?); it may be sent again",
                             alert.id)

    def _deliver_digest(self, rule: str, target: str) -> int:
        """One message listing every pending alert of `rule` for `target`."""
        now = time.time()
        if self._backoff.get(target, (0.0, 0))[0] > now:
            return 0
        hits = self._search({"bool": {"filter": [{"term": {"rule": rule}}, {"term": {"pending_targets": target}}]}},
                            sort=[{"matched_at": "asc"}], size=_DIGEST_LIMIT)
        held, records = [], []
        for hit in hits:
            claim = self._claim(hit, lambda alert: [r for r in alert["deliveries"] if r["target"] == target
                                                     and r["digest_seconds"] and _claimable(r, now)][:1])
            if claim is not None:
                held.append(claim[0])
                records += claim[1]
        if not held:
            return 0
        delivered = self._send(target, rule, records, [h.doc for h in held], digest=True)
        self._release(held)
        return delivered

    def _send(self, target: str, rule: str, records: list[dict[str, Any]], alerts: list[dict[str, Any]],
              digest: bool) -> int:
        """Sends one message about `alerts` to `target` and records the outcome in `records`."""
        now = time.time()
        try:
            self._senders.send(parse_target(target), rule, alerts, digest, now)
        except DeliveryError as err:
            failures = self._backoff.get(target, (0.0, 0))[1] + 1
            delay = min(self._settings.retry_max, self._settings.retry_initial * 2 ** (failures - 1))
            retry_at = now + delay * random.uniform(0.8, 1.0)
            self._backoff[target] = (retry_at, failures)
            _LOG.warning("alert delivery to %s failed (%s); retry in %.1fs", target, err, retry_at - now)
            for record in records:
                record.update(attempts=record["attempts"] + 1, next_attempt=iso(retry_at), last_error=str(err)[:500])
            return 0
        self._backoff.pop(target, None)
        for record in records:
            record.update(status=DELIVERED, attempts=record["attempts"] + 1, delivered_at=iso(time.time()),
                          last_error="")
        return len(records)
