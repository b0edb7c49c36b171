"""The native /api/v1 API over real HTTP against `python -m webui --nowebui`: jobs, previews, cancel, models, outputs.
Must not import webui (the server is a separate process); talks to it with urllib only."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.api.conftest import ApiServer

# The first job also imports torch and loads the tiny model, which takes a while on a 2-core machine.
JOB_TIMEOUT_SECONDS = 180.0
POLL_SECONDS = 0.05
FINISHED = {"done", "interrupted", "failed"}
# Fast on the tiny model; the infotext must carry exactly these.
TINY = {"width": 64, "height": 64, "steps": 2, "sampler": "Euler"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(server: ApiServer, method: str, path: str, body: object = None, raw: bytes | None = None,
         headers: Mapping[str, str] | None = None) -> Reply:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(server.url + path, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=JOB_TIMEOUT_SECONDS) as response:
            return Reply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, dict(error.headers), error.read())


def submit(server: ApiServer, **params: object) -> dict:
    reply = call(server, "POST", "/api/v1/jobs", {**TINY, **params})
    assert reply.status == 202, reply.body
    created = reply.json()
    assert isinstance(created, dict)
    return created


def job(server: ApiServer, job_id: str) -> dict:
    reply = call(server, "GET", f"/api/v1/jobs/{job_id}")
    assert reply.status == 200, reply.body
    status = reply.json()
    assert isinstance(status, dict)
    return status


def wait_until(server: ApiServer, job_id: str, done: object, timeout: float = JOB_TIMEOUT_SECONDS) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = job(server, job_id)
        if done(status):
            return status
        assert time.monotonic() < deadline, f"job {job_id} still {status['state']}: {status['message']}"
        time.sleep(POLL_SECONDS)


def wait_finished(server: ApiServer, job_id: str) -> dict:
    return wait_until(server, job_id, lambda status: status["state"] in FINISHED)


def png_parameters(data: bytes) -> str:
    assert data.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return str(image.info["parameters"])


def file_number(url: str) -> int:
    # Saved as "NNNNN-seed.png": the number grows with every image the server writes.
    return int(Path(urllib.parse.parse_qs(urllib.parse.urlparse(url).query)["path"][0]).name.split("-")[0])


def cancel_quietly(server: ApiServer, *job_ids: str) -> None:
    for job_id in job_ids:
        call(server, "DELETE", f"/api/v1/jobs/{job_id}")


# -- submit, poll, download ----------------------------------------------------------------------------------


def test_job_runs_to_done_and_its_images_download_with_infotext(api_server: ApiServer) -> None:
    prompt = "a red cube on a table, jobs-api-done"
    reply = call(api_server, "POST", "/api/v1/jobs", {**TINY, "prompt": prompt, "seed": 1234, "batch_size": 2})
    assert reply.status == 202, reply.body
    created = reply.json()
    assert isinstance(created, dict) and created["seed"] == 1234 and len(created["job_id"]) == 32
    assert reply.headers["location"] == f"/api/v1/jobs/{created['job_id']}"

    status = wait_finished(api_server, created["job_id"])
    assert status["state"] == "done", status
    assert status["kind"] == "txt2img"
    assert status["progress"] == 1.0
    assert status["error"] is None
    assert (status["step"], status["total_steps"]) == (2, 2)
    assert status["eta_seconds"] is None
    assert [image["seed"] for image in status["images"]] == [1234, 1235]
    for image in status["images"]:
        assert f"Seed: {image['seed']}" in image["infotext"]
        download = call(api_server, "GET", image["url"])
        assert download.status == 200
        assert download.headers["content-type"] == "image/png"
        parameters = png_parameters(download.body)
        assert parameters == image["infotext"]
        assert parameters.startswith(prompt + "\n")
        assert f"Seed: {image['seed']}," in parameters and "Steps: 2," in parameters and "Size: 64x64" in parameters
        with Image.open(io.BytesIO(download.body)) as decoded:
            assert decoded.size == (64, 64)


def test_random_seed_is_drawn_at_submit(api_server: ApiServer) -> None:
    # An empty checkpoint means "keep the loaded one", as null does.
    created = submit(api_server, seed=-1, prompt="jobs-api-random-seed", checkpoint="")
    assert 0 <= created["seed"] < 4294967294
    status = wait_finished(api_server, created["job_id"])
    assert status["state"] == "done"
    assert status["seed"] == created["seed"]
    assert [image["seed"] for image in status["images"]] == [created["seed"]]


def test_two_jobs_run_first_in_first_out(api_server: ApiServer) -> None:
    first = submit(api_server, prompt="jobs-api-fifo first", seed=11, steps=4)
    second = submit(api_server, prompt="jobs-api-fifo second", seed=22, steps=4)
    queued = job(api_server, second["job_id"])
    if queued["state"] == "queued":
        assert queued["ahead"] >= 1
        assert queued["message"].startswith("In queue")
    # The second job may only start once the first has finished.
    seen = wait_until(api_server, second["job_id"], lambda status: status["state"] != "queued")
    assert job(api_server, first["job_id"])["state"] in FINISHED, seen
    first_done, second_done = wait_finished(api_server, first["job_id"]), wait_finished(api_server, second["job_id"])
    assert first_done["state"] == second_done["state"] == "done"
    assert file_number(first_done["images"][0]["url"]) < file_number(second_done["images"][0]["url"])


def test_delete_stops_a_running_long_job_early(api_server: ApiServer) -> None:
    # 150 steps x 100 batches takes minutes here; the interrupt must end it within a step.
    created = submit(api_server, prompt="jobs-api-long", steps=150, batch_count=100, seed=7)
    job_id = created["job_id"]
    try:
        running = wait_until(
            api_server, job_id,
            lambda status: status["state"] in FINISHED or (status["state"] == "running" and status["preview_url"]),
        )
        assert running["state"] == "running", running
        assert 0.0 <= running["progress"] < 1.0
        assert running["total_steps"] == 150 and running["batch_count"] == 100
        assert running["step"] >= 1

        preview = call(api_server, "GET", running["preview_url"])
        assert preview.status == 200
        assert preview.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(preview.body)) as image:
            assert image.size[0] > 0

        started = time.monotonic()
        cancelled = call(api_server, "DELETE", f"/api/v1/jobs/{job_id}")
        assert cancelled.status == 200
        assert cancelled.json() == {"job_id": job_id, "state": "interrupted"}
        assert time.monotonic() - started < 5
    finally:
        cancel_quietly(api_server, job_id)

    stopped = job(api_server, job_id)
    assert stopped["state"] == "interrupted"
    assert stopped["message"] == "Interrupted"
    assert stopped["progress"] < 1.0
    assert len(stopped["images"]) < 100
    # Cancelling a finished job changes nothing and is no error.
    again = call(api_server, "DELETE", f"/api/v1/jobs/{job_id}")
    assert again.status == 200 and again.json() == {"job_id": job_id, "state": "interrupted"}


def test_delete_drops_a_queued_job(api_server: ApiServer) -> None:
    blocker = submit(api_server, prompt="jobs-api-blocker", steps=150, batch_count=100)
    waiting = submit(api_server, prompt="jobs-api-dropped")
    try:
        assert job(api_server, waiting["job_id"])["state"] == "queued"
        cancelled = call(api_server, "DELETE", f"/api/v1/jobs/{waiting['job_id']}")
        assert cancelled.status == 200
        assert cancelled.json() == {"job_id": waiting["job_id"], "state": "interrupted"}
        dropped = job(api_server, waiting["job_id"])
        assert dropped["state"] == "interrupted" and dropped["images"] == [] and dropped["step"] is None
    finally:
        cancel_quietly(api_server, waiting["job_id"], blocker["job_id"])
    assert wait_finished(api_server, blocker["job_id"])["state"] == "interrupted"


def test_a_job_that_fails_is_reported_as_failed_with_its_error(api_server: ApiServer) -> None:
    created = submit(api_server, checkpoint="no-such-model-jobs-api")
    status = wait_finished(api_server, created["job_id"])
    assert status["state"] == "failed"
    assert "no-such-model-jobs-api" in status["error"]
    assert status["message"] == status["error"]
    assert status["images"] == []


# -- 404s and validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v1/jobs/0123456789abcdef0123456789abcdef"),
    ("GET", "/api/v1/jobs/no-such-job/preview"),
    ("DELETE", "/api/v1/jobs/no-such-job"),
    ("GET", "/api/v1/jobs/%ED%A0%80"),
])
def test_unknown_jobs_are_404(api_server: ApiServer, method: str, path: str) -> None:
    reply = call(api_server, method, path)
    assert reply.status == 404
    assert "not found" in reply.json()["detail"]


def test_preview_is_404_for_a_job_without_one(api_server: ApiServer) -> None:
    # Previews come every 10 steps by default; a 2-step job never has one.
    created = submit(api_server, prompt="jobs-api-no-preview")
    status = wait_finished(api_server, created["job_id"])
    assert status["preview_url"] is None
    reply = call(api_server, "GET", f"/api/v1/jobs/{created['job_id']}/preview")
    assert reply.status == 404 and "no preview" in reply.json()["detail"]


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"steps": 0}, "steps", "greater than or equal to 1"),
    ({"steps": 151}, "steps", "less than or equal to 150"),
    ({"width": 65}, "width", "multiple of 8"),
    ({"height": 4096}, "height", "less than or equal to 2048"),
    ({"cfg_scale": 31}, "cfg_scale", "less than or equal to 30"),
    ({"seed": -2}, "seed", "greater than or equal to -1"),
    ({"batch_size": 9}, "batch_size", "less than or equal to 8"),
    ({"steps": "20"}, "steps", "valid integer"),
    ({"steps": 2.5}, "steps", "valid integer"),
    ({"steps": True}, "steps", "valid integer"),
    ({"prompt": 5}, "prompt", "valid string"),
    ({"rng_source": "TPU"}, "rng_source", "'GPU', 'CPU' or 'NV'"),
    ({"sampler": "No Such Sampler"}, "sampler", "unknown sampler"),
    ({"scheduler": "No Such Schedule"}, "scheduler", "No Such Schedule"),
    ({"colour": "blue"}, "colour", "Extra inputs are not permitted"),
    ({"prompt": "\ud800"}, "prompt", "lone surrogates"),
])
def test_bad_parameters_are_422_naming_the_field_and_limit(
    api_server: ApiServer, body: dict, field: str, words: str,
) -> None:
    reply = call(api_server, "POST", "/api/v1/jobs", {**TINY, **body})
    assert reply.status == 422, reply.body
    errors = reply.json()["detail"]
    assert [error["loc"] for error in errors] == [["body", field]]
    assert words in errors[0]["msg"]


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"cfg_scale": NaN}', 422),
    (b'{"seed": Infinity}', 422),
    (b'{"steps": 1e400}', 422),
    (b"{not json", 422),
    (b"[]", 422),
    # Not even text: FastAPI answers 400 before JSON parsing starts.
    (b"\xff\xfe{", 400),
])
def test_malformed_bodies_are_4xx_never_500(api_server: ApiServer, raw: bytes, expected: int) -> None:
    reply = call(api_server, "POST", "/api/v1/jobs", raw=raw)
    assert reply.status == expected, reply.body
    assert reply.json()["detail"]


# -- outputs -------------------------------------------------------------------------------------------------


def finished_image_path(server: ApiServer, prompt: str) -> str:
    status = wait_finished(server, submit(server, prompt=prompt)["job_id"])
    assert status["state"] == "done"
    return urllib.parse.parse_qs(urllib.parse.urlparse(status["images"][0]["url"]).query)["path"][0]


@pytest.mark.parametrize("query", [
    "path=../../etc/passwd",
    "path=/etc/passwd",
    "path=..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "path=%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "path=%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "path=..%5C..%5Cetc%5Cpasswd",
    "path=C:%5CWindows%5Cwin.ini",
    "path=txt2img-images/../../../etc/passwd",
    "path=....//....//etc/passwd",
    "path=%00",
    "path=.",
    "path=" + "a" * 300 + ".png",
    "path=server.log",
    "path=cache/browser-state-secret",
])
def test_output_files_never_leave_the_outputs_folder(api_server: ApiServer, query: str) -> None:
    reply = call(api_server, "GET", f"/api/v1/outputs/file?{query}")
    assert reply.status in (400, 404), reply.body
    assert b"root:" not in reply.body
    assert reply.headers["content-type"] == "application/json"


def test_images_next_to_the_outputs_folder_are_not_reachable(api_server: ApiServer) -> None:
    # A real image outside the folder: only the containment check, not the image-suffix rule, can refuse it.
    outside = api_server.data_dir / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    try:
        for path in ("../outside.png", "txt2img-images/../../outside.png", str(outside), "..%2Foutside.png",
                     "%2E%2E/outside.png", "..\\outside.png"):
            reply = call(api_server, "GET", f"/api/v1/outputs/file?path={path}")
            assert reply.status in (400, 404), (path, reply.status)
            assert not reply.body.startswith(PNG_MAGIC)
    finally:
        outside.unlink()


def test_output_files_do_not_follow_links_out(api_server: ApiServer, tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    outputs = api_server.data_dir / "outputs"
    (outputs / "link-out.png").symlink_to(outside)
    (outputs / "dir-out").symlink_to(tmp_path, target_is_directory=True)
    (outputs / "notes.txt").write_text("not an image")
    try:
        for path in ("link-out.png", "dir-out/secret.png", "notes.txt", "missing.png"):
            reply = call(api_server, "GET", f"/api/v1/outputs/file?path={path}")
            assert reply.status == 404, (path, reply.body)
    finally:
        for name in ("link-out.png", "dir-out", "notes.txt"):
            (outputs / name).unlink()


def test_an_output_file_inside_the_folder_is_served(api_server: ApiServer) -> None:
    relative = finished_image_path(api_server, "jobs-api-serve")
    reply = call(api_server, "GET", f"/api/v1/outputs/file?path={urllib.parse.quote(relative)}")
    assert reply.status == 200
    assert reply.headers["content-type"] == "image/png"
    assert png_parameters(reply.body).startswith("jobs-api-serve\n")
    assert (api_server.data_dir / "outputs" / relative).read_bytes() == reply.body


def test_outputs_gallery_pages_and_filters(api_server: ApiServer) -> None:
    prompt = "jobs-api-gallery unique words"
    finished_image_path(api_server, prompt)
    finished_image_path(api_server, prompt)
    reply = call(api_server, "GET", "/api/v1/outputs?search=GALLERY%20UNIQUE&page_size=1")
    assert reply.status == 200
    page = reply.json()
    assert isinstance(page, dict)
    assert (page["page"], page["total"], page["page_count"]) == (0, 2, 2)
    entry = page["images"][0]
    assert entry["prompt"] == prompt and entry["model"] and len(entry["day"]) == 10
    assert entry["infotext"].startswith(prompt + "\n")
    assert png_parameters(call(api_server, "GET", entry["url"]).body) == entry["infotext"]

    def total(query: str) -> int:
        return call(api_server, "GET", f"/api/v1/outputs?search=gallery%20unique&{query}").json()["total"]

    second = call(api_server, "GET", "/api/v1/outputs?search=gallery%20unique&page_size=1&page=1").json()
    assert second["page"] == 1 and second["images"][0]["url"] != entry["url"]
    # Past the end clamps to the last page, as the UI's gallery does.
    assert call(api_server, "GET", "/api/v1/outputs?search=gallery%20unique&page_size=1&page=99").json()["page"] == 1
    assert total(f"day={entry['day']}") == 2
    assert total("day=1999-01-01") == 0
    assert total(f"model={entry['model']}") == 2
    assert total("model=nope") == 0
    for bad in ("page_size=0", "page_size=201", "page=-1", "page=x"):
        assert call(api_server, "GET", f"/api/v1/outputs?{bad}").status == 422, bad


# -- models --------------------------------------------------------------------------------------------------


def test_models_are_listed_and_loaded_by_name_stem_or_hash(api_server: ApiServer) -> None:
    listed = call(api_server, "GET", "/api/v1/models")
    assert listed.status == 200
    models = {model["name"]: model for model in listed.json()}
    assert set(models) == {"tiny.safetensors", "tiny_b.safetensors"}
    assert models["tiny_b.safetensors"]["stem"] == "tiny_b"

    try:
        loaded = call(api_server, "POST", "/api/v1/models/load", {"checkpoint": "tiny_b"})
        assert loaded.status == 200, loaded.body
        result = loaded.json()
        assert isinstance(result, dict)
        assert result["loaded"] == "tiny_b.safetensors" and result["state"] == "done"
        short_hash = result["hash"]
        assert len(short_hash) == 10 and int(short_hash, 16) >= 0

        after = {model["name"]: model for model in call(api_server, "GET", "/api/v1/models").json()}
        assert after["tiny_b.safetensors"]["loaded"] is True
        assert after["tiny.safetensors"]["loaded"] is False
        assert after["tiny_b.safetensors"]["sha256"].startswith(short_hash)
        assert after["tiny_b.safetensors"]["title"] == f"tiny_b.safetensors [{short_hash}]"

        # A job without a checkpoint keeps the loaded one.
        status = wait_finished(api_server, submit(api_server, prompt="jobs-api-model-b")["job_id"])
        assert "Model: tiny_b," in status["images"][0]["infotext"]

        by_hash = call(api_server, "POST", "/api/v1/models/load", {"checkpoint": short_hash})
        assert by_hash.status == 200 and by_hash.json()["loaded"] == "tiny_b.safetensors"
    finally:
        back = call(api_server, "POST", "/api/v1/models/load", {"checkpoint": "tiny.safetensors"})
    assert back.status == 200 and back.json()["loaded"] == "tiny.safetensors"


@pytest.mark.parametrize("name", ["no-such-model", "../tiny.safetensors", "/etc/passwd", "0123456789", "deadbeef"])
def test_loading_an_unknown_checkpoint_is_404_naming_it(api_server: ApiServer, name: str) -> None:
    reply = call(api_server, "POST", "/api/v1/models/load", {"checkpoint": name})
    assert reply.status == 404, reply.body
    assert repr(name) in reply.json()["detail"]


@pytest.mark.parametrize("body", [{}, {"checkpoint": ""}, {"checkpoint": 3}, {"checkpoint": "tiny", "force": True}])
def test_bad_load_requests_are_422(api_server: ApiServer, body: dict) -> None:
    assert call(api_server, "POST", "/api/v1/models/load", body).status == 422


# -- schema, docs, auth --------------------------------------------------------------------------------------


def test_openapi_declares_the_limits_and_docs_are_served(api_server: ApiServer) -> None:
    schema = call(api_server, "GET", "/openapi.json").json()
    assert isinstance(schema, dict)
    paths = schema["paths"]
    for path in ("/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/preview", "/api/v1/models",
                 "/api/v1/models/load", "/api/v1/outputs", "/api/v1/outputs/file"):
        assert path in paths, path
    assert set(paths["/api/v1/jobs/{job_id}"]) == {"get", "delete"}
    body = schema["components"]["schemas"]["JobCreateRequest"]
    assert body["additionalProperties"] is False
    # The body is GenerationParams, field for field.
    assert set(body["properties"]) == {
        "prompt", "negative_prompt", "checkpoint", "sampler", "scheduler", "steps", "cfg_scale", "seed", "width",
        "height", "clip_skip", "batch_size", "batch_count", "rng_source", "emphasis", "output_format",
    }
    steps, width = body["properties"]["steps"], body["properties"]["width"]
    assert (steps["minimum"], steps["maximum"], steps["default"]) == (1, 150, 20)
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (64, 2048, 8)
    docs = call(api_server, "GET", "/docs")
    assert docs.status == 200 and b"swagger" in docs.body.lower()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v1/models"),
    ("GET", "/api/v1/outputs"),
    ("GET", "/api/v1/outputs/file?path=x.png"),
    ("GET", "/api/v1/jobs/x"),
    ("DELETE", "/api/v1/jobs/x"),
    ("POST", "/api/v1/jobs"),
])
def test_auth_server_refuses_requests_without_valid_credentials(
    authed_api_server: ApiServer, method: str, path: str,
) -> None:
    body = TINY if method == "POST" else None
    for headers in ({}, basic("alice", "wrong"), basic("mallory", "secret1"), {"Authorization": "Basic !!!"}):
        reply = call(authed_api_server, method, path, body, headers=headers)
        assert reply.status == 401, (headers, reply.body)
        assert reply.headers["www-authenticate"] == "Basic"


def test_auth_server_accepts_each_user(authed_api_server: ApiServer) -> None:
    assert call(authed_api_server, "GET", "/api/v1/models", headers=basic("alice", "secret1")).status == 200
    reply = call(authed_api_server, "POST", "/api/v1/jobs", {**TINY, "prompt": "jobs-api-bob"},
                 headers=basic("bob", "secret2"))
    assert reply.status == 202, reply.body
    job_id = reply.json()["job_id"]
    status = call(authed_api_server, "GET", f"/api/v1/jobs/{job_id}", headers=basic("bob", "secret2"))
    assert status.status == 200 and status.json()["job_id"] == job_id
    cancel = call(authed_api_server, "DELETE", f"/api/v1/jobs/{job_id}", headers=basic("alice", "secret1"))
    assert cancel.status == 200
