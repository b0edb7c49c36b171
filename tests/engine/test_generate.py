"""End-to-end generation on a tiny random SD 1.x checkpoint loaded through the real single-file path.
Checks A1111's seed rules and that prompt features really change the picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.images import pixels, png_bytes
from webui.core.events import JobControl, Progress
from webui.core.infotext import parse_infotext
from webui.core.params import GenerationParams, ParamError
from webui.engine.devices import choose_device_policy
from webui.engine.generate import GeneratedImage, generate
from webui.engine.model_manager import LoadedModel, ModelManager
from webui.engine.model_registry import ModelRegistry
from webui.engine.vae import decode_latent, to_pil

VERSION = "webui-test"
SMALL = dict(width=64, height=64, steps=4, sampler="Euler a")


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    manager = ModelManager(ModelRegistry([tiny_model_dir]), choose_device_policy(force_cpu=True))
    return manager.ensure("tiny")


def run(model: LoadedModel, seed: int = 1234, **changes: object) -> list[GeneratedImage]:
    params = GenerationParams(**{"prompt": "a photo of a cat", **SMALL, **changes})
    return [image for batch in generate(model, params, seed, VERSION) for image in batch]


def test_same_seed_and_parameters_give_a_byte_identical_image(model: LoadedModel) -> None:
    first, second = run(model)[0], run(model)[0]
    assert png_bytes(first) == png_bytes(second)
    assert first.image.size == (64, 64)


def test_next_seed_gives_a_different_image(model: LoadedModel) -> None:
    assert not np.array_equal(pixels(run(model, seed=1234)[0]), pixels(run(model, seed=1235)[0]))


def test_batch_image_i_uses_seed_plus_i_independently_of_batch_size(model: LoadedModel) -> None:
    batch = run(model, seed=500, batch_size=2, batch_count=2)
    assert [image.seed for image in batch] == [500, 501, 502, 503]
    alone = run(model, seed=502)[0]
    # One image per generator makes the noise batch-independent; the UNet's batched float math may
    # differ in the last bits, so compare decoded pixels with a tolerance of one level.
    assert np.abs(pixels(batch[2]) - pixels(alone)).max() <= 1


def test_long_prompt_is_not_truncated(model: LoadedModel) -> None:
    words = [f"word{index}" for index in range(40)]
    long_prompt = " ".join(words)  # each "wordN" is several CLIP tokens: well over 75 in total
    tokens = model.tokenizer.encode(long_prompt)
    assert len(tokens) > 100
    full = run(model, prompt=long_prompt)[0]
    # Build the 75-token prefix by dropping words until the prompt fits one chunk.
    prefix_words = list(words)
    while len(model.tokenizer.encode(" ".join(prefix_words))) > 75:
        prefix_words.pop()
    truncated = run(model, prompt=" ".join(prefix_words))[0]
    assert not np.array_equal(pixels(full), pixels(truncated))


def test_clip_skip_two_differs_from_one(model: LoadedModel) -> None:
    one = run(model, clip_skip=1)[0]
    two = run(model, clip_skip=2)[0]
    assert not np.array_equal(pixels(one), pixels(two))
    assert "Clip skip: 2" in two.infotext and "Clip skip" not in one.infotext


def test_clip_skip_beyond_the_model_is_a_clear_error(model: LoadedModel) -> None:
    with pytest.raises(ParamError, match="clip_skip: must be at most"):
        run(model, clip_skip=12)


def test_break_and_emphasis_change_the_image(model: LoadedModel) -> None:
    plain = pixels(run(model, prompt="a cat, a hat")[0])
    with_break = pixels(run(model, prompt="a cat BREAK a hat")[0])
    emphasised = pixels(run(model, prompt="a cat, (a hat:1.5)")[0])
    assert not np.array_equal(plain, with_break)
    assert not np.array_equal(plain, emphasised)


@pytest.mark.parametrize(
    "sampler", ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "Euler", "Heun", "LMS", "DPM2", "DDIM", "UniPC"]
)
def test_every_listed_sampler_generates(model: LoadedModel, sampler: str) -> None:
    image = run(model, sampler=sampler)[0]
    assert np.asarray(image.image).std() > 0
    assert f"Sampler: {sampler}," in image.infotext


def test_infotext_carries_the_generation_parameters(model: LoadedModel) -> None:
    image = run(model, seed=77, negative_prompt="blurry, lowres", cfg_scale=5.5, sampler="DPM++ 2M")[0]
    fields = parse_infotext(image.infotext)
    assert fields.prompt == "a photo of a cat"
    assert fields.negative_prompt == "blurry, lowres"
    assert fields.fields["Steps"] == "4"
    assert fields.fields["Sampler"] == "DPM++ 2M"
    assert fields.fields["Schedule type"] == "Karras"
    assert fields.fields["CFG scale"] == "5.5"
    assert fields.fields["Seed"] == "77"
    assert (fields.fields["Size-1"], fields.fields["Size-2"]) == ("64", "64")
    assert fields.fields["Model"] == "tiny"
    assert fields.fields["Model hash"] == model.short_hash and len(model.short_hash) == 10
    assert fields.fields["Version"] == VERSION


def test_prompt_editing_switches_the_prompt_during_sampling(model: LoadedModel) -> None:
    cat = pixels(run(model, prompt="a cat")[0])
    dog = pixels(run(model, prompt="a dog")[0])
    edited = pixels(run(model, prompt="a [cat:dog:2]")[0])
    assert not np.array_equal(edited, cat) and not np.array_equal(edited, dog)


def test_progress_is_reported_every_step(model: LoadedModel) -> None:
    seen: list[Progress] = []
    params = GenerationParams(prompt="x", **{**SMALL, "batch_count": 2})
    list(generate(model, params, 1, VERSION, on_progress=seen.append))
    assert [(p.batch_index, p.step) for p in seen] == [(b, s) for b in range(2) for s in range(1, 5)]
    assert seen[-1].fraction == 1.0


def test_interrupt_stops_the_job_within_a_step_and_keeps_the_picture_so_far(model: LoadedModel) -> None:
    control = JobControl()
    steps_seen: list[int] = []
    predictions: list[torch.Tensor] = []

    def on_progress(progress: Progress) -> None:
        steps_seen.append(progress.step)
        if progress.step == 2:
            control.interrupt()

    def on_denoised(progress: Progress, denoised: torch.Tensor) -> None:
        predictions.append(denoised.clone())

    params = GenerationParams(prompt="x", **{**SMALL, "steps": 10, "batch_count": 3})
    batches = list(generate(model, params, 1, VERSION, control=control, on_progress=on_progress,
                            on_denoised=on_denoised))
    assert steps_seen == [1, 2]
    # As A1111: the batch that was running is decoded from its last x0 prediction; later batches never start.
    assert [[image.seed for image in batch] for batch in batches] == [[1]]
    expected = to_pil(decode_latent(model.vae, predictions[-1], model.vae_scaling_factor))
    assert np.array_equal(pixels(batches[0][0]), np.asarray(expected, dtype=np.int16))
    assert parse_infotext(batches[0][0].infotext).fields["Steps"] == "10"


def test_skip_ends_only_the_current_batch_with_its_picture_so_far(model: LoadedModel) -> None:
    control = JobControl()

    def on_progress(progress: Progress) -> None:
        if progress.batch_index == 0 and progress.step == 1:
            control.skip()

    params = GenerationParams(prompt="x", **{**SMALL, "batch_count": 2})
    batches = list(generate(model, params, 10, VERSION, control=control, on_progress=on_progress))
    assert [[image.seed for image in batch] for batch in batches] == [[10], [11]]
    unskipped = [image for batch in generate(model, params, 10, VERSION) for image in batch]
    # The skipped batch stopped after one of four steps; the next batch ran whole, as without a skip.
    assert not np.array_equal(pixels(batches[0][0]), pixels(unskipped[0]))
    assert np.array_equal(pixels(batches[1][0]), pixels(unskipped[1]))
