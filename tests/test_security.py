"""webui/security.py: who may log in when exposed, the Origin/Host rules and the login rate limiter; the gate itself
is driven over real HTTP in tests/ui/test_share_link.py and tests/ui/test_cross_site.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote

import pytest

from webui.security import (
    GENERATED_USER,
    AccessGate,
    GateConfig,
    LoginRateLimiter,
    access_notice,
    credentials_match,
    is_loopback_host,
    origin_matches_host,
    parse_basic,
    plan_access,
)


def fixed_password() -> str:
    return "generated-secret"


@pytest.mark.parametrize("serves_ui", [True, False])
def test_exposed_without_credentials_gets_a_generated_password_for_ui_and_api(serves_ui: bool) -> None:
    plan = plan_access(True, [], [], insecure_no_auth=False, serves_ui=serves_ui, make_password=fixed_password)
    assert plan.generated_password == "generated-secret"
    assert plan.ui_credentials == ((GENERATED_USER, "generated-secret"),)
    assert plan.api_credentials == plan.ui_credentials
    notice = access_notice(plan, "--share")
    assert "generated-secret" in notice and "--share" in notice and GENERATED_USER in notice


def test_given_credentials_are_kept_and_nothing_is_generated() -> None:
    plan = plan_access(True, [("me", "pw")], [], insecure_no_auth=False, make_password=fixed_password)
    assert plan.generated_password is None and plan.ui_credentials == (("me", "pw"),)
    assert plan.api_credentials == (("me", "pw"),), "the API takes the UI's users"
    assert access_notice(plan, "--listen") == ""


def test_api_auth_keeps_its_own_users_and_the_ui_still_gets_a_password() -> None:
    plan = plan_access(True, [], [("bot", "key")], insecure_no_auth=False, make_password=fixed_password)
    assert plan.api_credentials == (("bot", "key"),)
    assert plan.ui_credentials == ((GENERATED_USER, "generated-secret"),)
    api_only = plan_access(True, [], [("bot", "key")], insecure_no_auth=False, serves_ui=False,
                           make_password=fixed_password)
    assert api_only.generated_password is None and api_only.api_credentials == (("bot", "key"),)


def test_insecure_no_auth_is_an_explicit_opt_out_with_a_warning() -> None:
    plan = plan_access(True, [], [], insecure_no_auth=True, make_password=fixed_password)
    assert plan.ui_credentials == () and plan.api_credentials == () and plan.open_to_anyone
    assert "WARNING" in access_notice(plan, "--listen") and "--insecure-no-auth" in access_notice(plan, "--listen")


def test_localhost_stays_as_it_was() -> None:
    plan = plan_access(False, [], [], insecure_no_auth=False, make_password=fixed_password)
    assert plan.ui_credentials == () and plan.generated_password is None and not plan.open_to_anyone


def test_generated_passwords_differ_and_are_long() -> None:
    first = plan_access(True, [], [], insecure_no_auth=False).generated_password
    second = plan_access(True, [], [], insecure_no_auth=False).generated_password
    assert first and second and first != second and len(first) >= 24


@pytest.mark.parametrize(("origin", "host", "same"), [
    ("http://127.0.0.1:7860", "127.0.0.1:7860", True),
    ("http://LOCALHOST:7860", "localhost:7860", True),
    ("https://abc.gradio.live", "abc.gradio.live", True),  # TLS ends at the share server: Host has no port
    ("http://abc.share.localhost:18080", "abc.share.localhost:18080", True),
    ("http://[::1]:7860", "[::1]:7860", True),
    ("https://evil.example", "abc.gradio.live", False),
    ("https://evil.gradio.live", "abc.gradio.live", False),  # same site, another origin
    ("http://127.0.0.1:7861", "127.0.0.1:7860", False),
    ("http://127.0.0.1", "127.0.0.1:7860", False),
    ("null", "127.0.0.1:7860", False),
    ("file://", "127.0.0.1:7860", False),
    ("http://127.0.0.1:notaport", "127.0.0.1:7860", False),
])
def test_origin_matches_host(origin: str, host: str, same: bool) -> None:
    assert origin_matches_host(origin, host) is same


@pytest.mark.parametrize(("hostname", "loopback"), [
    ("localhost", True), ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("abc.localhost", True),
    ("192.168.1.5", False), ("evil.example", False), ("localhost.evil.example", False), ("", False),
])
def test_is_loopback_host(hostname: str, loopback: bool) -> None:
    assert is_loopback_host(hostname) is loopback


def test_basic_credentials_are_parsed_and_compared() -> None:
    assert parse_basic("Basic dXNlcjpwYTpzcw==") == ("user", "pa:ss")
    assert parse_basic("Bearer abc") is None and parse_basic("Basic !!!") is None
    assert credentials_match("user", "pa:ss", [("other", "x"), ("user", "pa:ss")])
    assert not credentials_match("user", "wrong", [("user", "pa:ss")])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_locks_a_client_after_repeated_failures_until_the_window_passes() -> None:
    clock = Clock()
    limiter = LoginRateLimiter(max_failures=3, window_s=60, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("a") == 0
        limiter.record_failure("a")
    assert limiter.retry_after("a") == 60
    assert limiter.retry_after("b") == 0, "other clients are not affected"
    clock.now += 59
    assert limiter.retry_after("a") == pytest.approx(1)
    clock.now += 1
    assert limiter.retry_after("a") == 0


def test_rate_limiter_forgets_failures_after_a_success() -> None:
    limiter = LoginRateLimiter(max_failures=2, window_s=60, clock=Clock())
    limiter.record_failure("a")
    limiter.record_success("a")
    limiter.record_failure("a")
    assert limiter.retry_after("a") == 0


def _serve(gate_config: GateConfig, path: str, client: tuple[str, int], headers: list[tuple[bytes, bytes]],
           body: bytes = b"") -> tuple[int, list[str]]:
    """One request through AccessGate in front of an app that records the client it was asked for."""
    seen: list[str] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 400 if scope["path"] == "/login" else 200,
                    "headers": []})
        await send({"type": "http.response.body", "body": b""})

    statuses: list[int] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {"type": "http", "method": "POST" if path == "/login" else "GET", "path": path, "client": client,
             "headers": [(b"host", b"127.0.0.1:7860"), *headers]}
    asyncio.run(AccessGate(app, gate_config)(scope, receive, send))
    return statuses[0], seen


def test_forwarded_for_counts_only_on_the_tunnels_own_connections() -> None:
    tunnel_port = 40000
    config = GateConfig(exposed=True, ui_credentials=(("webui", "pw"),),
                        is_tunnel_peer=lambda host, port: port == tunnel_port)
    local = [_serve(config, "/login", ("127.0.0.1", 50000 + n), [(b"x-forwarded-for", f"192.0.2.{n}".encode())])[0]
             for n in range(6)]
    assert local == [400] * 5 + [429], "a rotating header from a local process must not reset the count"
    visitor = _serve(config, "/login", ("127.0.0.1", tunnel_port), [(b"x-forwarded-for", b"198.51.100.1")])[0]
    assert visitor == 400, "a visitor through the tunnel is a client of their own"


def test_the_file_route_serves_only_pictures_from_the_outputs_folder(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    config = GateConfig(exposed=False, pictures_only_under=(str(outputs.resolve()),))
    for name, served in (("a.png", True), ("b.JPG", True), ("notes.txt", False), ("c.png.tmp", False),
                         ("../elsewhere.txt", True)):
        for route in ("/gradio_api/file=", "/gradio_api/file/"):
            status, seen = _serve(config, f"{route}{quote(str(outputs / name))}", ("127.0.0.1", 1), [])
            assert (status == 200 and bool(seen)) is served, (route, name, status)
