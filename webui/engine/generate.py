"""One txt2img job on a loaded model: prompts → conditioning → sampling → VAE → images with infotext.
Must not import gradio, fastapi or webui.app; saving files is the caller's job."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from webui.core.events import JobControl, Progress
from webui.core.extra_networks import ExtraNetworkSyntaxError, format_hashes, parse_extra_networks
from webui.core.hooks import (
    BeforeGenerationContext,
    BeforeSaveContext,
    CfgContext,
    ConditioningContext,
    HookPoint,
    Hooks,
    ImageContext,
    NoHooks,
    StepContext,
    WeightPatchesContext,
    WeightPatchSpec,
)
from webui.core.infotext import build_infotext
from webui.core.params import GenerationParams, ParamError, image_seeds
from webui.core.prompt_parser import get_prompt_schedule, prompt_at_step, strip_comments
from webui.core.samplers import resolved_schedule_label
from webui.engine import k_sampling
from webui.engine.conditioning import clip_skip_limit, encode_for_family, zeroes_empty_negative_prompt
from webui.engine.model_manager import LoadedModel
from webui.engine.networks.activation import ExtraNetworks, JobNetworks
from webui.engine.networks.textual_inversion import EmbeddingLookup
from webui.engine.patches import ExtensionPatch, WeightPatch, patched
from webui.engine.rng import ImageRNG
from webui.engine.unet_eps import UNetEps
from webui.engine.vae import decode_latent, to_pil

LATENT_CHANNELS = 4
LATENT_SCALE = 8


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """A decoded picture, the seed it came from and its A1111 infotext."""

    image: Image.Image
    seed: int
    infotext: str


@dataclass(frozen=True, slots=True)
class SamplingPlan:
    """What a job's sampling passes need, worked out once by `generate` before the model is patched.

    `prompt` is the text the text encoder sees (network tags taken out); `written_params` the parameters the
    infotext records (comments stripped, tags kept). `schedule_steps` counts denoiser calls for prompt editing.
    """

    model: LoadedModel
    params: GenerationParams
    written_params: GenerationParams
    version: str
    control: JobControl
    hooks: Hooks
    prompt: str
    negative_prompt: str
    embeddings: EmbeddingLookup | None
    infotext_fields: dict[str, str]
    schedule_steps: int
    seeds: list[int]
    latent_shape: tuple[int, int, int]
    on_progress: Callable[[Progress], None] | None
    on_denoised: Callable[[Progress, torch.Tensor], None] | None


class SamplingStopped(Exception):
    """Raised inside the denoiser when the job was interrupted or the batch skipped."""


class PromptConditioning:
    """Each distinct scheduled text of a prompt encoded once per job; picked per denoiser call.

    `embeddings` holds the cross-attention context per text, `pooled` SDXL's pooled text vector per text.
    The `embeddings` argument is the textual-inversion lookup the texts are matched against (None: none).
    """

    def __init__(
        self,
        model: LoadedModel,
        field: str,
        prompt: str,
        steps: int,
        clip_skip: int,
        emphasis: str,
        *,
        negative: bool = False,
        embeddings: EmbeddingLookup | None = None,
    ) -> None:
        self.schedule = get_prompt_schedule(prompt, steps)
        self.embeddings: dict[str, torch.Tensor] = {}
        self.pooled: dict[str, torch.Tensor] = {}
        self._used_embeddings: dict[str, None] = {}
        # A1111 (SDXL): a negative prompt that is empty at every step conditions on zeros, not on "".
        zeroed = (
            negative and zeroes_empty_negative_prompt(model.family) and all(text == "" for _, text in self.schedule)
        )
        for _, text in self.schedule:
            if text in self.embeddings:
                continue
            try:
                encoded = encode_for_family(
                    model.family, [text], model.text_encoder, model.text_encoder_2, model.tokenizer, clip_skip,
                    emphasis, embeddings,
                )
            except ValueError as error:  # e.g. an unreadable emphasis weight "(x:1.2.3)"
                raise ParamError(field, str(error)) from None
            if zeroed:
                encoded = encoded.zeroed()
            self.embeddings[text] = encoded.crossattn.to(model.policy.unet_dtype)
            if encoded.pooled is not None:
                self.pooled[text] = encoded.pooled.to(model.policy.unet_dtype)
            self._used_embeddings.update(dict.fromkeys(encoded.embeddings_used))

    @property
    def used_embeddings(self) -> tuple[str, ...]:
        """Names of the textual-inversion embeddings any scheduled text used, in order of first use (`TI hashes`)."""
        return tuple(self._used_embeddings)

    def at(self, denoiser_call: int) -> torch.Tensor:
        return self.embeddings[prompt_at_step(self.schedule, denoiser_call)]

    def pooled_at(self, denoiser_call: int) -> torch.Tensor | None:
        return self.pooled.get(prompt_at_step(self.schedule, denoiser_call))


def check_params_fit_model(params: GenerationParams, model: LoadedModel) -> None:
    """Limits that depend on the loaded model rather than on A1111's UI ranges."""
    layers = clip_skip_limit(model.family, model.text_encoder)
    if layers is not None and params.clip_skip > layers:
        raise ParamError("clip_skip", f"must be at most {layers} for {model.info.stem}, got {params.clip_skip}")


def make_eps_model(
    model: LoadedModel,
    cond: PromptConditioning,
    uncond: PromptConditioning,
    cfg_scale: float,
    control: JobControl,
    hooks: Hooks | None = None,
    params: GenerationParams | None = None,
    *,
    timestep_sampler: bool,
    image_size: tuple[int, int],
) -> k_sampling.EpsModel:
    """The UNet with classifier-free guidance, prompt editing and the interrupt/skip check.

    `timestep_sampler` (DDIM/UniPC) and `image_size` (height, width) are what a v-prediction or SDXL UNet
    needs to know beyond x and t.
    """
    denoiser_calls = 0
    unet_eps = UNetEps(model, timestep_sampler, image_size)
    wants_cfg_hooks = hooks is not None and params is not None and hooks.has(HookPoint.CFG)
    cfg_hooks = CfgHooks(hooks, params, unet_eps.schedule) if wants_cfg_hooks else None  # type: ignore[arg-type]

    def eps_model(x_in: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        nonlocal denoiser_calls
        if control.interrupted or control.skipped:
            raise SamplingStopped
        batch = x_in.shape[0]
        cond_embedding = cond.at(denoiser_calls).expand(batch, -1, -1)
        uncond_embedding = uncond.at(denoiser_calls).expand(batch, -1, -1)
        cond_pooled, uncond_pooled = cond.pooled_at(denoiser_calls), uncond.pooled_at(denoiser_calls)
        if cond_pooled is not None and uncond_pooled is not None:
            cond_pooled, uncond_pooled = cond_pooled.expand(batch, -1), uncond_pooled.expand(batch, -1)
        denoiser_calls += 1
        if cond_embedding.shape[1] == uncond_embedding.shape[1]:
            both_pooled = None if cond_pooled is None or uncond_pooled is None else torch.cat([cond_pooled, uncond_pooled])
            eps = unet_eps(
                torch.cat([x_in, x_in]),
                torch.cat([timesteps, timesteps]),
                torch.cat([cond_embedding, uncond_embedding]),
                both_pooled,
            )
            eps_cond, eps_uncond = eps.chunk(2)
        else:
            # Different token lengths (e.g. 154 vs 77): A1111 runs cond and uncond as separate batches.
            eps_cond = unet_eps(x_in, timesteps, cond_embedding, cond_pooled)
            eps_uncond = unet_eps(x_in, timesteps, uncond_embedding, uncond_pooled)
        guided = eps_uncond + cfg_scale * (eps_cond - eps_uncond)
        if cfg_hooks is not None:
            guided = cfg_hooks(x_in, timesteps, eps_cond, eps_uncond, cfg_scale, guided, denoiser_calls - 1)
        return guided

    return eps_model


# -- extension hooks (webui.core.hooks): each call site below is one line in generate() ----------------------


class CfgHooks:
    """Runs HookPoint.CFG on one denoiser call; the noise level is derived from the UNet timestep."""

    def __init__(self, hooks: Hooks, params: GenerationParams, schedule: k_sampling.DiscreteSchedule) -> None:
        self.hooks = hooks
        self.params = params
        self.schedule = schedule

    def __call__(
        self, x: torch.Tensor, timesteps: torch.Tensor, cond_pred: torch.Tensor, uncond_pred: torch.Tensor,
        cfg_scale: float, guided: torch.Tensor, call_index: int,
    ) -> torch.Tensor:
        sigma = self.schedule.t_to_sigma(timesteps.to(self.schedule.sigmas.device, torch.float32)).to(x.device)
        context = CfgContext(self.params, x, sigma, cond_pred, uncond_pred, cfg_scale, guided, call_index)
        self.hooks.run(HookPoint.CFG, context)
        if not isinstance(context.guided, torch.Tensor) or context.guided.shape != guided.shape:
            return guided  # a hook that broke the tensor is ignored rather than failing the job
        return context.guided


def run_before_generation(
    hooks: Hooks, params: GenerationParams, seed: int
) -> tuple[GenerationParams, dict[str, str]]:
    """HookPoint.BEFORE_GENERATION: the (possibly rewritten, re-validated) params and the job's infotext fields."""
    if not hooks.has(HookPoint.BEFORE_GENERATION):
        return params, {}
    context = BeforeGenerationContext(params, seed)
    hooks.run(HookPoint.BEFORE_GENERATION, context)
    return context.params.validated(), dict(context.infotext_fields)


def run_image_hooks(
    hooks: Hooks, params: GenerationParams, seed: int, image: Image.Image, job_fields: dict[str, str]
) -> tuple[Image.Image, dict[str, str]]:
    """HookPoint.IMAGE then HookPoint.BEFORE_SAVE for one decoded image: the image and its extra infotext fields."""
    if hooks.has(HookPoint.IMAGE):
        image_context = ImageContext(params, seed, image)
        hooks.run(HookPoint.IMAGE, image_context)
        if isinstance(image_context.image, Image.Image):
            image = image_context.image
    fields = dict(job_fields)
    if hooks.has(HookPoint.BEFORE_SAVE):
        hooks.run(HookPoint.BEFORE_SAVE, BeforeSaveContext(params, seed, image, fields))
    return image, fields


def extension_patches(hooks: Hooks, params: GenerationParams, model: LoadedModel) -> list[WeightPatch]:
    """HookPoint.WEIGHT_PATCHES: the extensions' weight patches for this job, merged like the job's LoRAs."""
    if not hooks.has(HookPoint.WEIGHT_PATCHES):
        return []
    context = WeightPatchesContext(params, model.family.key)
    hooks.run(HookPoint.WEIGHT_PATCHES, context)
    return [ExtensionPatch(spec) for spec in context.patches if isinstance(spec, WeightPatchSpec)]


def generate(
    model: LoadedModel,
    params: GenerationParams,
    first_seed: int,
    version: str,
    control: JobControl | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_denoised: Callable[[Progress, torch.Tensor], None] | None = None,
    hooks: Hooks | None = None,
    *,
    embeddings: EmbeddingLookup | None = None,
    networks: ExtraNetworks | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> Iterator[list[GeneratedImage]]:
    """Yield each batch's images as soon as they are decoded; stop early on interrupt, skip a batch on skip.

    `on_denoised` gets each step's x0 prediction (the batch's latents) for live previews. `hooks` are the
    extensions' hook points (webui.core.hooks); none by default.
    """
    hooks = hooks or NoHooks()
    params, job_infotext_fields = run_before_generation(hooks, params.validated(), first_seed)
    check_params_fit_model(params, model)
    control = control or JobControl()
    sampler, _ = params.sampler_and_schedule()
    # A1111 times prompt editing in denoiser calls, which second-order samplers make twice per step.
    schedule_steps = params.steps * 2 if sampler.second_order else params.steps
    prompt = strip_comments(params.prompt)
    negative_prompt = strip_comments(params.negative_prompt)
    # The infotext carries the prompt after comments are stripped, as A1111 writes it.
    written_params = params.replace(prompt=prompt, negative_prompt=negative_prompt)
    seeds = image_seeds(first_seed, params.image_count)
    latent_shape = (LATENT_CHANNELS, params.height // LATENT_SCALE, params.width // LATENT_SCALE)

    # A1111: tags come out of the positive prompt only (a tag in the negative prompt is plain text); the
    # infotext keeps them in the prompt.
    try:
        encoded_prompt, network_calls = parse_extra_networks(prompt)
    except ExtraNetworkSyntaxError as error:
        raise ParamError("prompt", str(error)) from None
    job_networks = (
        networks.for_job(network_calls, model.family, model.named_modules()) if networks is not None else JobNetworks()
    )
    warnings = list(job_networks.warnings)
    patches = [*job_networks.patches, *extension_patches(hooks, params, model)]
    with patched(model, patches) as failures:
        warnings += [f"{failure.label} not applied: {failure.reason}" for failure in failures]
        if on_warning is not None:
            for warning in warnings:
                on_warning(warning)
        yield from _sample_batches(SamplingPlan(
            model=model, params=params, written_params=written_params, version=version, control=control,
            hooks=hooks, prompt=encoded_prompt, negative_prompt=negative_prompt, embeddings=embeddings,
            infotext_fields={**job_infotext_fields, **job_networks.infotext_fields}, schedule_steps=schedule_steps,
            seeds=seeds, latent_shape=latent_shape, on_progress=on_progress, on_denoised=on_denoised,
        ))


def _sample_batches(plan: SamplingPlan) -> Iterator[list[GeneratedImage]]:
    """Encode the prompts once, then sample and decode each batch of the plan (on the already patched model)."""
    model, params, control, hooks, embeddings = plan.model, plan.params, plan.control, plan.hooks, plan.embeddings
    on_progress, on_denoised, seeds, latent_shape = plan.on_progress, plan.on_denoised, plan.seeds, plan.latent_shape
    job_infotext_fields = plan.infotext_fields
    sampler, schedule = params.sampler_and_schedule()
    schedule_label = resolved_schedule_label(sampler, schedule)
    device = model.policy.device
    with torch.inference_mode():
        encode_options = (plan.schedule_steps, params.clip_skip, params.emphasis)
        cond = PromptConditioning(model, "prompt", plan.prompt, *encode_options, embeddings=embeddings)
        uncond = PromptConditioning(
            model, "negative_prompt", plan.negative_prompt, *encode_options, negative=True, embeddings=embeddings
        )
        ti_hashes = {
            name: embeddings.embeddings[name].short_hash
            for name in dict.fromkeys((*cond.used_embeddings, *uncond.used_embeddings))
            if embeddings is not None and name in embeddings.embeddings
        }
        if ti_hashes:
            job_infotext_fields = {**job_infotext_fields, "TI hashes": format_hashes(ti_hashes)}
        if hooks.has(HookPoint.CONDITIONING):
            hooks.run(HookPoint.CONDITIONING, ConditioningContext(params, cond.embeddings, uncond.embeddings))
        for batch_index in range(params.batch_count):
            if control.interrupted:
                return
            control.clear_skip()
            batch_seeds = seeds[batch_index * params.batch_size : (batch_index + 1) * params.batch_size]
            rng = ImageRNG(latent_shape, batch_seeds, params.rng_source, device)

            # The latest x0 prediction: what an interrupted or skipped batch is decoded from, as in A1111.
            last_denoised: list[torch.Tensor] = []

            def report_step(step: k_sampling.StepInfo, batch_index: int = batch_index,
                            last_denoised: list[torch.Tensor] = last_denoised) -> None:
                last_denoised[:] = [step.denoised]
                progress = Progress(step.step + 1, step.total_steps, batch_index, params.batch_count)
                if on_progress is not None:
                    on_progress(progress)
                if on_denoised is not None:
                    on_denoised(progress, step.denoised)
                if hooks.has(HookPoint.STEP):
                    step_context = StepContext(params, step.step, step.total_steps, step.x, step.denoised, step.sigma)
                    hooks.run(HookPoint.STEP, step_context)

            eps_model = make_eps_model(
                model, cond, uncond, params.cfg_scale, control, hooks, params,
                timestep_sampler=sampler.timestep_sampler, image_size=(params.height, params.width),
            )
            try:
                latents = k_sampling.sample(
                    sampler, schedule_label, params.steps, eps_model, model.alphas_cumprod.to(device),
                    rng, batch_seeds, report_step,
                )
            except SamplingStopped:
                # A1111 decodes and saves the picture so far (its sampler returns the last x0 prediction); before
                # the first step there is nothing to show.
                if not last_denoised:
                    if control.interrupted:
                        return
                    continue
                latents = last_denoised[0]
            images: list[GeneratedImage] = []
            for index, seed in enumerate(batch_seeds):
                pixels = decode_latent(model.vae, latents[index : index + 1], model.vae_scaling_factor)
                image, extra_fields = run_image_hooks(hooks, params, seed, to_pil(pixels), job_infotext_fields)
                infotext = build_infotext(
                    plan.written_params, seed, model.info.stem, model.short_hash, plan.version, extra_fields,
                    vae_name=model.vae_name, vae_hash=model.vae_hash,
                )
                images.append(GeneratedImage(image, seed, infotext))
            yield images
            if control.interrupted:
                return
