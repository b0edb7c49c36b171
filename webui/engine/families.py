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
    """One entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Family:
    """A supported model family and the diffusers pipeline config shipped for it."""

    key: str
    label: str
    config_dir: Path


SD1 = Family("sd1", "SD 1.x", CONFIGS_DIR / "sd1")
FAMILIES: dict[str, Family] = {SD1.key: SD1}

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
        if prefix[:2] == b"PK" or prefix[:1] == b"\x80":
            raise CheckpointFormatError(f"{path.name}: this is a pickle checkpoint, not safetensors. {CONVERT_HINT}")
        if not 2 <= header_length <= MAX_HEADER_BYTES:
            raise CheckpointFormatError(f"{path.name}: not a valid safetensors file (bad header length)")
        raw_header = file.read(header_length)
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
        tensors[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]))
    return tensors


def detect_family(path: Path, tensors: dict[str, TensorInfo]) -> Family:
    """The family of a checkpoint from its key names and shapes, or a clear error naming what it is."""

    def has_prefix(prefix: str) -> bool:
        return any(name.startswith(prefix) for name in tensors)

    unet_in = tensors.get("model.diffusion_model.input_blocks.0.0.weight")
    if "model.diffusion_model.x_embedder.proj.weight" in tensors:
        raise CheckpointFormatError(f"{path.name}: this is a Stable Diffusion 3 checkpoint, which is not supported yet")
    if has_prefix("double_blocks.") or has_prefix("model.diffusion_model.double_blocks."):
        raise CheckpointFormatError(f"{path.name}: this is a Flux checkpoint, which is not supported yet")
    if has_prefix("conditioner.embedders.1.model."):
        raise CheckpointFormatError(f"{path.name}: this is an SDXL base checkpoint, which is not supported yet")
    if has_prefix("conditioner.embedders.0.model."):
        raise CheckpointFormatError(f"{path.name}: this is an SDXL refiner checkpoint, which is not supported yet")
    if has_prefix("cond_stage_model.model."):
        raise CheckpointFormatError(f"{path.name}: this is a Stable Diffusion 2.x checkpoint, which is not supported yet")
    if unet_in is None:
        if any("lora" in name for name in tensors):
            raise CheckpointFormatError(
                f"{path.name}: this looks like a LoRA, not a checkpoint; it belongs in models/Lora"
            )
        raise CheckpointFormatError(
            f"{path.name}: no UNet weights (model.diffusion_model.*) found; this is not a Stable Diffusion "
            "checkpoint (a VAE, LoRA or embedding belongs in its own folder)"
        )
    in_channels = unet_in.shape[1]
    if in_channels == 9:
        raise CheckpointFormatError(f"{path.name}: this is an SD 1.x inpainting checkpoint, which is not supported yet")
    if in_channels == 8:
        raise CheckpointFormatError(f"{path.name}: this is an instruct-pix2pix checkpoint, which is not supported yet")
    if in_channels != 4:
        raise CheckpointFormatError(f"{path.name}: unexpected UNet input channels {in_channels}")
    if not has_prefix("cond_stage_model.transformer."):
        raise CheckpointFormatError(
            f"{path.name}: no CLIP text encoder (cond_stage_model.transformer.*) in the file"
        )
    return SD1
