"""SD 2.x (eps and v-prediction) and SDXL base: loading real-layout tiny files, A1111's conditioning rules, the
v-to-eps conversion, SDXL's size conditioning, and images end to end. diffusers' own pipelines are the reference
where their semantics coincide with A1111's."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from tests.fixtures.cpu_models import load_on_cpu
from tests.fixtures.images import pixels
from tests.fixtures.tiny_sd import (
    TINY_SDXL_CLIP_L,
    TINY_SDXL_OPEN_CLIP_G,
    build_tiny_sd2_modules,
    build_tiny_sdxl_modules,
    sidecar_dir_for,
)
from webui.core.infotext import parse_infotext
from webui.core.params import GenerationParams
from webui.engine.checkpoint_loading import is_v_prediction, read_checkpoint
from webui.engine.clip_tokenizer import TOKENIZER_DIR
from webui.engine.conditioning import encode_sd2_prompts, encode_sdxl_prompts, tokenize_prompt
from webui.engine.families import SD1, SDXL
from webui.engine.generate import GeneratedImage, PromptConditioning, generate
from webui.engine.k_sampling import DiscreteSchedule, eps_denoiser
from webui.engine.model_manager import LoadedModel
from webui.engine.model_registry import ModelRegistry
from webui.engine.unet_eps import UNetEps
from webui.engine.vae import cheap_preview

VERSION = "webui-test"
SMALL = dict(width=64, height=64, steps=3, sampler="Euler a")
PROMPT = "a photo of a cat"


def load(models: Path, name: str) -> LoadedModel:
    return load_on_cpu(models, name)


@pytest.fixture(scope="module")
def sd2_v(tiny_sd2_sdxl_dir: Path) -> LoadedModel:
    return load(tiny_sd2_sdxl_dir, "sd2_v")


@pytest.fixture(scope="module")
def sd2_eps(tiny_sd2_sdxl_dir: Path) -> LoadedModel:
    return load(tiny_sd2_sdxl_dir, "sd2_eps")


@pytest.fixture(scope="module")
def sdxl(tiny_sd2_sdxl_dir: Path) -> LoadedModel:
    return load(tiny_sd2_sdxl_dir, "sdxl")


def run(model: LoadedModel, seed: int = 1234, **changes: object) -> list[GeneratedImage]:
    params = GenerationParams(**{"prompt": PROMPT, **SMALL, **changes})
    return [image for batch in generate(model, params, seed, VERSION) for image in batch]


def hf_tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    """transformers' CLIPTokenizer on the vendored BPE files, as a diffusers pipeline folder would ship it."""
    extra = {"pad_token": pad_token} if pad_token is not None else {}
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True, model_max_length=77, **extra)


def as_file_dtype(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's tensors after the fp16 round trip of the checkpoint file (floats only)."""
    return {k: (v.half().float() if v.is_floating_point() else v) for k, v in module.state_dict().items()}


@contextmanager
def captured_input_ids(**modules: torch.nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """The input_ids each named text encoder is called with, per call."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = [
        module.register_forward_pre_hook(
            lambda _m, _a, kwargs, name=name: seen[name].append(kwargs["input_ids"].clone()), with_kwargs=True
        )
        for name, module in modules.items()
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


# --- loading ---------------------------------------------------------------------------------------------------


def test_sd2_prediction_type_comes_from_a1111s_test_on_the_unet(sd2_v: LoadedModel, sd2_eps: LoadedModel) -> None:
    assert (sd2_v.family.key, sd2_eps.family.key) == ("sd2", "sd2")
    assert is_v_prediction(sd2_v.unet) and not is_v_prediction(sd2_eps.unet)
    assert sd2_v.prediction_type == "v_prediction"
    assert sd2_eps.prediction_type == "epsilon"


def test_only_a_sidecar_that_states_the_prediction_type_skips_the_test(tiny_sd2_sdxl_dir: Path, tmp_path: Path) -> None:
    # The fixture sidecars leave prediction_type out: the loader must not take it from the config.
    assert read_checkpoint(ModelRegistry([tiny_sd2_sdxl_dir]).resolve("sd2_eps")).prediction_type is None
    assert read_checkpoint(ModelRegistry([tiny_sd2_sdxl_dir]).resolve("sdxl")).prediction_type == "epsilon"

    stated = tmp_path / "models"
    stated.mkdir()
    shutil.copy(tiny_sd2_sdxl_dir / "sd2_eps.safetensors", stated / "stated.safetensors")
    sidecar = sidecar_dir_for(stated / "stated.safetensors")
    shutil.copytree(sidecar_dir_for(tiny_sd2_sdxl_dir / "sd2_eps.safetensors"), sidecar)
    scheduler_path = sidecar / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_path.read_text())
    scheduler_path.write_text(json.dumps({**scheduler, "prediction_type": "v_prediction"}))
    # The UNet fails A1111's test, but the user's config says v: the config wins, as a yaml does in A1111.
    assert load(stated, "stated").prediction_type == "v_prediction"


def test_loaded_weights_are_the_modules_the_files_were_made_from(sd2_v: LoadedModel, sdxl: LoadedModel) -> None:
    sd2_reference = build_tiny_sd2_modules(seed=1, v_prediction=True)
    sdxl_reference = build_tiny_sdxl_modules(seed=0)
    pairs = [
        (sd2_v.unet, sd2_reference.unet),
        (sd2_v.vae, sd2_reference.vae),
        # The SD 2.x encoder keeps the first layers of the file's OpenCLIP tower and drops the last one.
        (sd2_v.text_encoder, sd2_reference.text_encoder),
        (sdxl.unet, sdxl_reference.unet),
        (sdxl.vae, sdxl_reference.vae),
        (sdxl.text_encoder, sdxl_reference.text_encoder),
        (sdxl.text_encoder_2, sdxl_reference.text_encoder_2),
    ]
    for loaded, reference in pairs:
        assert loaded is not None
        expected = as_file_dtype(reference)
        actual = loaded.state_dict()
        assert actual.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(actual[name], tensor), name
    assert sd2_v.text_encoder.config.num_hidden_layers == sd2_reference.open_clip_text.config.num_hidden_layers - 1
    assert sdxl.vae_scaling_factor == 0.13025 and sd2_v.vae_scaling_factor == 0.18215


# --- conditioning --------------------------------------------------------------------------------------------


def test_sd2_context_is_the_penultimate_openclip_layer_through_ln_final(sd2_v: LoadedModel) -> None:
    """A1111's FrozenOpenCLIPEmbedder (layer "penultimate"), computed on the file's whole OpenCLIP tower."""
    tower = build_tiny_sd2_modules(seed=1, v_prediction=True).open_clip_text
    tower.load_state_dict(as_file_dtype(tower))
    tokenizer = sd2_v.tokenizer
    body = tokenizer.encode(PROMPT)
    ids = [tokenizer.bos_id, *body, tokenizer.eos_id] + [0] * (75 - len(body))
    with torch.no_grad():
        hidden = tower(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-2]
        expected = tower.text_model.final_layer_norm(hidden)
        ours = encode_sd2_prompts([PROMPT], sd2_v.text_encoder, tokenizer, "Ignore")
    torch.testing.assert_close(ours, expected)


def test_sd2_context_matches_diffusers_encode_prompt(sd2_v: LoadedModel) -> None:
    pipe = StableDiffusionPipeline(
        vae=sd2_v.vae, text_encoder=sd2_v.text_encoder, tokenizer=hf_tokenizer(pad_token="!"), unet=sd2_v.unet,
        scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
        ours = encode_sd2_prompts([PROMPT], sd2_v.text_encoder, sd2_v.tokenizer)
    torch.testing.assert_close(ours, expected)


def test_sdxl_conditioning_matches_diffusers_encode_prompt(sdxl: LoadedModel) -> None:
    """Context, pooled vector, and the zeros for an empty negative prompt (A1111: "", diffusers: None)."""
    assert sdxl.text_encoder_2 is not None
    pipe = StableDiffusionXLPipeline(
        vae=sdxl.vae, text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2,
        tokenizer=hf_tokenizer(), tokenizer_2=hf_tokenizer(pad_token="!"), unet=sdxl.unet,
        scheduler=EulerDiscreteScheduler(), add_watermarker=False,
    )
    with torch.no_grad():
        context, negative_context, pooled, negative_pooled = pipe.encode_prompt(
            PROMPT, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        ours = encode_sdxl_prompts([PROMPT], sdxl.text_encoder, sdxl.text_encoder_2, sdxl.tokenizer)
        negative = PromptConditioning(sdxl, "negative_prompt", "", 3, 1, "Original", negative=True)
    width = TINY_SDXL_CLIP_L["hidden_size"] + TINY_SDXL_OPEN_CLIP_G["hidden_size"]
    assert ours.crossattn.shape == (1, 77, width)
    assert ours.pooled is not None and ours.pooled.shape == (1, TINY_SDXL_OPEN_CLIP_G["projection_dim"])
    torch.testing.assert_close(ours.crossattn, context)
    torch.testing.assert_close(ours.pooled, pooled)
    torch.testing.assert_close(negative.at(0), negative_context)
    pooled_at = negative.pooled_at(0)
    assert pooled_at is not None
    torch.testing.assert_close(pooled_at, negative_pooled)
    assert not negative_pooled.any()


def test_padding_ids_per_encoder(sdxl: LoadedModel, sd2_v: LoadedModel) -> None:
    """CLIP-L pads with EOS; OpenCLIP (SD 2.x, SDXL's bigG) with 0 after the first EOS (A1111's process_tokens)."""
    assert sdxl.text_encoder_2 is not None
    tokenizer = sdxl.tokenizer
    body = tokenizer.encode(PROMPT)
    real = [tokenizer.bos_id, *body, tokenizer.eos_id]
    with torch.no_grad(), captured_input_ids(clip_l=sdxl.text_encoder, clip_g=sdxl.text_encoder_2) as seen:
        encode_sdxl_prompts([PROMPT], sdxl.text_encoder, sdxl.text_encoder_2, tokenizer)
    with torch.no_grad(), captured_input_ids(open_clip_h=sd2_v.text_encoder) as seen_sd2:
        encode_sd2_prompts([PROMPT], sd2_v.text_encoder, sd2_v.tokenizer)
    padding = 77 - len(real)
    assert seen["clip_l"][0][0].tolist() == real + [tokenizer.eos_id] * padding
    assert seen["clip_g"][0][0].tolist() == real + [0] * padding
    assert seen_sd2["open_clip_h"][0][0].tolist() == real + [0] * padding


def test_sdxl_pooled_vector_comes_from_the_first_chunk_only(sdxl: LoadedModel) -> None:
    assert sdxl.text_encoder_2 is not None

    def encode(text: str):  # noqa: ANN202 - a local shorthand
        with torch.no_grad():
            return encode_sdxl_prompts([text], sdxl.text_encoder, sdxl.text_encoder_2, sdxl.tokenizer)

    both = encode("a photo of a cat BREAK a dog on the moon")
    first, second = encode(PROMPT), encode("a dog on the moon")
    assert both.crossattn.shape[1] == 2 * 77
    assert both.pooled is not None and first.pooled is not None and second.pooled is not None
    torch.testing.assert_close(both.pooled, first.pooled)
    assert not torch.allclose(both.pooled, second.pooled)
    # Each chunk's context is still its own: the second 77 tokens are the second prompt's.
    torch.testing.assert_close(both.crossattn[:, 77:], second.crossattn)


def test_only_sdxl_conditions_an_empty_negative_prompt_on_zeros(sdxl: LoadedModel, sd2_v: LoadedModel) -> None:
    def conditioning(model: LoadedModel, text: str, negative: bool = True) -> PromptConditioning:
        with torch.no_grad():
            return PromptConditioning(model, "negative_prompt", text, 4, 1, "Original", negative=negative)

    empty = conditioning(sdxl, "")
    assert not empty.at(0).any() and not empty.pooled_at(0).any()  # type: ignore[union-attr]
    assert conditioning(sdxl, "blurry").at(0).any()
    assert conditioning(sdxl, "", negative=False).at(0).any()  # A1111 zeroes the negative prompt only
    # Empty only until step 2: A1111 zeroes only when every scheduled text is empty.
    assert conditioning(sdxl, "[:blurry:2]").at(0).any()
    assert conditioning(sd2_v, "").at(0).any()


def test_sdxl_unet_gets_the_generation_size_as_original_and_target_size(sdxl: LoadedModel) -> None:
    seen: list[torch.Tensor] = []
    handle = sdxl.unet.add_time_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        run(sdxl, width=96, height=64, steps=1, sampler="Euler")
    finally:
        handle.remove()
    pipe = StableDiffusionXLPipeline(
        vae=sdxl.vae, text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2, tokenizer=hf_tokenizer(),
        tokenizer_2=hf_tokenizer(pad_token="!"), unet=sdxl.unet, scheduler=EulerDiscreteScheduler(),
        add_watermarker=False,
    )
    expected = pipe._get_add_time_ids(
        (64, 96), (0, 0), (64, 96), torch.float32, text_encoder_projection_dim=TINY_SDXL_OPEN_CLIP_G["projection_dim"]
    )
    assert seen and seen[0].reshape(-1, 6).tolist() == expected.repeat(2, 1).tolist()  # cond and uncond rows


# --- v-prediction ---------------------------------------------------------------------------------------------


def test_v_output_becomes_the_x0_a1111s_v_denoisers_give(sd2_v: LoadedModel) -> None:
    """k-samplers: CompVisVDenoiser's x0 = x·c_skip + v·c_out (Karras et al. with σ_data = 1); DDIM/UniPC:
    diffusers' v-prediction DDPM step at the truncated integer timestep."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        context = encode_sd2_prompts([PROMPT], sd2_v.text_encoder, sd2_v.tokenizer)

        schedule = DiscreteSchedule(sd2_v.alphas_cumprod)
        k_eps = UNetEps(sd2_v, timestep_sampler=False, image_size=(64, 64))
        sigma = torch.tensor([3.0])
        ours = eps_denoiser(lambda x_in, t: k_eps(x_in, t, context, None), schedule)(x * 3.0, sigma)
        c_in, c_skip, c_out = 1 / (sigma**2 + 1) ** 0.5, 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
        v = sd2_v.unet(x * 3.0 * c_in, schedule.sigma_to_t(sigma), encoder_hidden_states=context).sample
        torch.testing.assert_close(ours, x * 3.0 * c_skip + v * c_out, rtol=1e-4, atol=1e-4)

        ddpm = DDPMScheduler.from_config({"prediction_type": "v_prediction", "clip_sample": False})
        # diffusers' own float32 cumprod drifts 5e-4 from LDM's float64-computed table: use the model's table.
        ddpm.alphas_cumprod = sd2_v.alphas_cumprod.clone()
        timestep_eps = UNetEps(sd2_v, timestep_sampler=True, image_size=(64, 64))
        for t in (500.0, 333.7):  # UniPC hands the model fractional timesteps; A1111 truncates for ᾱ
            t_tensor = torch.tensor([t])
            eps = timestep_eps(x, t_tensor, context, None)
            alpha = sd2_v.alphas_cumprod[int(t)]
            x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
            v = sd2_v.unet(x, t_tensor, encoder_hidden_states=context).sample
            expected = ddpm.step(v, int(t), x).pred_original_sample
            torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)


# --- generation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, sampler", [("sd2_v", "Euler a"), ("sd2_v", "DDIM"), ("sdxl", "DPM++ 2M"), ("sdxl", "UniPC")]
)
def test_sd2_v_and_sdxl_generate_images_that_follow_prompt_and_seed(
    name: str, sampler: str, sd2_v: LoadedModel, sdxl: LoadedModel
) -> None:
    model = {"sd2_v": sd2_v, "sdxl": sdxl}[name]
    first = run(model, sampler=sampler)[0]
    assert first.image.size == (64, 64) and pixels(first).std() > 0
    assert np.array_equal(pixels(first), pixels(run(model, sampler=sampler)[0]))
    assert not np.array_equal(pixels(first), pixels(run(model, seed=1235, sampler=sampler)[0]))
    assert not np.array_equal(pixels(first), pixels(run(model, prompt="a dog", sampler=sampler)[0]))
    fields = parse_infotext(first.infotext)
    assert fields.prompt == PROMPT
    assert fields.fields["Model"] == name
    assert fields.fields["Sampler"] == sampler
    assert (fields.fields["Size-1"], fields.fields["Size-2"]) == ("64", "64")


def test_sd2_eps_generates(sd2_eps: LoadedModel) -> None:
    image = run(sd2_eps)[0]
    assert pixels(image).std() > 0 and "Model: sd2_eps," in image.infotext


@pytest.mark.parametrize("name", ["sd2_v", "sdxl"])
def test_clip_skip_is_ignored_for_sd2_and_sdxl_as_in_a1111(name: str, sd2_v: LoadedModel, sdxl: LoadedModel) -> None:
    model = {"sd2_v": sd2_v, "sdxl": sdxl}[name]
    one, twelve = run(model, clip_skip=1)[0], run(model, clip_skip=12)[0]
    assert np.array_equal(pixels(one), pixels(twelve))
    assert "Clip skip: 12" in twelve.infotext  # A1111 writes the setting even where it has no effect


def test_sdxl_live_preview_uses_a1111s_sdxl_colours() -> None:
    latents = torch.zeros(1, 4, 1, 1)
    latents[0, 0] = 1.0
    sdxl_rgb = np.asarray(cheap_preview(latents, SDXL))[0, 0].tolist()
    assert sdxl_rgb == [int(255 * (1 + c) / 2) for c in (0.3448, 0.4168, 0.4395)]
    assert sdxl_rgb != np.asarray(cheap_preview(latents, SD1))[0, 0].tolist()


def test_token_chunks_are_shared_by_both_sdxl_encoders(sdxl: LoadedModel) -> None:
    """Both SDXL encoders see the same chunks (same BPE): a 80-token prompt is two chunks for each."""
    assert sdxl.text_encoder_2 is not None
    prompt = " ".join(["cat"] * 80)
    assert len(tokenize_prompt(prompt, sdxl.tokenizer).chunks) == 2
    with torch.no_grad(), captured_input_ids(clip_l=sdxl.text_encoder, clip_g=sdxl.text_encoder_2) as seen:
        result = encode_sdxl_prompts([prompt], sdxl.text_encoder, sdxl.text_encoder_2, sdxl.tokenizer)
    assert len(seen["clip_l"]) == len(seen["clip_g"]) == 2
    assert result.crossattn.shape[1] == 154
