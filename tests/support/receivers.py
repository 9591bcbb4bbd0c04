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
    """Records every POST as {time, path, headers, body (JSON)}. A path told to `fail()`
    misbehaves until `recover()` (or for its first `times` requests): `how` is "503" (answers
    503), "hang" (reads the request and never answers), "trickle" (answers a status line,
    then a header line every 0.2 s, never finishing) or "slow-body" (answers 503 with a 2 kB
    body, sent a byte every 0.2 s). Those requests are recorded in `refused`
    (with `how`), the others in `received`. A path told to `stall()` answers only after that
    many seconds. `port` binds a given port (a target that was refusing connections comes up)."""

    def __init__(self, port: int = 0):
        self.received: list[dict[str, Any]] = []
        self.refused: list[dict[str, Any]] = []
        self.failing: dict[str, tuple[str, int | None]] = {}
        self.stalls: dict[str, float] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                record = {"time": time.time(), "path": self.path, "headers": dict(self.headers),
                          "body": json.loads(body or b"null")}
                with receiver._lock:
                    how = receiver._fault(self.path)
                    (receiver.refused if how else receiver.received).append({**record, "how": how} if how else record)
                    stall = receiver.stalls.get(self.path, 0.0)
                if how == "hang":
                    receiver._closed.wait()
                    self.close_connection = True
                    return
                if how in ("trickle", "slow-body"):
                    self._trickle(how == "slow-body")
                    return
                time.sleep(stall)
                self.send_response(503 if how else 200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def _trickle(self, body: bool):
                head = b"HTTP/1.1 503 Busy\r\nContent-Length: 2048\r\n\r\n" if body else b"HTTP/1.1 200 OK\r\n"
                try:
                    self.wfile.write(head)
                    for number in range(3000):
                        if receiver._closed.wait(0.2):
                            break
                        self.wfile.write(b"x" if body else f"X-Slow-{number}: 1\r\n".encode())
                        self.wfile.flush()
                except OSError:
                    pass
                self.close_connection = True

        super().__init__(Handler, port=port)

    def _fault(self, path: str) -> str | None:
        """How this request to `path` misbehaves (None: answered); counts down `times`."""
        if path not in self.failing:
            return None
        how, left = self.failing[path]
        if left is not None:
            if left <= 1:
                del self.failing[path]
            else:
                self.failing[path] = (how, left - 1)
        return how

    def fail(self, path: str, how: str = "503", times: int | None = None) -> None:
        with self._lock:
            self.failing[path] = (how, times)

    def stall(self, path: str, seconds: float) -> None:
        with self._lock:
            self.stalls[path] = seconds

    def recover(self, path: str) -> None:
        with self._lock:
            self.failing.pop(path, None)

    def __exit__(self, *exc) -> None:
        self._closed.set()  # hanging and trickling handlers end
        super().__exit__(*exc)

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
