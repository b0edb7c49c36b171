"""Model families: detection from safetensors header keys and shapes, and one class per family owning what differs
(configs, text encoders, pooled/time ids, preview colours, LoRA/TI key names). Must not import diffusers, gradio or
webui.app at module level; methods that need torch or the conditioning code import it when called."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch

    from webui.engine.clip_tokenizer import ClipTokenizer
    from webui.engine.conditioning import TextConditioning
    from webui.engine.networks.textual_inversion import EmbeddingLookup

CONFIGS_DIR = Path(__file__).parent / "configs"
# A safetensors header is JSON; anything above this is not a checkpoint header we should parse.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointFormatError(ValueError):
    """The file is not a checkpoint we can load; the message says what it is and what to do."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One entry of a safetensors header: `offset` is where its bytes start in the file, `nbytes` how many."""

    dtype: str
    shape: tuple[int, ...]
    offset: int = 0
    nbytes: int = 0


UNET_INPUT_KEY = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."

# OpenCLIP (SD 2.x, SDXL's bigG) pads with id 0 ("!") after the first EOS; CLIP-L pads with EOS itself.
OPEN_CLIP_PAD_ID = 0
# SDXL conditions on the penultimate layer of both encoders, without their final layer norm.
SDXL_HIDDEN_LAYER = -2
# A1111's defaults for sdxl_crop_top / sdxl_crop_left.
SDXL_CROP_TOP_LEFT = (0, 0)

LatentRgb = tuple[tuple[float, float, float], ...]
# A1111's "Approx cheap" preview: a fixed linear map from the 4 SD 1.x latent channels to RGB
# (one row per latent channel, one column per colour), good enough to see composition mid-sampling.
SD1_LATENT_RGB_COEFFICIENTS: LatentRgb = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
# A1111's set for SDXL's latent space (sd_vae_approx.cheap_approximation); SD 2.x shares SD 1.x's VAE and set.
SDXL_LATENT_RGB_COEFFICIENTS: LatentRgb = (
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)


@dataclass(frozen=True, slots=True)
class TextEncoderSpec:
    """One text encoder of a family: where it lives and how A1111 runs it.

    `component`: the pipeline component ("text_encoder", "text_encoder_2"). `checkpoint_prefix`: its key prefix in
    a single-file checkpoint; `open_clip`: the file holds OpenCLIP's layout (fused in_proj, resblocks) rather than
    transformers' CLIP names. `pad_id`: the id after the first EOS (None: EOS itself). `hidden_layer`: None takes the
    last hidden state (final layer norm included), -2 the penultimate layer without it. `pooled`: its projected
    pooled output conditions the UNet (SDXL's bigG). `ti_key`: the key of an embedding file's tensor for this
    encoder ("clip_l"/"clip_g"; None: a single-encoder family takes the file's one tensor). `width`: the full-size
    model's hidden size, the embedding width A1111 checks.
    """

    component: str
    checkpoint_prefix: str
    open_clip: bool
    pad_id: int | None
    hidden_layer: int | None
    pooled: bool
    ti_key: str | None
    width: int


def token_embedding_of(text_encoder: torch.nn.Module) -> torch.nn.Embedding:
    """A transformers text encoder's token embedding (the table textual-inversion vectors stand in for)."""
    import torch

    embedding = cast(Any, text_encoder).get_input_embeddings()
    if not isinstance(embedding, torch.nn.Embedding):
        raise TypeError(f"{type(text_encoder).__name__} has no token embedding table")
    return embedding


class Family:
    """A supported model family: the shipped diffusers config and everything that differs between families.

    One instance per family (SD1, SD2, SDXL below); compare families by identity or `key`.
    """

    key: str
    label: str
    # A1111's sd_version names, as network metadata and the API spell them.
    a1111_version: str
    config_dir: Path
    text_encoders: tuple[TextEncoderSpec, ...]
    # kohya LoRA key prefix → the component its modules are in (single-encoder families share these).
    lora_prefixes: Mapping[str, str] = MappingProxyType({"lora_unet_": "unet", "lora_te_": "text_encoder"})
    # How kohya names UNet modules: "diffusers" (diffusers paths with . → _) or "ldm" (LDM block names).
    kohya_unet_names: str = "diffusers"
    latent_rgb_coefficients: LatentRgb = SD1_LATENT_RGB_COEFFICIENTS
    # A1111 (SDXL): a negative prompt that is empty at every step conditions on zeros, not on "".
    zeroes_empty_negative_prompt: bool = False

    def __repr__(self) -> str:
        return f"<family {self.key}>"

    @property
    def embedding_width(self) -> int:
        """A1111's expected textual-inversion shape: the text encoders' widths added up (768 / 1024 / 2048)."""
        return sum(spec.width for spec in self.text_encoders)

    def embedding_widths(self, encoders: Mapping[str, torch.nn.Module] | None = None) -> dict[str | None, int]:
        """TI key → width each embedding tensor must have: of the given loaded encoders (a test's tiny model
        is narrower than the real one), else the full-size model's."""
        if encoders is None:
            return {spec.ti_key: spec.width for spec in self.text_encoders}
        widths: dict[str | None, int] = {}
        for spec in self.text_encoders:
            module = encoders.get(spec.component)
            if module is None:
                raise ValueError(f"{self.label} needs its {spec.component}")
            widths[spec.ti_key] = int(token_embedding_of(module).weight.shape[1])
        return widths

    def clip_skip_limit(self, text_encoder: torch.nn.Module) -> int | None:
        """The largest clip skip the model can apply, or None where A1111 ignores clip skip."""
        return None

    def effective_clip_skip(self, clip_skip: int) -> int:
        """The clip skip the encoders run with: A1111 ignores the setting except for SD 1.x."""
        return 1

    def encode(
        self,
        texts: list[str],
        encoders: Mapping[str, torch.nn.Module],
        tokenizer: ClipTokenizer,
        clip_skip: int,
        emphasis: str = "Original",
        embeddings: EmbeddingLookup | None = None,
    ) -> TextConditioning:
        """A batch of prompts encoded the way A1111 encodes them for this family (`encoders`: component → module)."""
        from webui.engine.conditioning import encode_with_specs

        return encode_with_specs(
            self.text_encoders, encoders, texts, tokenizer, self.effective_clip_skip(clip_skip), emphasis, embeddings
        )

    def time_ids(self, height: int, width: int) -> list[int] | None:
        """The UNet's size conditioning for an image of this size, or None where the UNet takes none."""
        return None

    def unet_added_conditions(
        self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None
    ) -> dict[str, torch.Tensor] | None:
        """The UNet's `added_cond_kwargs` for one call: pooled text (B, P) and time ids (B, 6), or None."""
        return None

    def prediction_type(self, config_dir: Path, scheduler_config: Mapping[str, object]) -> str | None:
        """The prediction type the configs can vouch for; None: run A1111's v-prediction test on the UNet.

        Eps unless the config says otherwise (SD 1.x, SDXL base).
        """
        stated = scheduler_config.get("prediction_type")
        return str(stated) if stated is not None else "epsilon"


class SD1Family(Family):
    """SD 1.x: CLIP ViT-L, EOS padding, clip skip honoured."""

    key = "sd1"
    label = "SD 1.x"
    a1111_version = "SD1"
    config_dir = CONFIGS_DIR / "sd1"
    text_encoders = (
        TextEncoderSpec("text_encoder", SD1_TEXT_PREFIX, open_clip=False, pad_id=None, hidden_layer=None,
                        pooled=False, ti_key=None, width=768),
    )

    def clip_skip_limit(self, text_encoder: torch.nn.Module) -> int | None:
        return int(cast(Any, text_encoder).config.num_hidden_layers)

    def effective_clip_skip(self, clip_skip: int) -> int:
        return clip_skip


class SD2Family(Family):
    """SD 2.x: OpenCLIP-H (the diffusers encoder stops at the penultimate layer, so its last hidden state is
    A1111's "penultimate + ln_final"), 0 padding, clip skip ignored. One shipped config serves 512 (eps) and 768-v."""

    key = "sd2"
    label = "SD 2.x"
    a1111_version = "SD2"
    config_dir = CONFIGS_DIR / "sd2"
    text_encoders = (
        TextEncoderSpec("text_encoder", SD2_TEXT_PREFIX, open_clip=True, pad_id=OPEN_CLIP_PAD_ID, hidden_layer=None,
                        pooled=False, ti_key=None, width=1024),
    )

    def prediction_type(self, config_dir: Path, scheduler_config: Mapping[str, object]) -> str | None:
        """Only a sidecar that states prediction_type settles it: the shipped config serves eps and v files alike."""
        stated = scheduler_config.get("prediction_type")
        is_sidecar = config_dir != self.config_dir
        return str(stated) if is_sidecar and stated is not None else None


class SDXLFamily(Family):
    """SDXL base (A1111's sd_models_xl / sgm GeneralConditioner): CLIP-L and OpenCLIP-bigG, each its penultimate
    layer without final layer norm, concatenated on channels; bigG's pooled output and the size as time ids."""

    key = "sdxl"
    label = "SDXL"
    a1111_version = "SDXL"
    config_dir = CONFIGS_DIR / "sdxl"
    text_encoders = (
        TextEncoderSpec("text_encoder", SDXL_CLIP_L_PREFIX, open_clip=False, pad_id=None,
                        hidden_layer=SDXL_HIDDEN_LAYER, pooled=False, ti_key="clip_l", width=768),
        TextEncoderSpec("text_encoder_2", SDXL_CLIP_G_PREFIX, open_clip=True, pad_id=OPEN_CLIP_PAD_ID,
                        hidden_layer=SDXL_HIDDEN_LAYER, pooled=True, ti_key="clip_g", width=1280),
    )
    lora_prefixes = MappingProxyType({"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"})
    kohya_unet_names = "ldm"
    latent_rgb_coefficients = SDXL_LATENT_RGB_COEFFICIENTS
    zeroes_empty_negative_prompt = True

    def time_ids(self, height: int, width: int) -> list[int] | None:
        """SDXL's size conditioning as A1111 sends it: the generation size as both original and target, no crop."""
        crop_top, crop_left = SDXL_CROP_TOP_LEFT
        return [height, width, crop_top, crop_left, height, width]

    def unet_added_conditions(
        self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None
    ) -> dict[str, torch.Tensor] | None:
        if pooled is None or time_ids is None:
            raise ValueError("SDXL's UNet needs the pooled text vector and the size conditioning")
        time_ids = time_ids.to(device=pooled.device, dtype=pooled.dtype).expand(pooled.shape[0], -1)
        return {"text_embeds": pooled, "time_ids": time_ids}


SD1: Family = SD1Family()
SD2: Family = SD2Family()
SDXL: Family = SDXLFamily()
FAMILIES: dict[str, Family] = {family.key: family for family in (SD1, SD2, SDXL)}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONVERT_HINT = (
    "Pickle checkpoints can run arbitrary code when loaded, so only .safetensors files are loaded. "
    "Convert it once on a machine you trust, for example:\n"
    "  python -c \"import torch, safetensors.torch as st; sd = torch.load('MODEL.ckpt', "
    "map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, "
    "'MODEL.safetensors')\"\n"
    "or download the .safetensors version of the model."
)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes from a safetensors file, reading only its header."""
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointFormatError(f"{path.name}: file is empty or truncated (not a safetensors file)")
        (header_length,) = struct.unpack("<Q", prefix)
        raw_header = file.read(header_length) if 2 <= header_length <= MAX_HEADER_BYTES else b""
    # A header length can itself start with 0x80 (the pickle marker), so the pickle check comes only
    # after the bytes failed to be a safetensors header.
    if not raw_header.startswith(b"{"):
        if prefix[:2] == b"PK" or prefix[:1] == b"\x80":
            raise CheckpointFormatError(f"{path.name}: this is a pickle checkpoint, not safetensors. {CONVERT_HINT}")
        if not 2 <= header_length <= MAX_HEADER_BYTES:
            raise CheckpointFormatError(f"{path.name}: not a valid safetensors file (bad header length)")
    if len(raw_header) < header_length:
        raise CheckpointFormatError(f"{path.name}: file is truncated (header cut off)")
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointFormatError(f"{path.name}: not a valid safetensors file ({error})") from None
    data_length = path.stat().st_size - 8 - header_length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        if end > data_length:
            raise CheckpointFormatError(
                f"{path.name}: file is truncated ({data_length} data bytes, tensor {name} needs {end}); "
                "download it again"
            )
        tensors[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]), 8 + header_length + start, end - start)
    return tensors


def detect_family(path: Path, tensors: dict[str, TensorInfo]) -> Family:
    """The family of a checkpoint from its key names and shapes, or a clear error naming what it is.

    The order follows A1111's guess_model_config_from_state_dict: the text encoder's key prefix says the
    family, the UNet's input channels say whether it is an inpainting/pix2pix/upscaler variant.
    """

    def has_prefix(prefix: str) -> bool:
        return any(name.startswith(prefix) for name in tensors)

    def unsupported(what: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{path.name}: this is {what} checkpoint, which is not supported yet")

    unet_in = tensors.get(UNET_INPUT_KEY)
    in_channels = unet_in.shape[1] if unet_in is not None and len(unet_in.shape) == 4 else None
    if "model.diffusion_model.x_embedder.proj.weight" in tensors:
        raise unsupported("a Stable Diffusion 3")
    if has_prefix("double_blocks.") or has_prefix("model.diffusion_model.double_blocks."):
        raise unsupported("a Flux")
    if "edm_mean" in tensors:
        raise unsupported("a Playground v2.5 (EDM)")
    if has_prefix(SDXL_CLIP_G_PREFIX):
        if in_channels == 9:
            raise unsupported("an SDXL inpainting")
        _require_unet(path, in_channels, "SDXL")
        if not has_prefix(SDXL_CLIP_L_PREFIX):
            raise CheckpointFormatError(
                f"{path.name}: SDXL checkpoint without its CLIP-L text encoder ({SDXL_CLIP_L_PREFIX}*)"
            )
        return SDXL
    if has_prefix(SDXL_REFINER_TEXT_PREFIX):
        raise unsupported("an SDXL refiner")
    if has_prefix("depth_model."):
        raise unsupported("a Stable Diffusion 2 depth (midas)")
    if has_prefix("embedder.model."):
        raise unsupported("a Stable Diffusion 2.1 unCLIP")
    if has_prefix(SD2_TEXT_PREFIX):
        if in_channels == 9:
            raise unsupported("a Stable Diffusion 2.x inpainting")
        if in_channels == 7:
            raise unsupported("a Stable Diffusion 2.x x4 upscaler")
        _require_unet(path, in_channels, "Stable Diffusion 2.x")
        return SD2
    if unet_in is None:
        if any("lora" in name.lower() for name in tensors):
            raise CheckpointFormatError(
                f"{path.name}: this looks like a LoRA, not a checkpoint; it belongs in models/Lora"
            )
        if any(name.removeprefix("first_stage_model.").startswith("decoder.") for name in tensors):
            raise CheckpointFormatError(
                f"{path.name}: this is a VAE, not a Stable Diffusion checkpoint; it belongs in models/VAE"
            )
        raise CheckpointFormatError(
            f"{path.name}: no UNet weights (model.diffusion_model.*) found; this is not a Stable Diffusion "
            "checkpoint (a VAE, LoRA or embedding belongs in its own folder)"
        )
    if in_channels == 9:
        raise unsupported("an SD 1.x inpainting")
    if in_channels == 8:
        raise unsupported("an instruct-pix2pix")
    _require_unet(path, in_channels, "SD 1.x")
    if not has_prefix(SD1_TEXT_PREFIX):
        raise CheckpointFormatError(
            f"{path.name}: no CLIP text encoder (cond_stage_model.transformer.*) in the file"
        )
    return SD1


def _require_unet(path: Path, in_channels: int | None, family_label: str) -> None:
    if in_channels is None:
        raise CheckpointFormatError(f"{path.name}: {family_label} text encoder but no UNet weights ({UNET_INPUT_KEY})")
    if in_channels != 4:
        raise CheckpointFormatError(f"{path.name}: unexpected UNet input channels {in_channels} for {family_label}")
