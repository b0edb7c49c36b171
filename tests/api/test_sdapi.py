"""A1111's /sdapi/v1 over real HTTP against `python -m webui --nowebui`: txt2img, options, progress, lists, auth.
Must not import webui (the server is a separate process); talks to it with requests and reads images with PIL."""

from __future__ import annotations

import base64
import datetime
import io
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import piexif
import piexif.helper
import pytest
import requests
from PIL import Image

from tests.api.conftest import ApiServer

# The first job also imports torch and loads the tiny model, which takes a while on a 2-core machine.
REQUEST_TIMEOUT_SECONDS = 180.0
POLL_SECONDS = 0.02
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Fast on the tiny model.
SMALL: dict[str, Any] = {"prompt": "a red apple on a table", "width": 64, "height": 64, "steps": 3}
A1111_INFO_KEYS = {
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
    "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
    "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
    "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning",
    "version",
}


# -- helpers -------------------------------------------------------------------------------------------------


def get(server: ApiServer, path: str, **kwargs: Any) -> requests.Response:
    return requests.get(f"{server.url}/sdapi/v1{path}", timeout=REQUEST_TIMEOUT_SECONDS, **kwargs)


def post(server: ApiServer, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
    return requests.post(f"{server.url}/sdapi/v1{path}", json=body, timeout=REQUEST_TIMEOUT_SECONDS, **kwargs)


def txt2img(server: ApiServer, **fields: Any) -> dict[str, Any]:
    response = post(server, "/txt2img", {**SMALL, **fields})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "parameters", "info"}
    assert isinstance(body["info"], str), "A1111 sends info as a JSON string"
    return body


def decode_image(encoded: str) -> Image.Image:
    assert not encoded.startswith("data:"), "A1111 sends plain base64 without a data: prefix"
    data = base64.b64decode(encoded, validate=True)
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def decode_png(encoded: str) -> tuple[Image.Image, str]:
    """The image and the infotext embedded in it, as a client reads them."""
    assert base64.b64decode(encoded)[:8] == PNG_MAGIC
    image = decode_image(encoded)
    infotext = image.info.get("parameters")
    assert isinstance(infotext, str) and infotext, "the PNG must carry the infotext"
    return image, infotext


def infotext_fields(infotext: str) -> dict[str, str]:
    """The "Key: value" pairs of an infotext's last line (values here never contain commas)."""
    last_line = infotext.strip().split("\n")[-1]
    pairs = (part.split(": ", 1) for part in last_line.split(", "))
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def image_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.suffix in (".png", ".jpg", ".webp"))


def titles_by_stem(server: ApiServer) -> dict[str, str]:
    models = get(server, "/sd-models").json()
    return {model["model_name"]: model["title"] for model in models}


def wait_for_progress(server: ApiServer, until: Any, timeout: float = REQUEST_TIMEOUT_SECONDS) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = get(server, "/progress").json()
        if until(body):
            return body
        time.sleep(POLL_SECONDS)
    raise AssertionError("the expected progress never showed")


class Background:
    """A txt2img request running in a thread, as a second client would send it."""

    def __init__(self, server: ApiServer, body: dict[str, Any]) -> None:
        self.response: requests.Response | None = None
        self._thread = threading.Thread(target=self._run, args=(server, body), daemon=True)
        self._thread.start()

    def _run(self, server: ApiServer, body: dict[str, Any]) -> None:
        self.response = post(server, "/txt2img", body)

    def result(self) -> requests.Response:
        self._thread.join(REQUEST_TIMEOUT_SECONDS)
        assert self.response is not None, "the request did not come back"
        return self.response


@pytest.fixture
def restore_options(api_server: ApiServer) -> Iterator[None]:
    """Tests that change options share the server with others: put the values back afterwards."""
    before = get(api_server, "/options").json()
    yield
    keys = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "samples_format", "show_progress_every_n_steps")
    post(api_server, "/options", {key: before[key] for key in keys})


# -- txt2img -------------------------------------------------------------------------------------------------


def test_batch_of_two_returns_two_pngs_whose_infotext_matches_the_info(api_server: ApiServer) -> None:
    body = txt2img(api_server, batch_size=2, seed=1234, sampler_name="Euler a", negative_prompt="blurry")
    info = json.loads(body["info"])
    assert A1111_INFO_KEYS <= set(info)
    assert len(body["images"]) == 2
    embedded = []
    for index, encoded in enumerate(body["images"]):
        image, infotext = decode_png(encoded)
        assert image.size == (64, 64) and image.mode == "RGB"
        # A real picture, not a blank: the tiny model still makes varied pixels.
        low, high = image.convert("L").getextrema()
        assert high - low > 10
        fields = infotext_fields(infotext)
        assert infotext.startswith("a red apple on a table\nNegative prompt: blurry\n")
        assert fields["Seed"] == str(1234 + index)
        assert fields["Steps"] == "3" and fields["Sampler"] == "Euler a" and fields["Size"] == "64x64"
        assert fields["Model"] == "tiny" and "Clip skip" not in fields
        embedded.append(infotext)
    assert decode_image(body["images"][0]).tobytes() != decode_image(body["images"][1]).tobytes()
    assert info["infotexts"] == embedded
    assert info["seed"] == 1234 and info["all_seeds"] == [1234, 1235]
    assert info["all_prompts"] == ["a red apple on a table"] * 2
    assert info["all_negative_prompts"] == ["blurry"] * 2
    assert info["sampler_name"] == "Euler a" and info["steps"] == 3 and info["batch_size"] == 2
    assert (info["width"], info["height"], info["cfg_scale"], info["clip_skip"]) == (64, 64, 7.0, 1)
    assert info["sd_model_name"] == "tiny"
    assert info["sd_model_hash"] == infotext_fields(embedded[0])["Model hash"]
    assert info["index_of_first_image"] == 0 and info["styles"] == []
    datetime.datetime.strptime(info["job_timestamp"], "%Y%m%d%H%M%S")
    assert body["parameters"]["batch_size"] == 2 and body["parameters"]["seed"] == 1234


def test_api_defaults_are_a1111s_and_nothing_is_saved(api_server: ApiServer) -> None:
    outputs = api_server.data_dir / "outputs"
    before = image_files(outputs)
    seed = 918273645
    # Only size and seed given: A1111's API defaults are 50 steps, sampler Euler (sampler_index), CFG 7.
    body = txt2img(api_server, prompt="a lighthouse", steps=None, seed=seed, unknown_future_field={"x": 1})
    _, infotext = decode_png(body["images"][0])
    fields = infotext_fields(infotext)
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"], fields["Seed"]) == ("50", "Euler", "7", str(seed))
    parameters = body["parameters"]
    assert parameters["steps"] == 50 and parameters["sampler_index"] == "Euler" and parameters["sampler_name"] is None
    assert parameters["save_images"] is False and parameters["send_images"] is True
    assert parameters["override_settings_restore_afterwards"] is True and parameters["denoising_strength"] is None
    assert "unknown_future_field" not in parameters
    # save_images defaults to false: nothing in the outputs folder, and no scratch copy left behind either.
    assert image_files(outputs) == before
    scratch = list(Path(tempfile.gettempdir()).glob(f"webui-unsaved-*/**/*-{seed}.*"))
    assert scratch == []


def test_save_images_true_keeps_the_file_and_send_images_false_sends_none(api_server: ApiServer) -> None:
    outputs = api_server.data_dir / "outputs"
    before = set(image_files(outputs))
    body = txt2img(api_server, seed=5150, save_images=True, send_images=False)
    assert body["images"] == []
    new_files = sorted(set(image_files(outputs)) - before)
    assert len(new_files) == 1 and new_files[0].name.endswith("-5150.png")
    with Image.open(new_files[0]) as saved:
        assert saved.info["parameters"] == json.loads(body["info"])["infotexts"][0]


def test_override_settings_apply_to_that_request_only(api_server: ApiServer) -> None:
    overrides = {"sd_model_checkpoint": "tiny_b", "CLIP_stop_at_last_layers": 2}
    body = txt2img(api_server, seed=42, override_settings=overrides)
    info = json.loads(body["info"])
    _, infotext = decode_png(body["images"][0])
    fields = infotext_fields(infotext)
    assert info["sd_model_name"] == "tiny_b" and info["clip_skip"] == 2
    assert fields["Model"] == "tiny_b" and fields["Clip skip"] == "2"

    plain = txt2img(api_server, seed=42)
    _, plain_infotext = decode_png(plain["images"][0])
    plain_fields = infotext_fields(plain_infotext)
    assert plain_fields["Model"] == "tiny" and "Clip skip" not in plain_fields
    assert json.loads(plain["info"])["sd_model_name"] == "tiny"
    # The other model really made a different picture from the same seed.
    assert decode_image(body["images"][0]).tobytes() != decode_image(plain["images"][0]).tobytes()

    # A1111's title "name [hash]" and the file name select the model too.
    title = titles_by_stem(api_server)["tiny_b"]
    for spelling in (title, "tiny_b.safetensors"):
        again = txt2img(api_server, seed=42, override_settings={"sd_model_checkpoint": spelling})
        assert infotext_fields(decode_png(again["images"][0])[1])["Model"] == "tiny_b"


def test_two_clients_asking_for_different_checkpoints_each_get_their_own(api_server: ApiServer) -> None:
    wanted = ["tiny_b", "tiny", "tiny_b", "tiny"]
    clients = [
        Background(api_server, {**SMALL, "seed": 600 + index, "override_settings": {"sd_model_checkpoint": name}})
        for index, name in enumerate(wanted)
    ]
    for index, (client, name) in enumerate(zip(clients, wanted, strict=True)):
        response = client.result()
        assert response.status_code == 200, response.text
        body = response.json()
        fields = infotext_fields(decode_png(body["images"][0])[1])
        assert fields["Model"] == name and fields["Seed"] == str(600 + index)
        assert json.loads(body["info"])["sd_model_name"] == name


def test_infotext_fills_the_fields_the_request_leaves_unset(api_server: ApiServer) -> None:
    pasted = (
        "a blue bird\nNegative prompt: ugly\n"
        "Steps: 40, Sampler: Euler a, CFG scale: 5, Seed: 77, Size: 64x64, Model: tiny_b, Clip skip: 2"
    )
    body = txt2img(api_server, prompt=None, infotext=pasted, steps=2, width=None, height=None)
    fields = infotext_fields(decode_png(body["images"][0])[1])
    # steps was sent explicitly, so it wins over the infotext's 40.
    assert fields["Steps"] == "2"
    assert (fields["Sampler"], fields["CFG scale"], fields["Seed"], fields["Size"]) == ("Euler a", "5", "77", "64x64")
    assert fields["Model"] == "tiny_b" and fields["Clip skip"] == "2"
    assert body["parameters"]["prompt"] == "a blue bird" and body["parameters"]["negative_prompt"] == "ugly"


def test_samples_format_override_returns_a_jpeg_with_the_infotext_in_exif(api_server: ApiServer) -> None:
    body = txt2img(api_server, seed=31, override_settings={"samples_format": "jpg"})
    image = decode_image(body["images"][0])
    assert image.format == "JPEG"
    comment = piexif.load(image.info["exif"])["Exif"][piexif.ExifIFD.UserComment]
    assert piexif.helper.UserComment.load(comment) == json.loads(body["info"])["infotexts"][0]


@pytest.mark.parametrize(
    ("changes", "status", "names"),
    [
        ({"steps": 0}, 422, "steps"),
        ({"steps": 151}, 422, "steps"),
        ({"steps": "many"}, 422, "steps"),
        ({"cfg_scale": 31}, 422, "cfg_scale"),
        ({"width": 70}, 422, "width"),
        ({"width": 4096}, 422, "width"),
        ({"height": "tall"}, 422, "height"),
        ({"seed": 2**40}, 422, "seed"),
        ({"batch_size": 9}, 422, "batch_size"),
        ({"n_iter": 0}, 422, "n_iter"),
        ({"sampler_name": "Nonexistent sampler"}, 400, "sampler_name"),
        ({"scheduler": "zigzag"}, 400, "scheduler"),
        ({"override_settings": {"sd_model_checkpoint": "no_such_model"}}, 404, "sd_model_checkpoint"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 13}}, 422, "CLIP_stop_at_last_layers"),
        ({"override_settings": {"CLIP_stop_at_last_layers": "two"}}, 422, "CLIP_stop_at_last_layers"),
        ({"override_settings": {"samples_format": "gif"}}, 422, "samples_format"),
        ({"enable_hr": True}, 422, "enable_hr"),
        ({"script_name": "x/y/z plot"}, 422, "script_name"),
        ({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, 422, "alwayson_scripts"),
        ({"infotext": "x\nSteps: lots, Sampler: Euler, Size: 64x64"}, 422, "infotext"),
        ({"override_settings": "not an object"}, 422, "override_settings"),
    ],
)
def test_bad_txt2img_input_is_a_4xx_naming_the_field(
    api_server: ApiServer, changes: dict[str, Any], status: int, names: str
) -> None:
    response = post(api_server, "/txt2img", {**SMALL, **changes})
    assert response.status_code == status, response.text
    assert names in response.text
    assert "detail" in response.json()


@pytest.mark.parametrize(
    "raw", [b"not json", b"[1, 2, 3]", b'{"cfg_scale": NaN}', b'{"steps": 1e400}', b""], ids=repr
)
def test_malformed_bodies_are_422_and_the_server_keeps_working(api_server: ApiServer, raw: bytes) -> None:
    response = requests.post(
        f"{api_server.url}/sdapi/v1/txt2img", data=raw, headers={"Content-Type": "application/json"},
        timeout=REQUEST_TIMEOUT_SECONDS,
    )
    assert response.status_code == 422, response.text
    assert "detail" in response.json()
    assert get(api_server, "/progress").status_code == 200


def test_nulls_from_clients_mean_the_defaults(api_server: ApiServer) -> None:
    body = txt2img(
        api_server, seed=8, sampler_name=None, scheduler=None, n_iter=None, batch_size=None, cfg_scale=None,
        hr_checkpoint_name=None, styles=None, override_settings=None, script_args=None, alwayson_scripts=None,
    )
    fields = infotext_fields(decode_png(body["images"][0])[1])
    assert fields["Sampler"] == "Euler" and fields["CFG scale"] == "7"


# -- progress, interrupt, skip -------------------------------------------------------------------------------


def test_progress_is_zero_when_idle_and_interrupt_skip_accept_no_body(api_server: ApiServer) -> None:
    idle = get(api_server, "/progress", params={"skip_current_image": "false"}).json()
    assert idle["progress"] == 0 and idle["eta_relative"] == 0 and idle["current_image"] is None
    assert idle["state"]["job_count"] == 0 and idle["state"]["interrupted"] is False
    assert set(idle["state"]) == {
        "skipped", "interrupted", "stopping_generation", "job", "job_count", "job_timestamp", "job_no",
        "sampling_step", "sampling_steps",
    }
    for path in ("/interrupt", "/skip"):
        no_body = requests.post(f"{api_server.url}/sdapi/v1{path}", timeout=REQUEST_TIMEOUT_SECONDS)
        empty_json = post(api_server, path, {})
        assert (no_body.status_code, no_body.json()) == (200, {})
        assert (empty_json.status_code, empty_json.json()) == (200, {})


def test_progress_during_a_job_then_interrupt_ends_it_early(api_server: ApiServer) -> None:
    job = Background(api_server, {**SMALL, "steps": 150, "seed": 2024})
    # Wait for sampling and a live preview (every 10 steps by default), long before step 150.
    running = wait_for_progress(
        api_server, lambda body: body["state"]["sampling_step"] > 0 and body["current_image"] is not None
    )
    state = running["state"]
    assert 0 < running["progress"] < 1 and running["eta_relative"] >= 0
    assert state["sampling_steps"] == 150 and state["sampling_step"] < 150
    assert state["job_count"] == 1 and state["job_no"] == 0 and state["job"] == "scripts_txt2img"
    datetime.datetime.strptime(state["job_timestamp"], "%Y%m%d%H%M%S")
    assert isinstance(running["textinfo"], str) and running["current_task"]
    preview = decode_image(running["current_image"])
    # The live preview of a 64x64 job, at the image's size.
    assert preview.format == "PNG" and preview.size == (64, 64)
    without_image = get(api_server, "/progress", params={"skip_current_image": "true"}).json()
    assert without_image["current_image"] is None

    assert post(api_server, "/interrupt").json() == {}
    response = job.result()
    assert response.status_code == 200, response.text
    body = response.json()
    # Stopped inside its only batch: A1111 sends the picture decoded from the latent so far.
    assert len(body["images"]) == 1
    image, infotext = decode_png(body["images"][0])
    assert image.size == (64, 64) and infotext_fields(infotext)["Seed"] == "2024"
    assert json.loads(body["info"])["all_seeds"] == [2024]
    assert get(api_server, "/progress").json()["state"]["job_count"] == 0


def test_skip_abandons_the_current_batch_only(api_server: ApiServer) -> None:
    job = Background(api_server, {**SMALL, "steps": 120, "n_iter": 2, "seed": 3000})
    wait_for_progress(api_server, lambda body: body["state"]["sampling_step"] > 0 and body["state"]["job_no"] == 0)
    assert post(api_server, "/skip").json() == {}
    response = job.result()
    assert response.status_code == 200, response.text
    body = response.json()
    # As A1111: the skipped batch ends with its picture so far, and the next batch runs.
    assert [infotext_fields(decode_png(image)[1])["Seed"] for image in body["images"]] == ["3000", "3001"]


# -- options -------------------------------------------------------------------------------------------------


def test_options_round_trip_changes_nothing(api_server: ApiServer) -> None:
    options = get(api_server, "/options").json()
    titles = titles_by_stem(api_server)
    assert options["sd_model_checkpoint"] == titles["tiny"]
    assert options["sd_vae"] == "Automatic" and options["CLIP_stop_at_last_layers"] == 1
    assert options["samples_format"] == "png" and options["samples_filename_pattern"] == "[seed]"
    assert {"outdir_samples", "show_progress_every_n_steps"} <= set(options)
    response = post(api_server, "/options", options)
    assert response.status_code == 200, response.text
    assert get(api_server, "/options").json() == options


def test_options_change_clip_skip_and_model_for_plain_requests(api_server: ApiServer, restore_options: None) -> None:
    titles = titles_by_stem(api_server)
    assert post(api_server, "/options", {"CLIP_stop_at_last_layers": 2}).status_code == 200
    assert get(api_server, "/options").json()["CLIP_stop_at_last_layers"] == 2
    fields = infotext_fields(decode_png(txt2img(api_server, seed=9)["images"][0])[1])
    assert fields["Clip skip"] == "2" and fields["Model"] == "tiny"

    response = post(api_server, "/options", {"sd_model_checkpoint": titles["tiny_b"]})
    assert response.status_code == 200, response.text
    assert get(api_server, "/options").json()["sd_model_checkpoint"] == titles["tiny_b"]
    assert infotext_fields(decode_png(txt2img(api_server, seed=9)["images"][0])[1])["Model"] == "tiny_b"


@pytest.mark.parametrize(
    ("change", "status", "names"),
    [
        ({"sd_model_checkpoint": "no_such_model.safetensors"}, 404, "no_such_model"),
        ({"sd_model_checkpoint": 12}, 422, "sd_model_checkpoint"),
        ({"samples_format": "gif"}, 422, "samples_format"),
        ({"samples_filename_pattern": "../escape/[seed]"}, 422, "samples_filename_pattern"),
        ({"CLIP_stop_at_last_layers": "deep"}, 422, "CLIP_stop_at_last_layers"),
        ({"CLIP_stop_at_last_layers": 40}, 422, "CLIP_stop_at_last_layers"),
        ({"show_progress_every_n_steps": 1000}, 422, "show_progress_every_n_steps"),
    ],
)
def test_bad_options_are_refused_and_change_nothing(
    api_server: ApiServer, change: dict[str, Any], status: int, names: str
) -> None:
    before = get(api_server, "/options").json()
    response = post(api_server, "/options", change)
    assert response.status_code == status, response.text
    assert names in response.text
    assert get(api_server, "/options").json() == before


def test_options_do_not_move_the_outputs_folder(api_server: ApiServer) -> None:
    before = get(api_server, "/options").json()
    assert post(api_server, "/options", {"outdir_samples": "/tmp/elsewhere"}).status_code == 200
    assert get(api_server, "/options").json()["outdir_samples"] == before["outdir_samples"]


# -- checkpoints and lists -----------------------------------------------------------------------------------


def test_sd_models_lists_both_checkpoints_the_a1111_way(api_server: ApiServer) -> None:
    models = {model["model_name"]: model for model in get(api_server, "/sd-models").json()}
    assert set(models) == {"tiny", "tiny_b"}
    for name, model in models.items():
        assert set(model) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert model["filename"].endswith(f"{name}.safetensors")
        assert Path(model["filename"]).is_file()
        if model["sha256"] is not None:
            assert model["hash"] == model["sha256"][:10]
            assert model["title"] == f"{name}.safetensors [{model['hash']}]"
        else:
            assert model["title"] == f"{name}.safetensors"


def test_unload_reload_and_refresh_checkpoints(api_server: ApiServer) -> None:
    assert post(api_server, "/refresh-checkpoints").status_code == 200
    unloaded = post(api_server, "/unload-checkpoint")
    assert (unloaded.status_code, unloaded.json()) == (200, {})
    reloaded = post(api_server, "/reload-checkpoint")
    assert (reloaded.status_code, reloaded.json()) == (200, {})
    assert infotext_fields(decode_png(txt2img(api_server, seed=1)["images"][0])[1])["Model"] == "tiny"


def test_samplers_and_schedulers_use_a1111_names(api_server: ApiServer) -> None:
    samplers = {sampler["name"]: sampler for sampler in get(api_server, "/samplers").json()}
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM"} <= set(samplers)
    assert samplers["Euler a"]["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    assert samplers["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    schedulers = {scheduler["name"]: scheduler for scheduler in get(api_server, "/schedulers").json()}
    assert schedulers["karras"] == {
        "name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False,
    }
    assert schedulers["sgm_uniform"]["aliases"] == ["SGMUniform"]


def test_lists_of_things_this_server_does_not_have(api_server: ApiServer) -> None:
    for path in ("/sd-vae", "/upscalers", "/face-restorers", "/realesrgan-models", "/hypernetworks",
                 "/prompt-styles", "/loras"):
        response = get(api_server, path)
        assert (response.status_code, response.json()) == (200, []), path
    assert get(api_server, "/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert get(api_server, "/scripts").json() == {"txt2img": [], "img2img": []}


def test_memory_reports_ram_and_no_cuda_on_this_machine(api_server: ApiServer) -> None:
    memory = get(api_server, "/memory").json()
    ram = memory["ram"]
    assert ram["total"] > 0 and 0 <= ram["free"] <= ram["total"] and ram["used"] == ram["total"] - ram["free"]
    assert "error" in memory["cuda"] or "system" in memory["cuda"]


def test_cmd_flags_show_the_parsed_flags(api_server: ApiServer) -> None:
    flags = get(api_server, "/cmd-flags").json()
    assert flags["nowebui"] is True and flags["data_dir"] == str(api_server.data_dir)


# -- png-info ------------------------------------------------------------------------------------------------


def test_png_info_reads_back_what_txt2img_wrote(api_server: ApiServer) -> None:
    encoded = txt2img(api_server, seed=4321, negative_prompt="fog")["images"][0]
    _, infotext = decode_png(encoded)
    for image in (encoded, f"data:image/png;base64,{encoded}"):
        response = post(api_server, "/png-info", {"image": image})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["info"] == infotext
        assert isinstance(body["items"], dict)
        parameters = body["parameters"]
        assert parameters["Prompt"] == "a red apple on a table" and parameters["Negative prompt"] == "fog"
        assert (parameters["Seed"], parameters["Steps"], parameters["Size-1"], parameters["Size-2"]) == (
            "4321", "3", "64", "64"
        )


def test_png_info_of_an_empty_or_plain_image_and_of_garbage(api_server: ApiServer) -> None:
    assert post(api_server, "/png-info", {"image": ""}).json() == {"info": "", "items": {}, "parameters": {}}
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buffer, format="PNG")
    plain = post(api_server, "/png-info", {"image": base64.b64encode(buffer.getvalue()).decode()}).json()
    assert plain["info"] == ""
    for garbage in ("aGVsbG8gd29ybGQ=", "not base64 at all!", "https://example.com/a.png"):
        response = post(api_server, "/png-info", {"image": garbage})
        assert response.status_code == 422 and "image" in response.json()["detail"], response.text


# -- authentication ------------------------------------------------------------------------------------------


def test_auth_refuses_missing_and_wrong_credentials(authed_api_server: ApiServer) -> None:
    for auth in (None, ("alice", "wrong"), ("mallory", "secret1"), ("bob", "secret1")):
        for response in (get(authed_api_server, "/sd-models", auth=auth),
                         post(authed_api_server, "/txt2img", SMALL, auth=auth),
                         get(authed_api_server, "/progress", auth=auth)):
            assert response.status_code == 401, (auth, response.text)
            assert response.headers["WWW-Authenticate"] == "Basic"
            assert response.json()["detail"] == "Incorrect username or password"


def test_auth_accepts_either_user_and_never_shows_passwords(authed_api_server: ApiServer) -> None:
    for auth in (("alice", "secret1"), ("bob", "secret2")):
        response = get(authed_api_server, "/sd-models", auth=auth)
        assert response.status_code == 200 and len(response.json()) == 2
    flags = get(authed_api_server, "/cmd-flags", auth=("alice", "secret1"))
    assert flags.status_code == 200
    assert "secret1" not in flags.text and "secret2" not in flags.text
    assert flags.json()["api_auth"] not in (None, "")
