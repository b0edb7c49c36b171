"""Model families: detection from safetensors header keys and shapes, and each family's shipped config.
Reads only file headers (never weights); must not import diffusers, gradio or webui.app."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True, slots=True)
class Family:
    """A supported model family and the diffusers pipeline config shipped for it."""

    key: str
    label: str
    config_dir: Path


SD1 = Family("sd1", "SD 1.x", CONFIGS_DIR / "sd1")
# SD 2.x: one config for 512 (eps) and 768-v; the prediction type is decided by A1111's test on the loaded UNet.
SD2 = Family("sd2", "SD 2.x", CONFIGS_DIR / "sd2")
SDXL = Family("sdxl", "SDXL", CONFIGS_DIR / "sdxl")
FAMILIES: dict[str, Family] = {family.key: family for family in (SD1, SD2, SDXL)}

UNET_INPUT_KEY = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."

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
