"""A TCP proxy on 127.0.0.1 in front of a real server, for fault injection: it can refuse
new connections (nothing listens), cut the open ones, or hold the server's answers back.
It counts what it did, so a test can show that its fault happened."""
from __future__ import annotations

import socket
import threading
import time


class FaultProxy:
    """`connections`: connections accepted and passed on; `dropped`: open connections cut by
    `refuse()`; `delayed`: chunks of the server's answers held back by `slow()`."""

    def __init__(self, target_host: str, target_port: int):
        self._target = (target_host, target_port)
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._listener: socket.socket | None = None
        self._delay = 0.0
        self._delay_budget = 0
        self.connections = 0
        self.dropped = 0
        self.delayed = 0
        self.port = self._bind(0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _bind(self, port: int) -> int:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return listener.getsockname()[1]

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.append((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _hold(self) -> float:
        """How long to hold the next chunk of an answer (and count it), 0 when not slowed."""
        with self._lock:
            if self._delay_budget <= 0:
                return 0.0
            self._delay_budget -= 1
            self.delayed += 1
            return self._delay

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if answers:
                    time.sleep(self._hold())
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def slow(self, seconds: float, chunks: int) -> None:
        """Holds each of the server's next `chunks` answer chunks for `seconds`: the request
        has reached the server (and been carried out) when the client gives up waiting."""
        with self._lock:
            self._delay = seconds
            self._delay_budget = chunks

    def refuse(self) -> None:
        """Stop listening and cut every open connection: clients get 'connection refused'."""
        with self._lock:
            if self._listener:
                try:  # close() alone leaves a socket listening while a thread is blocked in accept()
                    self._listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._listener.close()
                self._listener = None
            for pair in self._conns:
                if pair[0].fileno() != -1:  # not closed by its pumps already
                    self.dropped += 1
                for sock in pair:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    sock.close()
            self._conns.clear()

    def restore(self) -> None:
        with self._lock:
            if self._listener is None:
                self._bind(self.port)

    def close(self) -> None:
        self.refuse()
