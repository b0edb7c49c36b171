"""VAE choice through A1111's API: /sdapi/v1/sd-vae, override_settings.sd_vae, options.sd_vae, the infotext.
A real server over real HTTP; the VAE file is a real VAE-only safetensors dropped into models/VAE."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.conftest import ApiServer
from tests.api.test_sdapi import decode_png, get, infotext_fields, post, txt2img
from tests.fixtures.vae_files import build_tiny_vae_file

VAE_NAME = "tiny-ft.safetensors"


@pytest.fixture
def vae_file(api_server: ApiServer) -> Iterator[Path]:
    path = build_tiny_vae_file(api_server.data_dir / "models" / "VAE" / VAE_NAME, seed=7)
    yield path
    post(api_server, "/options", {"sd_vae": "Automatic"})
    path.unlink()


def test_a_vae_file_is_listed_chosen_per_request_and_recorded(api_server: ApiServer, vae_file: Path) -> None:
    listed = get(api_server, "/sd-vae").json()
    assert listed == [{"model_name": VAE_NAME, "filename": str(vae_file.resolve())}]

    request = {"prompt": "a lighthouse", "seed": 5, "override_settings": {"sd_model_checkpoint": "tiny"}}
    own_image, own_infotext = decode_png(txt2img(api_server, **request)["images"][0])
    assert "VAE" not in infotext_fields(own_infotext)

    overrides = {"sd_model_checkpoint": "tiny", "sd_vae": VAE_NAME}
    with_vae = txt2img(api_server, **{**request, "override_settings": overrides})
    image, infotext = decode_png(with_vae["images"][0])
    assert infotext_fields(infotext)["VAE"] == VAE_NAME
    assert image.tobytes() != own_image.tobytes(), "another VAE decodes the same latents differently"
    assert '"sd_vae_name": "tiny-ft.safetensors"' in with_vae["info"]

    # The saved choice (options) applies to requests that name none, as A1111's sd_vae setting does.
    assert post(api_server, "/options", {"sd_vae": VAE_NAME}).status_code == 200
    assert get(api_server, "/options").json()["sd_vae"] == VAE_NAME
    chosen_image, chosen_infotext = decode_png(txt2img(api_server, **request)["images"][0])
    assert chosen_image.tobytes() == image.tobytes()
    assert infotext_fields(chosen_infotext)["VAE"] == VAE_NAME


def test_an_unknown_vae_is_refused_with_the_choices(api_server: ApiServer) -> None:
    response = post(api_server, "/txt2img", {"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                             "override_settings": {"sd_vae": "nope.safetensors"}})
    assert response.status_code in (400, 422)
    assert "override_settings.sd_vae" in response.text and "Automatic, None" in response.text
    refused = post(api_server, "/options", {"sd_vae": "nope.safetensors"})
    assert refused.status_code in (400, 422) and "sd_vae" in refused.text
