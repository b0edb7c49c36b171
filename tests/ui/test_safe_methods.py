"""No GET or HEAD changes anything, on any route (UI, /api/v1, /sdapi/v1, extension routes): a page on another site
that embeds one (an <img>, in Chromium) changes no file; gradio's file route serves only pictures from the outputs
folder. Black box: a real `python -m webui --api` with an enabled extension, over loopback HTTP and a real browser."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.fixtures.extension_repos import make_repo, stamp_extension
from tests.ui.conftest import WebuiServer, free_port

# What the hostile page asks for: its own index, from a local path the server can read.
ATTACKER_INDEX = {"extensions": [{"name": "evil", "url": "https://evil.example/evil.git", "description": "x"}]}
USERS_INDEX = {"extensions": [{"name": "good", "url": "https://example.invalid/good.git", "description": "y"}]}
# gradio's GET routes that take no path parameters of ours (the schema does not list them).
GRADIO_GET_PATHS = ["/", "/config", "/gradio_api/info", "/gradio_api/queue/status", "/gradio_api/startup-events",
                    "/gradio_api/heartbeat/abc", "/gradio_api/upload_progress?upload_id=x", "/internal/boot-id",
                    "/theme.css", "/manifest.json", "/favicon.ico", "/robots.txt", "/login", "/logout"]
GRADIOS_OWN = ("/gradio_api/", "/?", "/config", "/login", "/logout", "/monitoring", "/svelte", "/static", "/assets",
               "/pwa_icon", "/theme.css", "/favicon.ico", "/robots.txt", "/manifest.json")
# What may change while requests are served: caches (hashes, the gallery index) and the server's own logs.
VOLATILE_PARTS = {"cache", "gradio-tmp", "hf-home"}


class _Pages(http.server.BaseHTTPRequestHandler):
    """Serves `page` (HTML or JSON) at every path."""

    page = b""
    content_type = "text/html"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", self.content_type)
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args: Any) -> None:
        pass


def serve(page: bytes, content_type: str) -> http.server.ThreadingHTTPServer:
    handler = type("Page", (_Pages,), {"page": page, "content_type": content_type})
    site = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    return site


@pytest.fixture(scope="module")
def index_site() -> Iterator[str]:
    """The user's own index, on loopback (the default index on github.com cannot be reached here)."""
    site = serve(json.dumps(USERS_INDEX).encode(), "application/json")
    yield f"http://127.0.0.1:{site.server_address[1]}/index.json"
    site.shutdown()


@pytest.fixture(scope="module")
def api_webui(start_webui: Callable[..., WebuiServer], tiny_model_dir: Path, ui_tmp: Path,
              index_site: str) -> WebuiServer:
    """`--api`, with the `stamp` extension enabled (it adds GET /stamp/version at APP_STARTED) and the user's index.

    extensions.json is written into the started server's data folder, then the server restarts to load it."""
    seed = ui_tmp / "safe-methods-seed"
    make_repo(seed / "extensions" / "stamp", stamp_extension("v1"))
    server = start_webui("safe-methods", tiny_model_dir, ["--api", "--extensions-dir", str(seed / "extensions")])
    (server.data_dir / "extensions.json").write_text(json.dumps({"enabled": ["stamp"], "index_url": index_site}))
    server.stop()
    server.start().wait_ready()
    return server


def request(server: WebuiServer, method: str, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = b"" if "text/event-stream" in (response.getheader("content-type") or "") else response.read()
        return response.status, body
    finally:
        connection.close()


def post_json(server: WebuiServer, path: str, body: object) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def state_of(data_dir: Path) -> dict[str, str]:
    """Every file a user's state lives in (settings, extensions.json, outputs, models), by content."""
    files = {}
    for path in sorted(data_dir.rglob("*")):
        relative = path.relative_to(data_dir)
        if path.is_file() and not VOLATILE_PARTS & set(relative.parts) and path.suffix != ".log":
            files[relative.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def wait_until_idle(server: WebuiServer) -> None:
    """The start-up model load is a queued job that writes settings; the sweep starts after it."""
    for _ in range(1200):
        # The REST routes are mounted just after the page answers: a 404 here means "not yet".
        status, body = request(server, "GET", "/api/v1/models")
        if status == 200 and any(model["loaded"] for model in json.loads(body)):
            progress = json.loads(request(server, "GET", "/sdapi/v1/progress")[1])
            if progress["current_task"] is None:
                return
        threading.Event().wait(0.1)
    raise AssertionError("the server never became idle")


def get_paths_of_the_schema(server: WebuiServer) -> list[str]:
    status, body = request(server, "GET", "/openapi.json")
    assert status == 200, body[:300]
    paths = []
    for path, operations in json.loads(body)["paths"].items():
        if "get" in operations:
            query = "&".join(f"{parameter['name']}=x" for parameter in operations["get"].get("parameters", [])
                             if parameter.get("in") == "query")
            paths.append(re.sub(r"\{[^}]+\}", "x", path) + (f"?{query}" if query else ""))
    return paths


def test_no_get_or_head_on_any_route_changes_state(api_webui: WebuiServer, tmp_path: Path) -> None:
    server = api_webui
    index = tmp_path / "index.json"
    index.write_text(json.dumps(ATTACKER_INDEX))
    wait_until_idle(server)
    schema_paths = get_paths_of_the_schema(server)
    # The enumeration is real: the schema has the three APIs, the extension management and the extension's route.
    for expected in ("/sdapi/v1/progress", "/api/v1/jobs/x", "/api/v1/extensions/index", "/stamp/version"):
        assert any(path.split("?")[0] == expected for path in schema_paths), (expected, schema_paths)
    before = state_of(server.data_dir)
    assert "extensions.json" in before

    hostile_query = f"url={quote(str(index))}&path=notes.txt&name=stamp"
    statuses = {}
    for path in [*schema_paths, *GRADIO_GET_PATHS]:
        with_query = path + ("&" if "?" in path else "?") + hostile_query
        for method in ("GET", "HEAD"):
            statuses[f"{method} {with_query}"], _ = request(server, method, with_query)
    # Our routes answer bad input with a 4xx (gradio's own, e.g. "/?deep_link=x", are gradio's business).
    ours = {call: status for call, status in statuses.items() if not call.split()[1].startswith(GRADIOS_OWN)}
    assert ours and all(status < 500 for status in ours.values()), {k: v for k, v in ours.items() if v >= 500}

    assert state_of(server.data_dir) == before
    progress = json.loads(request(server, "GET", "/sdapi/v1/progress")[1])
    assert progress["current_task"] is None, "a GET queued a job"


@pytest.fixture
def hostile_site(api_webui: WebuiServer, tmp_path: Path) -> Iterator[str]:
    """Another web site (another loopback port) whose page embeds the state-changing GET of the report."""
    index = tmp_path / "index.json"
    index.write_text(json.dumps(ATTACKER_INDEX))
    target = f"http://127.0.0.1:{api_webui.port}/api/v1/extensions/index?url={quote(str(index))}"
    site = serve(f'<html><body><img id="probe" src="{target}"></body></html>'.encode(), "text/html")
    yield f"http://127.0.0.1:{site.server_address[1]}/"
    site.shutdown()


def test_a_page_on_another_site_cannot_change_the_extension_index(
    api_webui: WebuiServer, hostile_site: str, index_site: str, new_context: Callable[[], Any],
) -> None:
    state_file = api_webui.data_dir / "extensions.json"
    before = state_file.read_bytes()
    page = new_context().new_page()
    with page.expect_response(lambda response: "/api/v1/extensions/index" in response.url) as sent:
        page.goto(hostile_site)
    assert sent.value.status == 200  # the browser really sent the GET; it got the user's own index
    assert state_file.read_bytes() == before
    status, body = request(api_webui, "GET", "/api/v1/extensions/index")
    assert status == 200 and [entry["name"] for entry in json.loads(body)] == ["good"]


def test_the_index_url_is_saved_by_a_post_and_only_for_http(api_webui: WebuiServer, index_site: str,
                                                           tmp_path: Path) -> None:
    local = tmp_path / "index.json"
    local.write_text(json.dumps(ATTACKER_INDEX))
    state_file = api_webui.data_dir / "extensions.json"
    before = state_file.read_bytes()
    for url in (str(local), f"file://{local}", "ftp://127.0.0.1/index.json"):
        status, body = post_json(api_webui, "/api/v1/extensions/index", {"url": url})
        assert status == 400 and b"must be an http:// or https:// URL" in body, (url, status, body)
    # A port with nothing behind it and a file that exists answer alike: nothing found there is echoed.
    closed = f"http://127.0.0.1:{free_port()}/index.json"
    status, body = post_json(api_webui, "/api/v1/extensions/index", {"url": closed})
    assert status == 400 and json.loads(body)["detail"] == f"could not load the index from {closed}"
    assert state_file.read_bytes() == before

    other = index_site + "?copy"
    status, body = post_json(api_webui, "/api/v1/extensions/index", {"url": other})
    assert status == 200 and [entry["name"] for entry in json.loads(body)] == ["good"]
    assert json.loads(state_file.read_text())["index_url"] == other
    status, _ = post_json(api_webui, "/api/v1/extensions/index", {"url": index_site})
    assert status == 200


def test_the_file_route_serves_pictures_only_from_the_outputs_folder(api_webui: WebuiServer) -> None:
    outputs = api_webui.outputs_dir
    outputs.mkdir(parents=True, exist_ok=True)
    (outputs / "notes.txt").write_text("private notes")
    (outputs / "00001-1.png.tmp").write_bytes(b"half written")
    picture = outputs / "00002-2.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 32)
    for name in ("notes.txt", "00001-1.png.tmp"):
        status, body = request(api_webui, "GET", f"/gradio_api/file={quote(str(outputs / name))}")
        assert status == 404 and b"private" not in body and b"half" not in body, (name, status)
    status, body = request(api_webui, "GET", f"/gradio_api/file={quote(str(picture))}")
    assert status == 200 and body.startswith(b"\x89PNG"), (status, body[:100])
