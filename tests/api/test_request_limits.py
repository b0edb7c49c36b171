"""Unbounded input is refused before anything is queued: prompt length in characters and in 75-token chunks (a
setting), and every other free-form text or list field, each with a 422 naming the field and the limit.
A real server over HTTP."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
import requests

from tests.api.conftest import ApiServer

TIMEOUT = 120
TINY = {"width": 64, "height": 64, "steps": 2}
# The hostile client's prompt: 10 million characters.
HUGE_PROMPT = "cat " * 2_500_000
# Within the character limit (15,000 characters), but 6,000 tokens: at least 80 chunks of 75.
MANY_TOKENS = "cat, " * 3000


def post(server: ApiServer, path: str, body: Any) -> requests.Response:
    return requests.post(f"{server.url}{path}", data=json.dumps(body, allow_nan=True),
                         headers={"Content-Type": "application/json"}, timeout=TIMEOUT)


def nothing_is_running(server: ApiServer) -> bool:
    progress = requests.get(f"{server.url}/sdapi/v1/progress", timeout=TIMEOUT).json()
    return progress["current_task"] is None and progress["state"]["job_count"] == 0


@pytest.fixture
def idle_server(api_server: ApiServer) -> ApiServer:
    """The shared server once its start-up model load (and any earlier test's job) has finished."""
    deadline = time.monotonic() + TIMEOUT

    def model_loaded() -> bool:
        models = requests.get(f"{api_server.url}/api/v1/models", timeout=TIMEOUT).json()
        return any(model["loaded"] for model in models)

    while not (model_loaded() and nothing_is_running(api_server)):
        assert time.monotonic() < deadline, "the server never became idle"
        time.sleep(0.1)
    return api_server


def error_text(reply: requests.Response) -> str:
    assert reply.headers["content-type"].startswith("application/json"), reply.text[:300]
    return json.dumps(reply.json())


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/sdapi/v1/txt2img"])
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_huge_prompt_is_refused_naming_the_field_and_the_limit(idle_server: ApiServer, path: str, field: str) -> None:
    reply = post(idle_server, path, {**TINY, field: HUGE_PROMPT})
    assert reply.status_code == 422, reply.text[:300]
    text = error_text(reply)
    assert field in text and "32768 characters" in text
    assert len(reply.content) < 10_000, "the refusal must not echo the prompt back"
    assert nothing_is_running(idle_server)


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/sdapi/v1/txt2img"])
def test_a_prompt_of_too_many_chunks_is_refused_before_it_is_queued(idle_server: ApiServer, path: str) -> None:
    reply = post(idle_server, path, {**TINY, "prompt": MANY_TOKENS})
    assert reply.status_code == 422, reply.text[:300]
    text = error_text(reply)
    assert "prompt: must be at most 32 chunks of 75 tokens" in text
    chunks = re.search(r"got (\d+) chunks", text)
    assert chunks is not None and int(chunks.group(1)) >= 80
    assert nothing_is_running(idle_server)


def test_the_chunk_limit_is_a_setting(api_server: ApiServer) -> None:
    assert requests.get(f"{api_server.url}/sdapi/v1/options", timeout=TIMEOUT).json()["max_prompt_chunks"] == 32
    eighty_tokens = "a photo of a cat, " * 16
    try:
        assert post(api_server, "/sdapi/v1/options", {"max_prompt_chunks": 1}).status_code == 200
        refused = post(api_server, "/api/v1/jobs", {**TINY, "negative_prompt": eighty_tokens})
        assert refused.status_code == 422 and "negative_prompt: must be at most 1 chunks" in refused.text
        out_of_range = post(api_server, "/sdapi/v1/options", {"max_prompt_chunks": 0})
        assert out_of_range.status_code == 422 and "max_prompt_chunks: must be between 1 and 256" in out_of_range.text
    finally:
        assert post(api_server, "/sdapi/v1/options", {"max_prompt_chunks": 32}).status_code == 200
    accepted = post(api_server, "/api/v1/jobs", {**TINY, "negative_prompt": eighty_tokens})
    assert accepted.status_code == 202, accepted.text


@pytest.mark.parametrize(("body", "field", "limit"), [
    ({"styles": ["a style"] * 300}, "styles", "256 items"),
    ({"styles": ["s" * 2000]}, "styles", "1024 characters"),
    ({"sampler_name": "x" * 5000}, "sampler_name", "1024 characters"),
    ({"override_settings": {f"key{number}": 1 for number in range(300)}}, "override_settings", "256 items"),
    ({"alwayson_scripts": {f"script{number}": {"args": []} for number in range(100)}}, "alwayson_scripts", "64 items"),
    ({"script_args": list(range(1000))}, "script_args", "256 items"),
    ({"infotext": "x" * 100_000}, "infotext", "73728 characters"),
    ({"hr_prompt": HUGE_PROMPT}, "hr_prompt", "32768 characters"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_other_unbounded_txt2img_fields_are_bounded(api_server: ApiServer, body: dict[str, Any], field: str,
                                                    limit: str) -> None:
    reply = post(api_server, "/sdapi/v1/txt2img", {**TINY, **body})
    assert reply.status_code == 422, reply.text[:300]
    errors = reply.json()["detail"]
    assert errors[0]["loc"][:2] == ["body", field] and limit in errors[0]["msg"], errors[0]


def test_names_in_the_job_api_are_bounded(api_server: ApiServer) -> None:
    for field in ("checkpoint", "sampler", "scheduler"):
        reply = post(api_server, "/api/v1/jobs", {**TINY, field: "n" * 2000})
        assert reply.status_code == 422 and reply.json()["detail"][0]["loc"] == ["body", field], reply.text[:300]
