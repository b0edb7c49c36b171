"""A loopback "black hole" HTTP proxy for the UI tests: it answers every request (CONNECT included) with 502 and logs it.
Must not import webui, gradio or playwright (standard library only; the server under test and Chromium both point at it)."""

from __future__ import annotations

import socket
import socketserver
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# The most bytes of a request head we read; a proxy request line plus headers is far smaller.
_MAX_HEAD_BYTES = 16384
_REPLY = (
    b"HTTP/1.1 502 Bad Gateway\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 32\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"blocked by the test black hole\r\n"
)


@dataclass(frozen=True)
class Attempt:
    """One request that reached the black hole: who asked (a label) and its request line, e.g. `CONNECT host:443 HTTP/1.1`."""

    label: str
    request_line: str

    @property
    def target(self) -> str:
        parts = self.request_line.split()
        return parts[1] if len(parts) > 1 else self.request_line

    @property
    def host(self) -> str:
        """The host asked for: from `host:port` (CONNECT) or from an absolute URL (plain HTTP through a proxy)."""
        target = self.target
        if "://" in target:
            return urlsplit(target).hostname or ""
        return target.rsplit(":", 1)[0].strip("[]")


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        connection: socket.socket = self.request
        connection.settimeout(5)
        head = b""
        try:
            while b"\r\n" not in head and len(head) < _MAX_HEAD_BYTES:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                head += chunk
        except OSError:
            pass
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace").strip() or "<no request line>"
        server.owner.record(request_line)
        try:
            connection.sendall(_REPLY)
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: BlackHole


class BlackHole:
    """`with BlackHole("server", log_file) as hole:` → `hole.url` is `http://127.0.0.1:<port>`; `hole.attempts` lists requests."""

    def __init__(self, label: str, log_file: Path | None = None) -> None:
        self.label = label
        self.log_file = log_file
        self._lock = threading.Lock()
        self._attempts: list[Attempt] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"blackhole-{label}", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def attempts(self) -> list[Attempt]:
        with self._lock:
            return list(self._attempts)

    def record(self, request_line: str) -> None:
        attempt = Attempt(self.label, request_line)
        with self._lock:
            self._attempts.append(attempt)
            if self.log_file is not None:
                with self.log_file.open("a", encoding="utf-8") as log:
                    log.write(f"{self.label}\t{request_line}\n")

    def start(self) -> BlackHole:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> BlackHole:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
