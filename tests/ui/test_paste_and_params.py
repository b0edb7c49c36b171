"""The UI's pure translations: widget values → GenerationParams, and infotext → control values.
No server or browser: these are the functions the tabs call."""

from __future__ import annotations

import pytest

from webui.core.infotext import build_infotext
from webui.core.params import GenerationParams, ParamError
from webui.ui.paste import checkpoint_choice, values_from_infotext
from webui.ui.txt2img import to_params

WIDGETS = {
    "prompt": "a cat", "negative_prompt": "blurry", "sampler": "Euler a", "scheduler": "Karras",
    "steps": 25.0, "cfg_scale": 6.5, "width": 640.0, "height": 448.0, "seed": 42.0, "batch_count": 2.0,
    "batch_size": 3.0, "clip_skip": 2.0, "checkpoint": "anime/model.safetensors",
}


def test_widget_values_become_validated_params() -> None:
    params = to_params(WIDGETS)
    assert params == GenerationParams(
        prompt="a cat", negative_prompt="blurry", sampler="Euler a", scheduler="Karras", steps=25, cfg_scale=6.5,
        width=640, height=448, seed=42, batch_count=2, batch_size=3, clip_skip=2,
        checkpoint="anime/model.safetensors",
    )


@pytest.mark.parametrize(
    "field, value, message",
    [("steps", 20.5, "steps: must be a whole number"), ("width", 100.0, "width: must be a multiple of 8"),
     ("seed", None, "seed: is required"), ("cfg_scale", 40.0, "cfg_scale: must be between 1 and 30")],
)
def test_bad_widget_values_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ParamError, match=message):
        to_params({**WIDGETS, field: value})


def test_infotext_fills_every_pasteable_control() -> None:
    params = to_params(WIDGETS)
    infotext = build_infotext(params, 1234, "model", "0123456789", "webui-test")
    values, checkpoint = values_from_infotext(infotext)
    assert values == {
        "prompt": "a cat", "negative_prompt": "blurry", "sampler": "Euler a", "scheduler": "Karras", "steps": 25,
        "cfg_scale": 6.5, "width": 640, "height": 448, "seed": 1234, "clip_skip": 2,
    }
    assert checkpoint == "model"
    assert checkpoint_choice(checkpoint, ["other.safetensors", "anime/model.safetensors"]) == "anime/model.safetensors"
    assert checkpoint_choice("missing", ["other.safetensors"]) is None


def test_old_combined_sampler_names_are_split_like_a1111() -> None:
    values, _ = values_from_infotext("a dog\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512")
    assert (values["sampler"], values["scheduler"]) == ("DPM++ 2M", "Karras")
    assert values["clip_skip"] == 1  # A1111 treats a missing Clip skip as 1


def test_an_unknown_sampler_in_an_infotext_is_a_clear_error() -> None:
    with pytest.raises(ParamError, match="Sampler"):
        values_from_infotext("a dog\nSteps: 20, Sampler: Warp Drive, CFG scale: 7, Seed: 1, Size: 512x512")
