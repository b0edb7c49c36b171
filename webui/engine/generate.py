"""One txt2img job on a loaded model: prompts → conditioning → sampling → VAE → images with infotext.
Must not import gradio, fastapi or webui.app; saving files is the caller's job."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from webui.core.events import JobControl, Progress
from webui.core.infotext import build_infotext
from webui.core.params import GenerationParams, ParamError, image_seeds
from webui.core.prompt_parser import get_prompt_schedule, prompt_at_step, strip_comments
from webui.core.samplers import resolved_schedule_label
from webui.engine import k_sampling
from webui.engine.conditioning import encode_prompts
from webui.engine.model_manager import LoadedModel
from webui.engine.rng import ImageRNG
from webui.engine.vae import decode_latent, to_pil

LATENT_CHANNELS = 4
LATENT_SCALE = 8


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """A decoded picture, the seed it came from and its A1111 infotext."""

    image: Image.Image
    seed: int
    infotext: str


class SamplingStopped(Exception):
    """Raised inside the denoiser when the job was interrupted or the batch skipped."""


class PromptConditioning:
    """Each distinct scheduled text of a prompt encoded once per job; picked per denoiser call."""

    def __init__(
        self, model: LoadedModel, field: str, prompt: str, steps: int, clip_skip: int, emphasis: str
    ) -> None:
        self.schedule = get_prompt_schedule(prompt, steps)
        self.embeddings: dict[str, torch.Tensor] = {}
        for _, text in self.schedule:
            if text in self.embeddings:
                continue
            try:
                encoded = encode_prompts([text], model.text_encoder, model.tokenizer, clip_skip, emphasis)
            except ValueError as error:  # e.g. an unreadable emphasis weight "(x:1.2.3)"
                raise ParamError(field, str(error)) from None
            self.embeddings[text] = encoded.to(model.policy.unet_dtype)

    def at(self, denoiser_call: int) -> torch.Tensor:
        return self.embeddings[prompt_at_step(self.schedule, denoiser_call)]


def check_params_fit_model(params: GenerationParams, model: LoadedModel) -> None:
    """Limits that depend on the loaded model rather than on A1111's UI ranges."""
    layers = int(model.text_encoder.config.num_hidden_layers)
    if params.clip_skip > layers:
        raise ParamError("clip_skip", f"must be at most {layers} for {model.info.stem}, got {params.clip_skip}")


def make_eps_model(
    model: LoadedModel,
    cond: PromptConditioning,
    uncond: PromptConditioning,
    cfg_scale: float,
    control: JobControl,
) -> k_sampling.EpsModel:
    """The UNet with classifier-free guidance, prompt editing and the interrupt/skip check."""
    denoiser_calls = 0

    def eps_model(x_in: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        nonlocal denoiser_calls
        if control.interrupted or control.skipped:
            raise SamplingStopped
        batch = x_in.shape[0]
        cond_embedding = cond.at(denoiser_calls).expand(batch, -1, -1)
        uncond_embedding = uncond.at(denoiser_calls).expand(batch, -1, -1)
        denoiser_calls += 1
        x_unet = x_in.to(model.policy.unet_dtype)
        if cond_embedding.shape[1] == uncond_embedding.shape[1]:
            eps = model.unet(
                torch.cat([x_unet, x_unet]),
                torch.cat([timesteps, timesteps]),
                encoder_hidden_states=torch.cat([cond_embedding, uncond_embedding]),
            ).sample.float()
            eps_cond, eps_uncond = eps.chunk(2)
        else:
            # Different token lengths (e.g. 154 vs 77): A1111 runs cond and uncond as separate batches.
            eps_cond = model.unet(x_unet, timesteps, encoder_hidden_states=cond_embedding).sample.float()
            eps_uncond = model.unet(x_unet, timesteps, encoder_hidden_states=uncond_embedding).sample.float()
        return eps_uncond + cfg_scale * (eps_cond - eps_uncond)

    return eps_model


def generate(
    model: LoadedModel,
    params: GenerationParams,
    first_seed: int,
    version: str,
    control: JobControl | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_denoised: Callable[[Progress, torch.Tensor], None] | None = None,
) -> Iterator[list[GeneratedImage]]:
    """Yield each batch's images as soon as they are decoded; stop early on interrupt, skip a batch on skip.

    `on_denoised` gets each step's x0 prediction (the batch's latents) for live previews.
    """
    params = params.validated()
    check_params_fit_model(params, model)
    control = control or JobControl()
    sampler, schedule = params.sampler_and_schedule()
    schedule_label = resolved_schedule_label(sampler, schedule)
    # A1111 times prompt editing in denoiser calls, which second-order samplers make twice per step.
    schedule_steps = params.steps * 2 if sampler.second_order else params.steps
    prompt = strip_comments(params.prompt)
    negative_prompt = strip_comments(params.negative_prompt)
    # The infotext carries the prompt after comments are stripped, as A1111 writes it.
    written_params = params.replace(prompt=prompt, negative_prompt=negative_prompt)
    seeds = image_seeds(first_seed, params.image_count)
    latent_shape = (LATENT_CHANNELS, params.height // LATENT_SCALE, params.width // LATENT_SCALE)
    device = model.policy.device

    with torch.inference_mode():
        encode_options = (schedule_steps, params.clip_skip, params.emphasis)
        cond = PromptConditioning(model, "prompt", prompt, *encode_options)
        uncond = PromptConditioning(model, "negative_prompt", negative_prompt, *encode_options)
        for batch_index in range(params.batch_count):
            if control.interrupted:
                return
            control.clear_skip()
            batch_seeds = seeds[batch_index * params.batch_size : (batch_index + 1) * params.batch_size]
            rng = ImageRNG(latent_shape, batch_seeds, params.rng_source, device)

            def report_step(step: k_sampling.StepInfo, batch_index: int = batch_index) -> None:
                progress = Progress(step.step + 1, step.total_steps, batch_index, params.batch_count)
                if on_progress is not None:
                    on_progress(progress)
                if on_denoised is not None:
                    on_denoised(progress, step.denoised)

            eps_model = make_eps_model(model, cond, uncond, params.cfg_scale, control)
            try:
                latents = k_sampling.sample(
                    sampler, schedule_label, params.steps, eps_model, model.alphas_cumprod.to(device),
                    rng, batch_seeds, report_step,
                )
            except SamplingStopped:
                if control.interrupted:
                    return
                continue
            images: list[GeneratedImage] = []
            for index, seed in enumerate(batch_seeds):
                pixels = decode_latent(model.vae, latents[index : index + 1], model.vae_scaling_factor)
                infotext = build_infotext(written_params, seed, model.info.stem, model.short_hash, version)
                images.append(GeneratedImage(to_pil(pixels), seed, infotext))
            yield images
