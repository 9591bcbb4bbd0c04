"""Real receivers on 127.0.0.1 for alert delivery tests: a webhook endpoint that can be told
to fail for a while, and an SMTP server (aiosmtpd) that keeps what it receives."""
from __future__ import annotations

import email
import email.policy
import json
import socket
import threading
import time
from typing import Any

from tests.support.loopback import LoopbackServer, QuietHandler


class WebhookReceiver(LoopbackServer):
    """Records every POST as {time, path, headers, body (JSON)}. A path that was told to
    `fail()` answers 503 until `recover()`; those attempts are recorded in `refused`. A path
    that was told to `stall()` answers only after that many seconds."""

    def __init__(self):
        self.received: list[dict[str, Any]] = []
        self.refused: list[dict[str, Any]] = []
        self.failing: set[str] = set()
        self.stalls: dict[str, float] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                record = {"time": time.time(), "path": self.path, "headers": dict(self.headers),
                          "body": json.loads(body or b"null")}
                with receiver._lock:
                    down = self.path in receiver.failing
                    (receiver.refused if down else receiver.received).append(record)
                    stall = receiver.stalls.get(self.path, 0.0)
                time.sleep(stall)
                self.send_response(503 if down else 200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        super().__init__(Handler)

    def fail(self, path: str) -> None:
        with self._lock:
            self.failing.add(path)

    def stall(self, path: str, seconds: float) -> None:
        with self._lock:
            self.stalls[path] = seconds

    def recover(self, path: str) -> None:
        with self._lock:
            self.failing.discard(path)

    def url(self, path: str = "/hook") -> str:
        return super().url(path)

    def bodies(self, path: str | None = None) -> list[Any]:
        with self._lock:
            return [r["body"] for r in self.received if path is None or r["path"] == path]

    def wait_for(self, count: int, path: str | None = None, timeout: float = 30.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.bodies(path)) < count:
            time.sleep(0.05)
        return self.bodies(path)


class SmtpReceiver:
    """aiosmtpd on 127.0.0.1 with optional AUTH; `messages` holds parsed EmailMessages."""

    def __init__(self, username: str | None = None, password: str | None = None):
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.logins: list[str] = []
        receiver = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                receiver.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
                receiver.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
                return "250 OK"

        def authenticate(server, session, envelope, mechanism, auth_data):
            ok = auth_data.login.decode() == username and auth_data.password.decode() == password
            if ok:
                receiver.logins.append(auth_data.login.decode())
            return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535

        kwargs: dict[str, Any] = {}
        if username:
            kwargs = {"authenticator": authenticate, "auth_required": True, "auth_require_tls": False}
        with socket.socket() as probe:  # the Controller checks its port by connecting to it: no port 0
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, **kwargs)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[email.message.EmailMessage]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.messages) < count:
            time.sleep(0.05)
        return self.messages

    def __enter__(self) -> SmtpReceiver:
        self._controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self._controller.stop()
