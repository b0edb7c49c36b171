"""Cross-site protection on the plain local server (no login, 127.0.0.1): another web page in the user's browser
cannot start a generation or change settings, and a DNS-rebinding name is refused. Black box over loopback HTTP."""

from __future__ import annotations

import http.client
import json
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.ui.conftest import WebuiServer

EVIL = "https://evil.example"


def request(server: WebuiServer, method: str, path: str, headers: dict[str, str], body: bytes = b"{}") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path", ["/gradio_api/queue/join", "/gradio_api/call/txt2img", "/gradio_api/upload",
                                  "/extensions/install", "/sdapi/v1/options"])
@pytest.mark.parametrize("origin", [EVIL, "null", "http://127.0.0.1:1"])
def test_a_foreign_origin_cannot_change_anything(webui: WebuiServer, path: str, origin: str) -> None:
    status, body = request(webui, "POST", path, {"Origin": origin})
    assert status == 403, (status, body[:200])
    assert b"Cross-site request refused" in body


def test_a_cross_site_form_post_without_origin_is_refused(webui: WebuiServer) -> None:
    status, _ = request(webui, "POST", "/gradio_api/queue/join", {"Sec-Fetch-Site": "cross-site"})
    assert status == 403


def test_the_page_itself_may_post(webui: WebuiServer) -> None:
    status, body = request(webui, "POST", "/gradio_api/queue/join", {"Origin": f"http://127.0.0.1:{webui.port}"})
    assert status != 403, body[:200]
    status, _ = request(webui, "GET", "/config", {"Origin": f"http://localhost:{webui.port}", "Host": f"localhost:{webui.port}"})
    assert status == 200


def test_a_dns_rebinding_host_is_refused(webui: WebuiServer) -> None:
    status, body = request(webui, "GET", "/config", {"Host": f"evil.example:{webui.port}"})
    assert status == 403 and b"localhost only" in body
    status, _ = request(webui, "POST", "/gradio_api/queue/join", {
        "Host": f"evil.example:{webui.port}", "Origin": f"http://evil.example:{webui.port}"})
    assert status == 403


def test_settings_are_unchanged_after_a_refused_cross_site_post(webui: WebuiServer) -> None:
    request(webui, "POST", "/sdapi/v1/options", {"Origin": EVIL}, json.dumps({"samples_format": "webp"}).encode())
    config = webui.data_dir / "config.json"
    assert not config.exists() or json.loads(config.read_text()).get("samples_format") != "webp"
