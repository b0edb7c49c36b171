"""Who may use the server: the access plan (a generated password when exposed), and one ASGI middleware in front of
every route that refuses foreign Hosts and Origins, asks for a login or HTTP Basic, and rate-limits login attempts.
Standard library only: must not import gradio, fastapi, starlette, torch or the engine (it wraps any ASGI app)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

Credentials = tuple[tuple[str, str], ...]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATED_USER = "webui"
# 24 URL-safe characters: 144 random bits, far beyond guessing at any rate the limiter lets through.
GENERATED_PASSWORD_BYTES = 18
# Methods that change something; a browser sends an Origin header with every one of them.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
# The REST API (A1111's /sdapi/v1, our /api/v1) and its schema: HTTP Basic, never the UI's session cookie.
API_PREFIXES = ("/sdapi/", "/api/v1/", "/api/v1", "/docs", "/openapi.json")
# What gradio's login page itself loads before anyone has logged in; everything else needs a login.
# "/" and "/config" answer with the login form or 401 themselves (gradio checks its own session there).
LOGIN_PAGE_PATHS = frozenset({
    "/", "/login", "/login/", "/logout", "/config", "/config/", "/favicon.ico", "/manifest.json", "/theme.css",
    "/robots.txt", "/gradio_api/login_check", "/gradio_api/login_check/", "/gradio_api/startup-events",
    # A random id per process that the page polls across "Reload UI" (a restart forgets every login).
    "/internal/boot-id",
})
LOGIN_PAGE_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
LOGIN_PATHS = frozenset({"/login", "/login/"})
# gradio answers 200 here for a valid session cookie and 401 otherwise: the gate asks it rather than reading
# gradio's private token table.
UI_SESSION_PROBE_PATH = "/gradio_api/login_check"
# The limiter's name for a visitor through the share tunnel whose address the share server did not give.
TUNNEL_VISITOR = "share-tunnel"
# gradio's file routes (the path after the prefix names a file on disk).
FILE_ROUTE_PREFIXES = ("/gradio_api/file=", "/gradio_api/file/", "/file=", "/file/")
PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".avif"})
# The REST API's own wording (webui/api/auth.py), so clients see one message whichever layer answers.
WRONG_CREDENTIALS = "Incorrect username or password"
TOO_MANY_FAILURES = "Too many failed logins; try again later."


def generate_password() -> str:
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)


@dataclass(frozen=True)
class AccessPlan:
    """Who may log in, decided once at start-up from the flags."""

    ui_credentials: Credentials
    api_credentials: Credentials
    generated_password: str | None = None
    # Exposed with --insecure-no-auth and nothing else guarding it.
    open_to_anyone: bool = False


def plan_access(
    exposed: bool, ui_credentials: Sequence[tuple[str, str]], api_credentials: Sequence[tuple[str, str]],
    insecure_no_auth: bool, serves_ui: bool = True, make_password: Callable[[], str] = generate_password,
) -> AccessPlan:
    """Exposed (--listen/--share) without --gradio-auth: a generated password protects the UI, and the API too
    unless --api-auth names its own users (the API takes the UI's users otherwise, so it is never left open).
    With --nowebui only the API's users matter."""
    ui = tuple(ui_credentials)
    api = tuple(api_credentials)
    generated = None
    needs_login = (not ui) if serves_ui else (not api and not ui)
    if exposed and needs_login and not insecure_no_auth:
        generated = make_password()
        ui = ((GENERATED_USER, generated),)
    api = api or ui
    open_door = exposed and (not ui if serves_ui else not api)
    return AccessPlan(ui, api, generated, open_to_anyone=insecure_no_auth and open_door)


def access_notice(plan: AccessPlan, reasons: str) -> str:
    """What to print at start-up: the generated password (once), or the warning for --insecure-no-auth."""
    if plan.generated_password is not None:
        rule = "*" * 78
        return (f"\n{rule}\nThis server can be reached from other machines ({reasons}), so it needs a login.\n"
                f"    user:     {GENERATED_USER}\n    password: {plan.generated_password}\n"
                "This password is new at every start and is shown only here. Choose your own with "
                "--gradio-auth USER:PASS.\n"
                f"{rule}\n")
    if plan.open_to_anyone:
        rule = "!" * 78
        return (f"\n{rule}\nWARNING: {reasons} with --insecure-no-auth: anyone who can reach this server can "
                "use the UI and the API,\ngenerate on this machine and change its settings.\n"
                f"{rule}\n")
    return ""


def credentials_match(user: str, password: str, allowed: Sequence[tuple[str, str]]) -> bool:
    """Constant time: every pair is compared, so the time taken does not reveal which user exists."""
    given_user, given_password = user.encode(), password.encode()
    matches = [secrets.compare_digest(given_user, u.encode()) & secrets.compare_digest(given_password, p.encode())
               for u, p in allowed]
    return any(matches)


class LoginRateLimiter:
    """Failed logins per client: after `max_failures` within `window_s`, every attempt is refused until the oldest
    failure ages out (a correct password too, or guessing could go on). A success clears the client's record."""

    def __init__(self, max_failures: int = 5, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(client, deque())
        while failures and now - failures[0] >= self.window_s:
            failures.popleft()
        return failures

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may try now."""
        with self._lock:
            now = self._clock()
            failures = self._recent(client, now)
            if len(failures) < self.max_failures:
                if not failures:
                    self._failures.pop(client, None)
                return 0.0
            return max(0.0, self.window_s - (now - failures[0]))

    def record_failure(self, client: str) -> None:
        with self._lock:
            now = self._clock()
            self._recent(client, now).append(now)

    def record_success(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


def split_host(host: str) -> tuple[str, int | None]:
    """'Example.com:8080' → ('example.com', 8080); '[::1]:7860' → ('::1', 7860); a bad port → port None."""
    parts = urlsplit("//" + host.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    return (parts.hostname or "").lower(), port


def is_loopback_host(hostname: str) -> bool:
    if hostname in LOOPBACK_NAMES or hostname.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def origin_matches_host(origin: str, host: str) -> bool:
    """Same host and port. A Host without a port matches the origin's default port: behind a TLS share server
    the browser says https://x.example while the Host header says x.example."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    try:
        origin_port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    host_name, host_port = split_host(host)
    if parts.hostname.lower() != host_name:
        return False
    return host_port == origin_port or (host_port is None and origin_port in (80, 443))


def parse_basic(value: str) -> tuple[str, str] | None:
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, separator, password = decoded.partition(":")
    return (user, password) if separator else None


@dataclass(frozen=True)
class GateConfig:
    """What AccessGate enforces. `exposed` lifts the localhost-only Host rule (the server is meant to be reached
    under other names); credentials left empty leave that side open, as without --gradio-auth on localhost."""

    exposed: bool
    ui_credentials: Credentials = ()
    api_credentials: Credentials = ()
    api_prefixes: tuple[str, ...] = API_PREFIXES
    ui_session_probe_path: str | None = UI_SESSION_PROBE_PATH
    limiter: LoginRateLimiter = field(default_factory=LoginRateLimiter)
    # Whether a loopback peer (host, port) is our share tunnel's frpc, which names the visitor in X-Forwarded-For.
    # From any other peer the header is ignored: a local process could name any client and escape a lockout.
    is_tunnel_peer: Callable[[str, int], bool] | None = None
    # Folders (resolved, absolute) from which gradio's file routes may serve pictures only: the outputs folder
    # also holds a stray notes.txt or a half-written .tmp, which are nobody's business.
    pictures_only_under: tuple[str, ...] = ()


class AccessGate:
    """ASGI middleware in front of the whole app, so routes added later (extensions, the REST API) are covered too.

    1. Host: when not exposed, only localhost names (a DNS-rebinding page has its own name in Host).
    2. Origin: a request that carries an Origin must come from this very host; `Origin: null` and cross-site
       requests that change something without an Origin are refused. gradio's CORS reflects any Origin with
       credentials when the Host is not localhost, so this is what keeps other web pages out.
    3. Login: UI routes need gradio's session cookie (or HTTP Basic), API routes need HTTP Basic; when exposed,
       failures are counted per client (behind the share tunnel: per visitor) and refused with 429 past the limit.
    4. gradio's file routes serve only pictures from the folders in `pictures_only_under`.
    """

    def __init__(self, app: AsgiApp, config: GateConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        refusal = self._refuse_foreign(scope, headers)
        if refusal is not None:
            await _deny(scope, send, 403, refusal)
            return
        path: str = scope.get("path", "")
        if not self._may_serve_file(path):
            await _deny(scope, send, 404, "File not found")
            return
        client = _client_key(scope, headers, self.config.is_tunnel_peer)
        if self._is_api_path(path):
            if self.config.api_credentials:
                await self._basic_only(scope, receive, send, headers, client, self.config.api_credentials)
                return
        elif self.config.ui_credentials:
            await self._ui(scope, receive, send, headers, client, path)
            return
        await self.app(scope, receive, send)

    def _refuse_foreign(self, scope: Scope, headers: dict[str, str]) -> str | None:
        host = headers.get("host", "")
        if not self.config.exposed and host and not is_loopback_host(split_host(host)[0]):
            return (f"Host {host!r} refused: this server answers to localhost only. Start it with --listen or "
                    "--share (a login is then required) to reach it under other names.")
        origin = headers.get("origin")
        if origin is not None:
            if not origin_matches_host(origin, host):
                return f"Cross-site request refused: Origin {origin!r} is not this server ({host!r})."
            return None
        method = scope.get("method", "GET") if scope["type"] == "http" else "GET"
        if method in UNSAFE_METHODS and headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return "Cross-site request refused."
        return None

    def _may_serve_file(self, path: str) -> bool:
        """False for a gradio file route naming a file that is not a picture inside `pictures_only_under`."""
        if not self.config.pictures_only_under:
            return True
        for prefix in FILE_ROUTE_PREFIXES:
            if path.startswith(prefix):
                return _is_picture_or_elsewhere(unquote(path[len(prefix):]), self.config.pictures_only_under)
        return True

    def _is_api_path(self, path: str) -> bool:
        return any(path == prefix.rstrip("/") or path.startswith(prefix) for prefix in self.config.api_prefixes)

    async def _basic_only(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], client: str,
                          allowed: Credentials) -> None:
        given = parse_basic(headers.get("authorization", ""))
        if given is None:
            await _deny(scope, send, 401, WRONG_CREDENTIALS, basic=True)
            return
        wait = self._retry_after(client)
        if wait > 0:
            await _deny(scope, send, 429, TOO_MANY_FAILURES, retry_after=wait)
            return
        if not credentials_match(*given, allowed):
            self._count(client, success=False)
            await _deny(scope, send, 401, WRONG_CREDENTIALS, basic=True)
            return
        self._count(client, success=True)
        await self.app(scope, receive, send)

    def _retry_after(self, client: str) -> float:
        # Guessing is a remote threat: on localhost only (not exposed) nothing is limited.
        return self.config.limiter.retry_after(client) if self.config.exposed else 0.0

    def _count(self, client: str, success: bool) -> None:
        if not self.config.exposed:
            return
        if success:
            self.config.limiter.record_success(client)
        else:
            self.config.limiter.record_failure(client)

    async def _ui(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], client: str,
                  path: str) -> None:
        if path in LOGIN_PATHS and scope.get("method") == "POST":
            await self._login(scope, receive, send, client)
            return
        if path in LOGIN_PAGE_PATHS or path.startswith(LOGIN_PAGE_PREFIXES) or await self._has_ui_session(scope):
            await self.app(scope, receive, send)
            return
        if "authorization" in headers:
            # Scripts and curl may use HTTP Basic with a UI user instead of the login form.
            await self._basic_only(scope, receive, send, headers, client, self.config.ui_credentials)
            return
        await _deny(scope, send, 401, "Not authenticated")

    async def _login(self, scope: Scope, receive: Receive, send: Send, client: str) -> None:
        """gradio's own login form: refused past the limit, and its answer (200 or 400) is counted."""
        wait = self._retry_after(client)
        if wait > 0:
            await _deny(scope, send, 429, TOO_MANY_FAILURES, retry_after=wait)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._count(client, success=message["status"] == 200)
            await send(message)

        await self.app(scope, receive, counting_send)

    async def _has_ui_session(self, scope: Scope) -> bool:
        """Ask the wrapped app whether the request's cookies hold a logged-in session."""
        probe_path = self.config.ui_session_probe_path
        cookies = [(name, value) for name, value in scope.get("headers", []) if name.lower() == b"cookie"]
        if probe_path is None or not cookies:
            return False
        probe: Scope = {
            key: value for key, value in scope.items() if key not in ("path", "raw_path", "query_string", "headers")
        }
        probe.update(type="http", method="GET", path=probe_path, raw_path=probe_path.encode(), query_string=b"",
                     headers=cookies, http_version=scope.get("http_version", "1.1"))
        probe.setdefault("scheme", "http")
        status = 0

        async def empty_body() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self.app(probe, empty_body, note_status)
        return status == 200


def _headers(scope: Scope) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}


def _client_key(scope: Scope, headers: dict[str, str], is_tunnel_peer: Callable[[str, int], bool] | None) -> str:
    """The peer address; on a connection from our share tunnel's frpc, the last hop its server added to
    X-Forwarded-For. From any other peer the header is anyone's to write and is ignored."""
    peer_host, peer_port = scope.get("client") or ("unknown", 0)
    from_tunnel = is_tunnel_peer is not None and is_loopback_host(str(peer_host)) \
        and is_tunnel_peer(str(peer_host), int(peer_port))
    if from_tunnel:
        # Visitors through the tunnel are never this machine's own processes, even when a hop names nobody.
        return headers.get("x-forwarded-for", "").split(",")[-1].strip() or TUNNEL_VISITOR
    return str(peer_host)


def _is_picture_or_elsewhere(name: str, picture_folders: Sequence[str]) -> bool:
    """True when the file route may go on: `name` is a picture, or lies outside every picture-only folder."""
    if Path(name).suffix.lower() in PICTURE_SUFFIXES:
        return True
    try:
        resolved = Path(name).resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return not any(resolved.is_relative_to(folder) for folder in picture_folders)


async def _deny(scope: Scope, send: Send, status: int, detail: str, basic: bool = False,
                retry_after: float | None = None) -> None:
    if scope["type"] == "websocket":
        # Closing before accepting makes the server answer the handshake with 403.
        await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
        return
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if basic:
        headers.append((b"www-authenticate", b"Basic"))
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(retry_after))).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
