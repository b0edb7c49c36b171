"""Plain-HTTP checks of the served app (page with no model, --gradio-auth, flags) and the session's no-network check.
Must not import webui, gradio or playwright: the server is a black box reached over loopback HTTP."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.cookiejar import CookieJar
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.ui.blackhole import BlackHole
    from tests.ui.conftest import WebuiServer

REPO_ROOT = Path(__file__).resolve().parents[2]
USERS = {"tester": "s3cret-pass", "second": "another:one"}
# Hosts Chromium itself calls (updates, sign-in, time, autofill), not any page: the study in
# /work/shared/reference/web-on-this-machine.md §2b saw them despite --disable-background-networking.
CHROMIUM_SERVICE_HOSTS = re.compile(r"(^|\.)(google\.com|googleapis\.com|gvt1\.com|gstatic\.com|googleusercontent\.com)$")
ELEM_IDS = ["ckpt_dropdown", "ckpt_status", "txt2img_prompt", "txt2img_generate", "txt2img_gallery",
            "gallery_gallery", "pnginfo_image", "settings_apply"]


def fetch(url: str, data: dict[str, str] | None = None, jar: CookieJar | None = None) -> tuple[int, str]:
    """GET (or POST a form) straight to loopback, no proxy; returns status and body for error statuses too."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if jar is not None:
        handlers.append(urllib.request.HTTPCookieProcessor(jar))
    opener = urllib.request.build_opener(*handlers)
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with opener.open(urllib.request.Request(url, data=body), timeout=30) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


@pytest.fixture(scope="session")
def auth_server(start_webui: Callable[..., WebuiServer]) -> WebuiServer:
    """A second server: --gradio-auth with two users (one password holds a colon) and NO checkpoint at all."""
    # A1111 splits each entry at the first colon, so a password may contain ':'.
    credentials = ",".join(f"{user}:{password}" for user, password in USERS.items())
    return start_webui("auth-no-models", None, ["--gradio-auth", credentials])


def login(server: WebuiServer, user: str, password: str) -> tuple[int, str, CookieJar]:
    jar = CookieJar()
    status, body = fetch(server.url + "login", {"username": user, "password": password}, jar)
    return status, body, jar


def test_the_page_answers_with_the_ui(webui: WebuiServer) -> None:
    status, html = fetch(webui.url)
    assert status == 200
    assert "Stable Diffusion" in html
    status, config_text = fetch(webui.url + "config")
    assert status == 200
    config = json.loads(config_text)
    assert config["title"] == "Stable Diffusion"
    elem_ids = {component.get("props", {}).get("elem_id") for component in config["components"]}
    assert set(ELEM_IDS) <= elem_ids, sorted(set(ELEM_IDS) - elem_ids)
    tabs = {c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"}
    assert {"txt2img", "Gallery", "PNG Info", "Settings"} <= tabs, tabs
    assert f"Running on local URL:  http://127.0.0.1:{webui.port}" in webui.stdout_path.read_text(encoding="utf-8")


def test_the_page_is_served_with_no_model_at_all(auth_server: WebuiServer) -> None:
    status, _, jar = login(auth_server, "tester", USERS["tester"])
    assert status == 200
    status, config_text = fetch(auth_server.url + "config", jar=jar)
    assert status == 200
    config = json.loads(config_text)
    dropdowns = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "ckpt_dropdown"]
    assert len(dropdowns) == 1
    assert dropdowns[0]["props"].get("choices") in ([], None), dropdowns[0]["props"].get("choices")
    assert auth_server.process is not None and auth_server.process.poll() is None, auth_server.logs()


@pytest.mark.parametrize("route", ["config", "gradio_api/info", "gradio_api/queue/status"])
def test_gradio_auth_protects_gradio_routes(auth_server: WebuiServer, route: str) -> None:
    status, body = fetch(auth_server.url + route)
    assert status == 401, (status, body[:300])


def test_gradio_auth_serves_a_login_page_not_the_ui(auth_server: WebuiServer) -> None:
    status, html = fetch(auth_server.url)
    assert status == 200
    assert "txt2img_prompt" not in html
    assert re.search(r'"auth_required"\s*:\s*true', html) or "login" in html.lower()


def test_gradio_auth_refuses_a_wrong_password(auth_server: WebuiServer) -> None:
    status, body, jar = login(auth_server, "tester", "wrong-password")
    assert status != 200 or '"success":true' not in body.replace(" ", "")
    assert fetch(auth_server.url + "config", jar=jar)[0] == 401


@pytest.mark.parametrize("user", list(USERS))
def test_gradio_auth_lets_every_listed_user_in(auth_server: WebuiServer, user: str) -> None:
    status, body, jar = login(auth_server, user, USERS[user])
    assert status == 200, body
    status, config_text = fetch(auth_server.url + "config", jar=jar)
    assert status == 200
    assert "txt2img_prompt" in config_text


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "webui", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_help_lists_the_server_flags(cli_env: dict[str, str]) -> None:
    completed = run_cli(cli_env, "--help")
    assert completed.returncode == 0
    for flag in ("--port", "--listen", "--gradio-auth", "--gradio-auth-path", "--data-dir", "--ckpt-dir"):
        assert flag in completed.stdout, flag


@pytest.mark.parametrize("args", [["--port", "not-a-port"], ["--no-such-flag"]])
def test_bad_flags_are_refused_before_anything_starts(args: list[str], tmp_path: Path, cli_env: dict[str, str]) -> None:
    completed = run_cli(cli_env, "--data-dir", str(tmp_path), *args)
    assert completed.returncode == 2
    assert "error" in completed.stderr.lower()
    assert "Running on" not in completed.stdout


def test_malformed_gradio_auth_is_refused(tmp_path: Path, cli_env: dict[str, str]) -> None:
    completed = run_cli(cli_env, "--data-dir", str(tmp_path), "--port", "9", "--gradio-auth", "no-colon-here")
    assert completed.returncode != 0
    assert "USER:PASS" in completed.stderr or "gradio" in completed.stderr.lower()
    assert "Running on" not in completed.stdout


def test_nothing_tried_to_leave_the_machine(
    server_blackhole: BlackHole, browser_blackhole: BlackHole, page_leaks: list[str]
) -> None:
    """Runs last in the session: every server, CLI run and page of the session stayed on loopback."""
    assert server_blackhole.attempts == [], "the app tried to reach the network: " + repr(server_blackhole.attempts)
    assert page_leaks == [], f"pages asked for off-machine URLs: {page_leaks}"
    not_chromium = [a for a in browser_blackhole.attempts if not CHROMIUM_SERVICE_HOSTS.search(a.host)]
    assert not_chromium == [], f"Chromium proxied requests that are not its own services: {not_chromium}"
