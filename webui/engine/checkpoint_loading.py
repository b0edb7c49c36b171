"""Single-file checkpoints → diffusers-layout weights per component, and the empty module skeletons they fill.
Family-specific conversion only (model_manager keeps models loaded); must not import gradio, fastapi, webui.app."""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from webui.engine.families import Family, TensorInfo, detect_family, read_safetensors_header
from webui.engine.model_registry import CHECKPOINT_SUFFIX, ModelInfo

CONFIG_SIDECAR_SUFFIX = ".config"
TEXT_MODEL_PREFIX = "text_model."
VAE_PREFIX = "first_stage_model."
# Component names, as in a diffusers pipeline folder; text_encoder_2 exists for SDXL only.
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

StateDict = dict[str, torch.Tensor]


class CheckpointLoadError(RuntimeError):
    """A checkpoint could not be loaded; the previously loaded model (if any) is still in place."""


@dataclass(slots=True)
class ModelComponents:
    """The torch modules of one model family, built from its configs (weights may be empty)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module | None = None

    def modules(self) -> dict[str, torch.nn.Module]:
        """Component name → module, for the components this family has."""
        named = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            named["text_encoder_2"] = self.text_encoder_2
        return named


@dataclass(slots=True)
class CheckpointWeights:
    """A checkpoint's weights in diffusers layout, one state dict per component, on the CPU at the file's dtype.

    `prediction_type` is None when the file and its configs cannot say (SD 2.x without a sidecar
    config): the loader then runs A1111's v-prediction test on the loaded UNet.
    """

    family: Family
    config_dir: Path
    state_dicts: dict[str, StateDict]
    alphas_cumprod: torch.Tensor
    prediction_type: str | None
    vae_scaling_factor: float


def sidecar_config_dir(checkpoint: Path) -> Path:
    """`<stem>.config/` beside the checkpoint: a diffusers pipeline config that overrides the shipped one."""
    return checkpoint.with_name(checkpoint.name.removesuffix(CHECKPOINT_SUFFIX) + CONFIG_SIDECAR_SUFFIX)


def config_dir_for(path: Path, family: Family) -> Path:
    sidecar = sidecar_config_dir(path)
    return sidecar if sidecar.is_dir() else family.config_dir


@dataclass(frozen=True, slots=True)
class CheckpointLayout:
    """What a checkpoint's header says, read once per load: its tensor table, family and config folder."""

    tensors: dict[str, TensorInfo]
    family: Family
    config_dir: Path


def inspect_checkpoint(info: ModelInfo) -> CheckpointLayout:
    """The header only (no weights): which family the file is and which configs build its modules."""
    tensors = read_safetensors_header(info.path)
    family = detect_family(info.path, tensors)
    return CheckpointLayout(tensors, family, config_dir_for(info.path, family))


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
    steps = int(cast(Any, scheduler_config.get("num_train_timesteps", 1000)))
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


def build_components(family: Family, config_dir: Path) -> ModelComponents:
    """Empty module skeletons for `family` from the configs in `config_dir` (no memory for weights yet).

    SD 2.x's text encoder is OpenCLIP-H as diffusers ships it: a CLIPTextModel with the last of the 24
    resblocks dropped, so its last_hidden_state is A1111's "penultimate layer + ln_final". SDXL adds
    OpenCLIP-bigG as text_encoder_2, a CLIPTextModelWithProjection with all its layers (pooled output).
    Which text encoders a family has, and which gives a pooled output, is the family's `text_encoders`.
    """
    # Imported here: diffusers takes seconds to import and the CLI's argument errors should not wait for it.
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        encoders = {
            spec.component: (CLIPTextModelWithProjection if spec.pooled else CLIPTextModel)(
                CLIPTextConfig.from_dict(read_component_config(config_dir, spec.component))
            )
            for spec in family.text_encoders
        }
        components = ModelComponents(
            unet=UNet2DConditionModel.from_config(read_component_config(config_dir, "unet")),
            vae=AutoencoderKL.from_config(read_component_config(config_dir, "vae")),
            text_encoder=encoders["text_encoder"],
            text_encoder_2=encoders.get("text_encoder_2"),
        )
    for module in components.modules().values():
        module.eval().requires_grad_(False)
    return components


# LDM key prefix → the diffusers component its tensors end up in (for choosing their dtype while reading).
_COMPONENT_OF_PREFIX = (
    ("model.diffusion_model.", "unet"),
    ("first_stage_model.", "vae"),
    ("cond_stage_model.", "text_encoder"),
    ("conditioner.", "text_encoder"),
)

DtypeOfComponent = Callable[[str], torch.dtype]
# safetensors' dtype names (the header's "dtype") → torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_tensors(
    info: ModelInfo, tensors: dict[str, TensorInfo], dtype_of: DtypeOfComponent | None = None
) -> StateDict:
    """Every tensor of the file, each copied (or converted to `dtype_of(component)`) out of a memory map
    straight into its own new tensor, one at a time, the map's pages released right after.

    Not safetensors' loader: its mapped pages stay counted in the process's resident memory until the
    file is closed, so RAM holds the file beside the converted model (measured 1.5x the model's size
    for SD 1.5 on CPU); reading with read() instead costs one more copy (measured +1.3 s for SD 1.5).
    `tensors` is the file's header, parsed and bounds-checked by read_safetensors_header.

    The time goes to the kernel mapping the new tensors' pages (an fp32 SD 1.5 is 4.3 GB of fresh memory),
    inside the one copy per tensor, which runs on all cores (torch's intra-op threads). Measured on 2 cores,
    neither mapping the pages ahead on another thread (madvise MADV_POPULATE_WRITE) nor building the module
    skeleton meanwhile made the load faster: the kernel maps pages for one thread at a time, and Python work
    beside the copies only takes their cores and the GIL.
    """
    checkpoint: StateDict = {}
    page = mmap.PAGESIZE
    with info.path.open("rb") as file:
        if info.path.stat().st_size == 0:
            return checkpoint
        # A private (copy-on-write) map is writable, as torch.frombuffer wants; nothing is ever written.
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            for key, entry in sorted(tensors.items(), key=lambda item: item[1].offset):
                file_dtype = SAFETENSORS_DTYPES.get(entry.dtype)
                if file_dtype is None:
                    raise CheckpointLoadError(f"{info.name}: tensor {key} has an unsupported dtype {entry.dtype}")
                count = math.prod(entry.shape)
                if count * file_dtype.itemsize != entry.nbytes:
                    raise CheckpointLoadError(
                        f"{info.name}: tensor {key} has {entry.nbytes} bytes for shape {entry.shape}"
                    )
                component = next((name for prefix, name in _COMPONENT_OF_PREFIX if key.startswith(prefix)), None)
                dtype = file_dtype
                if dtype_of is not None and component is not None and file_dtype.is_floating_point:
                    dtype = dtype_of(component)
                tensor = torch.empty(entry.shape, dtype=dtype)
                if count:
                    source = torch.frombuffer(mapped, dtype=file_dtype, count=count, offset=entry.offset)
                    tensor.view(-1).copy_(source)
                    del source  # no tensor may outlive the map
                    start = entry.offset - entry.offset % page
                    mapped.madvise(mmap.MADV_DONTNEED, start, entry.offset + entry.nbytes - start)
                checkpoint[key] = tensor
    return checkpoint


def _clip_l_text_encoder_weights(checkpoint: StateDict, prefix: str, text_encoder: torch.nn.Module) -> StateDict:
    """CLIP ViT-L in transformers' own names under `prefix` (SD 1.x and SDXL's first encoder)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    # Old SD 1.x fine-tunes store CLIP without the `text_model.` level; the converter expects it.
    for key in [k for k in checkpoint if k.startswith(prefix)]:
        if not key.startswith(prefix + TEXT_MODEL_PREFIX):
            checkpoint[key.replace(prefix, prefix + TEXT_MODEL_PREFIX, 1)] = checkpoint.pop(key)
    weights = convert_ldm_clip_checkpoint({k: v for k, v in checkpoint.items() if k.startswith(prefix)}, prefix)
    # transformers >= 5.6 flattened CLIPTextModel (no .text_model level); position_ids is a buffer.
    if not hasattr(text_encoder, "text_model"):
        weights = {k.removeprefix(TEXT_MODEL_PREFIX): v for k, v in weights.items()}
    return {k: v for k, v in weights.items() if not k.endswith("position_ids")}


def _resblock_index(key: str, prefix: str) -> int | None:
    resblocks = prefix + "transformer.resblocks."
    if not key.startswith(resblocks):
        return None
    return int(key[len(resblocks) :].split(".", 1)[0])


def _open_clip_text_encoder_weights(checkpoint: StateDict, prefix: str, text_encoder: torch.nn.Module) -> StateDict:
    """OpenCLIP's text tower under `prefix` (fused in_proj, resblocks, ln_final) in transformers' CLIP names.

    Only the resblocks the encoder has are taken: SD 2.x files hold 24, the diffusers encoder runs 23
    (A1111 stops at the penultimate one), and diffusers' converter only knows to drop "resblocks.23".
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    layers = int(cast(Any, text_encoder).config.num_hidden_layers)
    has_projection = hasattr(text_encoder, "text_projection")
    source: StateDict = {}
    for key, tensor in checkpoint.items():
        if not key.startswith(prefix):
            continue
        index = _resblock_index(key, prefix)
        if index is not None and index >= layers:
            continue
        if key == prefix + "text_projection" and not has_projection:
            continue
        source[key] = tensor
    weights = convert_open_clip_checkpoint(text_encoder, source, prefix=prefix)
    if not has_projection:
        weights.pop("text_projection.weight", None)
    if not hasattr(text_encoder, "text_model"):
        weights = {k.removeprefix(TEXT_MODEL_PREFIX): v for k, v in weights.items()}
    return weights


def _text_encoder_weights(family: Family, checkpoint: StateDict, skeleton: ModelComponents) -> dict[str, StateDict]:
    """Each of the family's text encoders from its key prefix, in the layout (CLIP or OpenCLIP) the family stores."""
    modules = skeleton.modules()
    weights: dict[str, StateDict] = {}
    for spec in family.text_encoders:
        module = modules.get(spec.component)
        if module is None:
            raise CheckpointLoadError(f"{family.label} needs {spec.component} in its config")
        convert = _open_clip_text_encoder_weights if spec.open_clip else _clip_l_text_encoder_weights
        weights[spec.component] = convert(checkpoint, spec.checkpoint_prefix, module)
    return weights


def read_checkpoint(
    info: ModelInfo,
    skeleton: ModelComponents | None = None,
    dtype_of: DtypeOfComponent | None = None,
    layout: CheckpointLayout | None = None,
) -> CheckpointWeights:
    """Every component's weights of one single-file checkpoint, converted to diffusers names.

    `skeleton` (modules built for this family and config) supplies the configs the converters need;
    without it a skeleton is built on the meta device just for that. `dtype_of(component)` gives the
    dtype each component's weights are converted to while reading (default: the file's). `layout` is
    the header already read by the caller (inspect_checkpoint), if any.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    layout = layout if layout is not None else inspect_checkpoint(info)
    family, config_dir = layout.family, layout.config_dir
    if skeleton is None:
        skeleton = build_components(family, config_dir)
    scheduler_config = read_component_config(config_dir, "scheduler")
    vae_config = read_component_config(config_dir, "vae")
    checkpoint = _read_tensors(info, layout.tensors, dtype_of)
    try:
        state_dicts = {
            "unet": convert_ldm_unet_checkpoint(checkpoint, skeleton.unet.config),
            "vae": convert_ldm_vae_checkpoint(checkpoint, skeleton.vae.config),
            **_text_encoder_weights(family, checkpoint, skeleton),
        }
    except (KeyError, IndexError, ValueError, RuntimeError) as error:
        raise CheckpointLoadError(
            f"{info.name}: the weights do not match the {family.label} layout ({error!r})"
        ) from error
    if "alphas_cumprod" in checkpoint:
        alphas_cumprod = checkpoint["alphas_cumprod"].to(torch.float32)
    else:
        alphas_cumprod = alphas_cumprod_from_config(scheduler_config)
    # The converted dicts share the tensors read; dropping the raw dict leaves exactly one reference to each.
    checkpoint.clear()
    return CheckpointWeights(
        family=family,
        config_dir=config_dir,
        state_dicts=state_dicts,
        alphas_cumprod=alphas_cumprod,
        prediction_type=family.prediction_type(config_dir, scheduler_config),
        vae_scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),  # type: ignore[arg-type]
    )


def read_checkpoint_vae(info: ModelInfo, vae: torch.nn.Module) -> StateDict:
    """Only the checkpoint's own VAE weights (reads just those tensors), to switch back from an external VAE."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors import safe_open

    try:
        with safe_open(str(info.path), framework="pt", device="cpu") as file:
            raw = {key: file.get_tensor(key) for key in file.keys() if key.startswith(VAE_PREFIX)}
    except Exception as error:
        raise CheckpointLoadError(f"{info.name}: cannot read the VAE weights ({error})") from error
    try:
        return convert_ldm_vae_checkpoint(raw, vae.config)
    except (KeyError, IndexError, ValueError, RuntimeError) as error:
        raise CheckpointLoadError(f"{info.name}: the VAE weights do not fit ({error!r})") from error


def read_vae_file(path: Path, vae: torch.nn.Module) -> StateDict:
    """An external VAE file (A1111's models/VAE): LDM keys with or without `first_stage_model.`, or diffusers keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path), device="cpu")
    except Exception as error:
        raise CheckpointLoadError(f"VAE: cannot read {path.name} ({error})") from error
    if any(key.startswith("decoder.up_blocks.") for key in raw):
        return raw
    unprefixed = {key.removeprefix(VAE_PREFIX): value for key, value in raw.items()}
    if not any(key.startswith("decoder.") for key in unprefixed):
        raise CheckpointLoadError(f"VAE: {path.name} holds no VAE decoder weights (decoder.*): not a VAE file")
    prefixed = {VAE_PREFIX + key: value for key, value in unprefixed.items() if not key.startswith("model_ema.")}
    try:
        return convert_ldm_vae_checkpoint(prefixed, vae.config)
    except (KeyError, IndexError, ValueError, RuntimeError) as error:
        raise CheckpointLoadError(f"VAE: {path.name} does not fit this model's VAE ({error!r})") from error


def check_fits(module: torch.nn.Module, state_dict: StateDict, what: str, checkpoint: str) -> None:
    """Raise CheckpointLoadError unless `state_dict` has exactly the module's tensor names and shapes."""
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


def is_v_prediction(unet: torch.nn.Module) -> bool:
    """A1111's SD 2.x test: a v-prediction UNet at t=999 on a constant input pulls the output well below it."""
    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    config = cast(Any, unet).config  # diffusers' FrozenDict (untyped on nn.Module)
    cross_attention_dim = int(config.cross_attention_dim)
    in_channels = int(config.in_channels)
    with torch.inference_mode():
        x_test = torch.full((1, in_channels, 8, 8), 0.5, device=device, dtype=dtype)
        context = torch.full((1, 2, cross_attention_dim), 0.5, device=device, dtype=dtype)
        timestep = torch.tensor([999], device=device)
        out = unet(x_test, timestep, encoder_hidden_states=context).sample
        return float((out.float() - x_test.float()).mean()) < -1.0
