"""A1111's extra-network and style routes over real HTTP against `python -m webui --nowebui`: /loras, /refresh-loras,
/embeddings, /refresh-embeddings, /prompt-styles and `styles` in txt2img, with real files in A1111's folder layout.
Must not import webui (the server is a separate process)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from safetensors.numpy import save_file

from tests.api.conftest import ApiServer, data_dir_with_models, start_server, stop_server

# The first job imports torch and loads the tiny model, which takes a while on a 2-core machine.
REQUEST_TIMEOUT_SECONDS = 180.0
SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 2, "seed": 7}
# The tiny SD1 fixture's text encoder is 32 wide; a real SD 1.5 embedding (768) does not fit it.
TINY_WIDTH = 32
STYLES_CSV = ('name,prompt,negative_prompt\n'
              'A,"{prompt}, detailed",\n'
              'B,"masterpiece, {prompt}",lowres\n'
              'Broken,too, many, columns\n'
              'C,best quality,\n')


def write_lora(path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.ones((4, 32), np.float32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.ones((32, 4), np.float32)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_embeddings(folder: Path) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": np.ones((2, TINY_WIDTH), np.float32)}, str(folder / "good_emb.safetensors"))
    save_file({"emb_params": np.ones((1, 768), np.float32)}, str(folder / "sd15_emb.safetensors"))
    # A1111's own .pt layout, with its training record, in a subfolder.
    (folder / "sub").mkdir()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.ones(3, TINY_WIDTH)},
                "name": "a1111_emb", "step": 500, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "tiny"},
               folder / "sub" / "a1111_emb.pt")
    (folder / "broken.safetensors").write_bytes(b"definitely not a safetensors file")


@pytest.fixture(scope="module")
def networks_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ApiServer]:
    """A server whose data folder holds LoRAs (models/Lora and models/LyCORIS), embeddings and a styles file given
    with --styles-file."""
    data_dir = data_dir_with_models(tmp_path_factory.mktemp("networks-api"), tiny_model_dir)
    lora = data_dir / "models" / "Lora"
    write_lora(lora / "detail.safetensors", {
        "ss_output_name": "add_detail", "ss_sd_model_name": "v1-5-pruned.ckpt",
        "ss_tag_frequency": json.dumps({"10_img": {"1girl": 3}}),
    })
    write_lora(lora / "characters" / "hero.safetensors")
    write_lora(data_dir / "models" / "LyCORIS" / "loha.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    (lora / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    write_embeddings(data_dir / "embeddings")
    styles = data_dir / "config" / "my-styles.csv"
    styles.parent.mkdir()
    styles.write_text(STYLES_CSV, encoding="utf-8")
    server = start_server(data_dir, ["--styles-file", str(styles)], data_dir / "server.log")
    yield server
    stop_server(server)


def get(server: ApiServer, path: str, **kwargs: Any) -> requests.Response:
    return requests.get(f"{server.url}/sdapi/v1{path}", timeout=REQUEST_TIMEOUT_SECONDS, **kwargs)


def post(server: ApiServer, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
    return requests.post(f"{server.url}/sdapi/v1{path}", json=body, timeout=REQUEST_TIMEOUT_SECONDS, **kwargs)


# -- LoRA ------------------------------------------------------------------------------------------------------------


def test_loras_lists_every_file_with_a1111s_fields(networks_server: ApiServer) -> None:
    response = get(networks_server, "/loras")
    assert response.status_code == 200, response.text
    listed = {item["name"]: item for item in response.json()}
    assert set(listed) >= {"detail", "hero", "loha", "cut"}
    lora = networks_server.data_dir / "models" / "Lora"
    assert listed["detail"]["alias"] == "add_detail"
    assert listed["detail"]["path"] == str((lora / "detail.safetensors").resolve())
    assert listed["detail"]["metadata"]["ss_tag_frequency"] == {"10_img": {"1girl": 3}}
    assert list(listed["detail"]["metadata"])[0] == "ss_sd_model_name"
    assert listed["hero"] == {"name": "hero", "alias": "hero", "metadata": {},
                              "path": str((lora / "characters" / "hero.safetensors").resolve())}
    assert listed["loha"]["metadata"] == {"ss_base_model_version": "sdxl_base_v1-0"}
    # A damaged file is listed (it fails when used) and does not hide the others.
    assert listed["cut"]["metadata"] == {}
    assert [item["name"] for item in response.json()].index("detail") < [
        item["name"] for item in response.json()].index("loha"), "models/Lora is walked before models/LyCORIS"


def test_a_new_lora_appears_after_refresh_loras_not_on_a_get(networks_server: ApiServer) -> None:
    before = {item["name"] for item in get(networks_server, "/loras").json()}
    write_lora(networks_server.data_dir / "models" / "Lora" / "fresh.safetensors", {"ss_output_name": "fresh_one"})
    assert {item["name"] for item in get(networks_server, "/loras").json()} == before, "a GET must not rescan"
    response = post(networks_server, "/refresh-loras")
    assert (response.status_code, response.json()) == (200, None)
    after = {item["name"]: item for item in get(networks_server, "/loras").json()}
    assert set(after) == before | {"fresh"} and after["fresh"]["alias"] == "fresh_one"
    assert get(networks_server, "/refresh-loras").status_code == 405


# -- embeddings ------------------------------------------------------------------------------------------------------


EXPECTED_EMBEDDINGS = {
    "loaded": {
        "a1111_emb": {"step": 500, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "tiny",
                      "shape": TINY_WIDTH, "vectors": 3},
        "good_emb": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": TINY_WIDTH,
                     "vectors": 2},
    },
    "skipped": {
        "sd15_emb": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768,
                     "vectors": 1},
    },
}


def test_embeddings_are_fitted_to_the_model_when_it_loads(networks_server: ApiServer) -> None:
    # A job that needs the model: after it, the model is loaded (A1111 reloads embeddings on every model load).
    assert post(networks_server, "/reload-checkpoint").status_code == 200
    assert get(networks_server, "/embeddings").json() == EXPECTED_EMBEDDINGS


def test_refresh_embeddings_answers_null_and_keeps_the_listing(networks_server: ApiServer) -> None:
    response = post(networks_server, "/refresh-embeddings")
    assert (response.status_code, response.json()) == (200, None), response.text
    assert get(networks_server, "/embeddings").json() == EXPECTED_EMBEDDINGS
    assert get(networks_server, "/refresh-embeddings").status_code == 405


def test_a_new_embedding_appears_after_refresh_embeddings(networks_server: ApiServer) -> None:
    assert post(networks_server, "/refresh-embeddings").status_code == 200
    folder = networks_server.data_dir / "embeddings"
    save_file({"emb_params": np.ones((4, TINY_WIDTH), np.float32)}, str(folder / "later_emb.safetensors"))
    assert "later_emb" not in get(networks_server, "/embeddings").json()["loaded"]
    assert post(networks_server, "/refresh-embeddings").status_code == 200
    assert get(networks_server, "/embeddings").json()["loaded"]["later_emb"]["vectors"] == 4


# -- styles ----------------------------------------------------------------------------------------------------------


def test_prompt_styles_come_from_the_styles_file_flag_and_skip_the_broken_row(networks_server: ApiServer) -> None:
    response = get(networks_server, "/prompt-styles")
    assert response.status_code == 200
    assert response.json() == [
        {"name": "A", "prompt": "{prompt}, detailed", "negative_prompt": ""},
        {"name": "B", "prompt": "masterpiece, {prompt}", "negative_prompt": "lowres"},
        {"name": "C", "prompt": "best quality", "negative_prompt": ""},
    ]
    log = networks_server.log.read_text()
    assert "my-styles.csv: line 4: expected 3 columns" in log


def test_txt2img_applies_styles_to_both_prompts(networks_server: ApiServer) -> None:
    response = post(networks_server, "/txt2img", {**SMALL, "prompt": "cat", "negative_prompt": "blurry",
                                                  "styles": ["A", "no such style", "B", "C"]})
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    styled, styled_negative = "masterpiece, cat, detailed, best quality", "blurry, lowres"
    # A1111's Processed: "prompt" is the request's, all_prompts the styled ones; the infotext has the styled text.
    assert (info["prompt"], info["negative_prompt"]) == ("cat", "blurry")
    assert info["all_prompts"] == [styled] and info["all_negative_prompts"] == [styled_negative]
    assert info["styles"] == ["A", "no such style", "B", "C"]
    assert info["infotexts"][0].startswith(f"{styled}\nNegative prompt: {styled_negative}\n")
    assert body["parameters"]["styles"] == ["A", "no such style", "B", "C"]
    assert body["parameters"]["prompt"] == "cat"


def test_txt2img_without_styles_keeps_the_prompt(networks_server: ApiServer) -> None:
    response = post(networks_server, "/txt2img", {**SMALL, "prompt": "  cat  "})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["all_prompts"] == ["  cat  "] and info["styles"] == []


# -- auth ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("GET", "/loras"), ("POST", "/refresh-loras"), ("GET", "/embeddings"),
                                              ("POST", "/refresh-embeddings"), ("GET", "/prompt-styles")])
def test_the_routes_are_behind_api_auth(authed_api_server: ApiServer, method: str, path: str) -> None:
    url = f"{authed_api_server.url}/sdapi/v1{path}"
    assert requests.request(method, url, timeout=REQUEST_TIMEOUT_SECONDS).status_code == 401
    response = requests.request(method, url, auth=("alice", "secret1"), timeout=REQUEST_TIMEOUT_SECONDS)
    assert response.status_code == 200, response.text
