"""The real, unchanged `webuiapi` client package (what many bots and scripts use) against our /sdapi/v1 server.
Must not import webui (the server is a separate process); only webuiapi, PIL and the test fixtures."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest
import webuiapi

from tests.api.conftest import ApiServer

POLL_SECONDS = 0.02
WAIT_SECONDS = 180.0


def client_for(server: ApiServer, username: str | None = None, password: str | None = None) -> webuiapi.WebUIApi:
    address = urlparse(server.url)
    return webuiapi.WebUIApi(
        host=address.hostname, port=address.port, sampler="Euler a", steps=3, username=username, password=password
    )


def infotext_fields(infotext: str) -> dict[str, str]:
    last_line = infotext.strip().split("\n")[-1]
    pairs = (part.split(": ", 1) for part in last_line.split(", "))
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


@pytest.fixture
def api(api_server: ApiServer) -> Iterator[webuiapi.WebUIApi]:
    client = client_for(api_server)
    selected = client.util_get_current_model()
    yield client
    # The server is shared with other tests: leave the model selected as it was.
    client.set_options({"sd_model_checkpoint": selected})


def test_list_models_switch_model_and_generate_with_override_settings(api: webuiapi.WebUIApi) -> None:
    names = api.util_get_model_names()
    assert len(names) == 2
    assert [name.split(" [")[0] for name in names] == ["tiny.safetensors", "tiny_b.safetensors"]
    assert "Euler a" in api.util_get_sampler_names()
    assert "karras" in api.util_get_scheduler_names()

    # util_set_model picks the closest title and posts it to /options, as users of the package do.
    api.util_set_model("tiny_b")
    assert api.util_get_current_model().startswith("tiny_b.safetensors")

    result = api.txt2img(
        prompt="a small boat", negative_prompt="rain", seed=777, width=64, height=64, batch_size=2,
        override_settings={"CLIP_stop_at_last_layers": 2},
    )
    assert len(result.images) == 2
    assert result.info["sd_model_name"] == "tiny_b" and result.info["clip_skip"] == 2
    assert result.info["all_seeds"] == [777, 778] and result.info["sampler_name"] == "Euler a"
    assert result.parameters["override_settings"] == {"CLIP_stop_at_last_layers": 2}
    for index, image in enumerate(result.images):
        assert image.size == (64, 64)
        infotext = image.info["parameters"]
        assert infotext == result.info["infotexts"][index]
        fields = infotext_fields(infotext)
        assert fields["Model"] == "tiny_b" and fields["Clip skip"] == "2" and fields["Seed"] == str(777 + index)
        assert fields["Sampler"] == "Euler a" and fields["Steps"] == "3"

    # The override was for that request only; the model chosen through options stays.
    plain = api.txt2img(prompt="a small boat", seed=777, width=64, height=64)
    plain_fields = infotext_fields(plain.image.info["parameters"])
    assert plain_fields["Model"] == "tiny_b" and "Clip skip" not in plain_fields

    api.set_options({"sd_model_checkpoint": "tiny"})
    assert api.get_options()["sd_model_checkpoint"].startswith("tiny.safetensors")
    back = api.txt2img(prompt="a small boat", seed=777, width=64, height=64)
    assert infotext_fields(back.image.info["parameters"])["Model"] == "tiny"


def test_png_info_of_a_result_image(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(prompt="a red kite", seed=55, width=64, height=64)
    info = api.png_info(result.image)
    assert info.info == result.image.info["parameters"]


def test_get_progress_during_a_job_and_interrupt(api: webuiapi.WebUIApi) -> None:
    assert api.get_progress()["progress"] == 0
    outcome: dict[str, object] = {}

    def generate() -> None:
        outcome["result"] = api.txt2img(prompt="a long walk", seed=99, width=64, height=64, steps=150)

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    deadline = time.monotonic() + WAIT_SECONDS
    progress: dict[str, object] = {}
    while time.monotonic() < deadline:
        progress = api.get_progress()
        if progress["progress"] > 0 and progress["state"]["sampling_step"] > 0:
            break
        time.sleep(POLL_SECONDS)
    assert progress["state"]["sampling_steps"] == 150 and progress["state"]["sampling_step"] < 150
    assert api.interrupt() == {}
    worker.join(WAIT_SECONDS)
    result = outcome["result"]
    assert isinstance(result, webuiapi.WebUIApiResult)
    # Interrupted within its only batch: the picture so far, as A1111 sends it, and its seed.
    assert len(result.images) == 1 and result.images[0].size == (64, 64) and result.info["all_seeds"] == [99]
    api.util_wait_for_ready(check_interval=0.1)


def test_client_with_basic_auth(authed_api_server: ApiServer) -> None:
    api = client_for(authed_api_server, username="bob", password="secret2")
    assert len(api.util_get_model_names()) == 2
    refused = client_for(authed_api_server, username="bob", password="wrong")
    with pytest.raises(RuntimeError, match="401"):
        refused.txt2img(prompt="x", width=64, height=64)
