"""With logins, each user sees, interrupts, skips and cancels only their own jobs (the admin, first in --api-auth, all
of them); without a login everyone may. A real server over HTTP, two users' jobs on one queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.api.conftest import ApiServer, data_dir_with_models, start_server, stop_server

WAIT_SECONDS = 180.0
POLL_SECONDS = 0.05
# Long enough to act on while it runs; interrupted in every test, so it never runs to the end.
LONG_JOB = {"width": 64, "height": 64, "steps": 150, "sampler": "Euler", "seed": 77}
ROOT, ALICE, BOB = ("root", "pw0"), ("alice", "pw1"), ("bob", "pw2")


@pytest.fixture(scope="module")
def owners_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ApiServer]:
    data_dir = data_dir_with_models(tmp_path_factory.mktemp("owners-data"), tiny_model_dir)
    server = start_server(data_dir, ["--api-auth", "root:pw0,alice:pw1,bob:pw2"], data_dir / "server.log")
    yield server
    stop_server(server)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"timed out waiting for {what}")


def as_user(server: ApiServer, user: tuple[str, str], method: str, path: str, body: Any = None) -> requests.Response:
    return requests.request(method, f"{server.url}{path}", json=body, auth=user, timeout=60)


def start_long_job(server: ApiServer, user: tuple[str, str]) -> str:
    reply = as_user(server, user, "POST", "/api/v1/jobs", LONG_JOB)
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["job_id"]
    wait_until(lambda: (as_user(server, user, "GET", f"/api/v1/jobs/{job_id}").json().get("step") or 0) > 1,
               "the job to sample")
    return job_id


def job_of(server: ApiServer, user: tuple[str, str], job_id: str) -> dict[str, Any]:
    reply = as_user(server, user, "GET", f"/api/v1/jobs/{job_id}")
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_another_user_can_neither_see_nor_stop_a_running_job(owners_server: ApiServer) -> None:
    job_id = start_long_job(owners_server, ALICE)
    try:
        # A1111's progress shows bob nothing of alice's job: no id, no preview, no steps.
        bobs_view = as_user(owners_server, BOB, "GET", "/sdapi/v1/progress").json()
        assert bobs_view["current_task"] is None and bobs_view["current_image"] is None
        assert bobs_view["state"]["sampling_steps"] == 0 and bobs_view["progress"] == 0
        alices_view = as_user(owners_server, ALICE, "GET", "/sdapi/v1/progress").json()
        assert alices_view["current_task"] == job_id and alices_view["state"]["sampling_steps"] == 150

        # Bob's A1111 interrupt and skip (no body, as clients send them) act on his current job: he has none.
        for path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip"):
            reply = requests.post(f"{owners_server.url}{path}", auth=BOB, timeout=60)
            assert (reply.status_code, reply.json()) == (200, {})
        for method, path in (("GET", f"/api/v1/jobs/{job_id}"), ("GET", f"/api/v1/jobs/{job_id}/preview"),
                             ("DELETE", f"/api/v1/jobs/{job_id}")):
            reply = as_user(owners_server, BOB, method, path)
            assert reply.status_code == 404, (method, path, reply.text)
            assert job_id in reply.json()["detail"]  # worded as for an id that never existed

        step_then = job_of(owners_server, ALICE, job_id)["step"]
        wait_until(lambda: job_of(owners_server, ALICE, job_id)["step"] > step_then + 2, "the job to go on")
        assert job_of(owners_server, ALICE, job_id)["state"] == "running"
        # The admin (first in --api-auth) may look at everyone's jobs.
        assert job_of(owners_server, ROOT, job_id)["state"] == "running"
    finally:
        assert as_user(owners_server, ALICE, "POST", "/sdapi/v1/interrupt").status_code == 200
    wait_until(lambda: job_of(owners_server, ALICE, job_id)["state"] == "interrupted", "alice's interrupt")


def test_the_admin_may_stop_anyones_job(owners_server: ApiServer) -> None:
    job_id = start_long_job(owners_server, BOB)
    assert as_user(owners_server, ROOT, "GET", "/sdapi/v1/progress").json()["current_task"] == job_id
    reply = as_user(owners_server, ROOT, "DELETE", f"/api/v1/jobs/{job_id}")
    assert reply.status_code == 200 and reply.json()["state"] == "interrupted", reply.text


def test_a1111_interrupt_stops_the_callers_own_job_and_returns_the_picture_so_far(owners_server: ApiServer) -> None:
    result: dict[str, requests.Response] = {}

    def generate() -> None:
        result["reply"] = requests.post(f"{owners_server.url}/sdapi/v1/txt2img", auth=BOB, timeout=WAIT_SECONDS,
                                        json={**LONG_JOB, "sampler_name": "Euler", "prompt": "bob's"})

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    wait_until(lambda: as_user(owners_server, BOB, "GET", "/sdapi/v1/progress").json()["state"]["sampling_step"] > 1,
               "bob's job to sample")
    requests.post(f"{owners_server.url}/sdapi/v1/interrupt", auth=ALICE, timeout=60)
    assert as_user(owners_server, BOB, "GET", "/sdapi/v1/progress").json()["state"]["interrupted"] is False
    assert requests.post(f"{owners_server.url}/sdapi/v1/interrupt", auth=BOB, timeout=60).status_code == 200
    worker.join(WAIT_SECONDS)
    reply = result["reply"]
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["images"]) == 1
