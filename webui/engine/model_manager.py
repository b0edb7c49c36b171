"""Loading SD 1.x single-file checkpoints into diffusers modules, and keeping one model loaded.
Called only from the generating thread; must not import gradio, fastapi or webui.app."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from webui.engine.clip_tokenizer import ClipTokenizer
from webui.engine.devices import DevicePolicy, empty_cache
from webui.engine.families import Family, detect_family, read_safetensors_header
from webui.engine.model_registry import CHECKPOINT_SUFFIX, ModelInfo, ModelRegistry

logger = logging.getLogger(__name__)

CONFIG_SIDECAR_SUFFIX = ".config"
TEXT_MODEL_PREFIX = "text_model."


class CheckpointLoadError(RuntimeError):
    """A checkpoint could not be loaded; the previously loaded model (if any) is still in place."""


@dataclass(slots=True)
class LoadedModel:
    """The modules of one loaded checkpoint and what generation needs to know about it."""

    info: ModelInfo
    short_hash: str
    family: Family
    config_dir: Path
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: ClipTokenizer
    alphas_cumprod: torch.Tensor
    vae_scaling_factor: float
    policy: DevicePolicy


def sidecar_config_dir(checkpoint: Path) -> Path:
    """`<stem>.config/` beside the checkpoint: a diffusers pipeline config that overrides the shipped one."""
    return checkpoint.with_name(checkpoint.name.removesuffix(CHECKPOINT_SUFFIX) + CONFIG_SIDECAR_SUFFIX)


def read_component_config(config_dir: Path, component: str) -> dict[str, object]:
    filename = "scheduler_config.json" if component == "scheduler" else "config.json"
    path = config_dir / component / filename
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointLoadError(f"config: {path} is missing") from None
    except json.JSONDecodeError as error:
        raise CheckpointLoadError(f"config: {path} is not valid JSON ({error})") from None


def alphas_cumprod_from_config(scheduler_config: dict[str, object]) -> torch.Tensor:
    """ᾱ as LDM computes it (float64 arithmetic, stored as float32), for files that do not carry it."""
    steps = int(scheduler_config.get("num_train_timesteps", 1000))  # type: ignore[arg-type]
    beta_start = float(scheduler_config.get("beta_start", 0.00085))  # type: ignore[arg-type]
    beta_end = float(scheduler_config.get("beta_end", 0.012))  # type: ignore[arg-type]
    schedule = scheduler_config.get("beta_schedule", "scaled_linear")
    if schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    else:
        raise CheckpointLoadError(f"config: unsupported beta_schedule {schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def _load_module(
    module: torch.nn.Module, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, what: str, checkpoint: str
) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointLoadError(
            f"{checkpoint}: the {what} weights do not fit its config "
            f"(missing {len(missing)} e.g. {missing[:3]}, unexpected {len(unexpected)} e.g. {unexpected[:3]})"
        )
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointLoadError(
                f"{checkpoint}: {what} tensor {name} has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(expected[name].shape)}"
            )
    converted = {name: tensor.to(dtype) for name, tensor in state_dict.items()}
    module.load_state_dict(converted, strict=True, assign=True)


def load_checkpoint(info: ModelInfo, short_hash: str, policy: DevicePolicy) -> LoadedModel:
    """Read one SD 1.x single-file checkpoint with diffusers' LDM converters and the family config."""
    # Imported here: diffusers takes seconds to import and the CLI's argument errors should not wait for it.
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    family = detect_family(info.path, read_safetensors_header(info.path))
    sidecar = sidecar_config_dir(info.path)
    config_dir = sidecar if sidecar.is_dir() else family.config_dir
    unet_config = read_component_config(config_dir, "unet")
    vae_config = read_component_config(config_dir, "vae")
    text_config = read_component_config(config_dir, "text_encoder")
    scheduler_config = read_component_config(config_dir, "scheduler")

    try:
        checkpoint = load_file(str(info.path), device="cpu")
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointLoadError(f"{info.name}: cannot read the file ({error})") from error
    # Old SD 1.x fine-tunes store CLIP without the `text_model.` level; the converters expect it.
    for key in [k for k in checkpoint if k.startswith("cond_stage_model.transformer.")]:
        if not key.startswith("cond_stage_model.transformer.text_model."):
            new_key = key.replace("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.", 1)
            checkpoint[new_key] = checkpoint.pop(key)

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(text_config))
    try:
        unet_weights = convert_ldm_unet_checkpoint(checkpoint, unet.config)
        vae_weights = convert_ldm_vae_checkpoint(checkpoint, vae.config)
        text_weights = convert_ldm_clip_checkpoint(checkpoint)
    except (KeyError, IndexError, ValueError, RuntimeError) as error:
        raise CheckpointLoadError(f"{info.name}: the weights do not match an SD 1.x layout ({error!r})") from error
    # transformers >= 5.6 flattened CLIPTextModel (no .text_model level); position_ids is a buffer.
    if not hasattr(text_encoder, "text_model"):
        text_weights = {k.removeprefix(TEXT_MODEL_PREFIX): v for k, v in text_weights.items()}
    text_weights = {k: v for k, v in text_weights.items() if not k.endswith("position_ids")}

    _load_module(unet, unet_weights, policy.unet_dtype, "UNet", info.name)
    _load_module(vae, vae_weights, policy.vae_dtype, "VAE", info.name)
    _load_module(text_encoder, text_weights, policy.text_encoder_dtype, "text encoder", info.name)

    if "alphas_cumprod" in checkpoint:
        alphas_cumprod = checkpoint["alphas_cumprod"].to(torch.float32).clone()
    else:
        alphas_cumprod = alphas_cumprod_from_config(scheduler_config)
    del checkpoint

    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False).to(policy.device)
    scaling_factor = float(vae_config.get("scaling_factor", 0.18215))  # type: ignore[arg-type]
    return LoadedModel(
        info=info,
        short_hash=short_hash,
        family=family,
        config_dir=config_dir,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=ClipTokenizer(),
        alphas_cumprod=alphas_cumprod,
        vae_scaling_factor=scaling_factor,
        policy=policy,
    )


class ModelManager:
    """Holds the loaded model; a failed load leaves the previous one loaded and generating."""

    def __init__(self, registry: ModelRegistry, policy: DevicePolicy) -> None:
        self.registry = registry
        self.policy = policy
        self.current: LoadedModel | None = None

    def ensure(self, query: str | None, allow_outside_paths: bool = False) -> LoadedModel:
        """The model for `query` (None: the loaded one, else the first checkpoint), loading it if needed."""
        if query is None:
            if self.current is not None:
                return self.current
            models = self.registry.scan()
            if not models:
                raise CheckpointLoadError(f"checkpoint: no checkpoint found; {self.registry.where_to_put_checkpoints()}")
            info = models[0]
        else:
            info = self.registry.resolve(query, allow_outside_paths=allow_outside_paths)
        current = self.current
        if current is not None and (current.info.path, current.info.mtime) == (info.path, info.mtime):
            return current
        logger.info("loading checkpoint %s", info.name)
        try:
            loaded = load_checkpoint(info, self.registry.short_hash(info), self.policy)
        except torch.cuda.OutOfMemoryError as error:
            empty_cache(self.policy.device)
            raise CheckpointLoadError(f"{info.name}: out of GPU memory while loading") from error
        self.current = loaded
        if current is not None:
            empty_cache(self.policy.device)
        return loaded

    def unload(self) -> ModelInfo | None:
        """Drop the loaded model and free its memory; returns what was loaded, so it can be reloaded."""
        current, self.current = self.current, None
        if current is None:
            return None
        info = current.info
        del current  # the last reference: the modules are freed before the cache is emptied
        empty_cache(self.policy.device)
        return info
