"""Model-family detection from safetensors headers alone, and the shipped SD 2.x / SDXL configs.
Detection files hold zero-size tensors: there are no weights to read, so a detection that tried would fail."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from webui.engine.checkpoint_loading import build_components
from webui.engine.families import (
    FAMILIES,
    SD1,
    SD2,
    SDXL,
    CheckpointFormatError,
    Family,
    detect_family,
    read_safetensors_header,
)

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
UNET_OUT = "model.diffusion_model.out.2.weight"
VAE_DECODER = "first_stage_model.decoder.conv_in.weight"
SD1_TEXT = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
SD2_TEXT = "cond_stage_model.model.ln_final.weight"
SD2_IN_PROJ = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
SDXL_CLIP_L = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
SDXL_CLIP_G = "conditioner.embedders.1.model.ln_final.weight"


def unet(in_channels: int) -> dict[str, tuple[int, ...]]:
    """The UNet's first and last convolutions: zero output channels, so the shapes carry no data."""
    return {UNET_IN: (0, in_channels, 3, 3), UNET_OUT: (0, 320, 3, 3)}


# Header shapes of real files of each kind (leading dimensions zeroed so nothing is stored).
SD1_KEYS = {**unet(4), VAE_DECODER: (0, 4, 3, 3), SD1_TEXT: (0,)}
SD2_KEYS = {**unet(4), VAE_DECODER: (0, 4, 3, 3), SD2_TEXT: (0,), SD2_IN_PROJ: (0, 1024)}
SDXL_KEYS = {**unet(4), VAE_DECODER: (0, 4, 3, 3), SDXL_CLIP_L: (0,), SDXL_CLIP_G: (0,)}


def header_only_file(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    tensors = {name: torch.zeros(shape) for name, shape in keys.items()}
    assert all(tensor.numel() == 0 for tensor in tensors.values())
    save_file(tensors, str(path))
    return path


def detect(tmp_path: Path, keys: dict[str, tuple[int, ...]]) -> Family:
    path = header_only_file(tmp_path / "model.safetensors", keys)
    return detect_family(path, read_safetensors_header(path))


@pytest.mark.parametrize(
    "keys, family",
    [
        (SD1_KEYS, SD1),
        # Pre-2022 SD 1.x files keep CLIP without the `text_model.` level.
        ({**unet(4), "cond_stage_model.transformer.final_layer_norm.weight": (0,)}, SD1),
        (SD2_KEYS, SD2),
        (SDXL_KEYS, SDXL),
    ],
    ids=["sd1", "sd1-old-clip-keys", "sd2", "sdxl-base"],
)
def test_supported_families_are_detected_from_the_header(
    tmp_path: Path, keys: dict[str, tuple[int, ...]], family: Family
) -> None:
    assert detect(tmp_path, keys) == family


@pytest.mark.parametrize(
    "keys, message",
    [
        ({**unet(4), "conditioner.embedders.0.model.ln_final.weight": (0,)}, "SDXL refiner"),
        ({**SDXL_KEYS, **unet(9)}, "SDXL inpainting"),
        ({**SD2_KEYS, **unet(9)}, "Stable Diffusion 2.x inpainting"),
        ({**SD2_KEYS, **unet(7)}, "Stable Diffusion 2.x x4 upscaler"),
        ({**SD2_KEYS, "depth_model.model.pretrained.act_postprocess3.0.project.0.bias": (0,)}, "depth"),
        ({**SD2_KEYS, "embedder.model.ln_final.weight": (0,)}, "unCLIP"),
        ({**SD1_KEYS, **unet(9)}, "SD 1.x inpainting"),
        ({**SD1_KEYS, **unet(8)}, "instruct-pix2pix"),
        ({"model.diffusion_model.x_embedder.proj.weight": (0, 16, 2, 2)}, "Stable Diffusion 3"),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (0,)}, "Flux"),
        ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (0,)}, "Flux"),
        ({**SDXL_KEYS, "edm_mean": (0, 4, 1, 1)}, "Playground v2.5"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (0, 320)}, "LoRA"),
        ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (0, 320)}, "LoRA"),
        ({"decoder.conv_in.weight": (0, 4, 3, 3), "encoder.conv_in.weight": (0, 3, 3, 3)}, "this is a VAE"),
        ({VAE_DECODER: (0, 4, 3, 3)}, "this is a VAE"),
        ({"string_to_param.*": (0, 768)}, "not a Stable Diffusion checkpoint"),
        ({**unet(4), SDXL_CLIP_G: (0,)}, "without its CLIP-L"),
        ({SD2_TEXT: (0,)}, "no UNet weights"),
        ({**unet(4), VAE_DECODER: (0, 4, 3, 3)}, "no CLIP text encoder"),
    ],
    ids=[
        "sdxl-refiner", "sdxl-inpaint", "sd2-inpaint", "sd2-upscaler", "sd2-depth", "unclip", "sd1-inpaint",
        "pix2pix", "sd3", "flux", "flux-prefixed", "playground", "lora-kohya", "lora-peft", "vae", "vae-ldm",
        "embedding", "sdxl-no-clip-l", "sd2-no-unet", "sd1-no-text",
    ],
)
def test_unsupported_files_say_what_they_are(tmp_path: Path, keys: dict[str, tuple[int, ...]], message: str) -> None:
    with pytest.raises(CheckpointFormatError, match=message):
        detect(tmp_path, keys)


def test_the_tiny_checkpoints_are_detected_from_their_headers(tiny_sd2_sdxl_dir: Path) -> None:
    found = {
        path.stem: detect_family(path, read_safetensors_header(path)).key
        for path in sorted(tiny_sd2_sdxl_dir.glob("*.safetensors"))
    }
    assert found == {"sd2_eps": "sd2", "sd2_v": "sd2", "sdxl": "sdxl"}


def _parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_shipped_sd2_and_sdxl_configs_build_the_published_models() -> None:
    """Parameter counts of stabilityai/stable-diffusion-2-1 and stable-diffusion-xl-base-1.0 (diffusers format),
    built on the meta device: a wrong channel list, head size or layer count changes them."""
    sd2 = build_components(SD2, SD2.config_dir)
    assert _parameters(sd2.unet) == 865_910_724
    assert _parameters(sd2.text_encoder) == 340_387_840  # OpenCLIP-H text tower with 23 of its 24 layers
    assert sd2.text_encoder_2 is None
    assert sd2.unet.config.cross_attention_dim == sd2.text_encoder.config.hidden_size == 1024

    sdxl = build_components(SDXL, SDXL.config_dir)
    assert sdxl.text_encoder_2 is not None
    assert _parameters(sdxl.unet) == 2_567_463_684
    assert _parameters(sdxl.vae) == 83_653_863
    assert _parameters(sdxl.text_encoder) == 123_060_480  # CLIP ViT-L
    assert _parameters(sdxl.text_encoder_2) == 694_659_840  # OpenCLIP-bigG with projection
    assert sdxl.vae.config.scaling_factor == 0.13025
    # Context = CLIP-L ++ bigG channels; the "vector" = pooled bigG ++ 6 size/crop numbers × 256 Fourier features.
    hidden = sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    assert sdxl.unet.config.cross_attention_dim == hidden == 2048
    assert sdxl.text_encoder_2.config.projection_dim == 1280
    assert sdxl.unet.config.projection_class_embeddings_input_dim == 1280 + 6 * 256 == 2816


def test_a_header_length_starting_with_the_pickle_byte_is_still_safetensors(tmp_path: Path) -> None:
    """The 8-byte header length is little-endian: a length like 0x...80 starts with 0x80, pickle's marker."""
    path = tmp_path / "model.safetensors"
    for padding in range(0, 4096):
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(0)}, str(path),
                  metadata={"pad": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert "model.diffusion_model.input_blocks.0.0.weight" in read_safetensors_header(path)


# --- family classes ------------------------------------------------------------------------------------------

WEBUI = Path(__file__).resolve().parents[2] / "webui"
FAMILY_NAMES = {"SD1", "SD2", "SDXL"}


def test_families_are_one_class_each_keyed_as_a1111_names_them() -> None:
    assert FAMILIES == {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}
    assert len({type(family) for family in FAMILIES.values()}) == 3
    assert all(isinstance(family, Family) for family in FAMILIES.values())
    assert [(family.a1111_version, family.embedding_width) for family in (SD1, SD2, SDXL)] == [
        ("SD1", 768), ("SD2", 1024), ("SDXL", 2048)
    ]
    assert [spec.ti_key for spec in SDXL.text_encoders] == ["clip_l", "clip_g"]
    assert (SD1.kohya_unet_names, SD2.kohya_unet_names, SDXL.kohya_unet_names) == ("diffusers", "diffusers", "ldm")


@pytest.mark.parametrize("family", [SD1, SD2, SDXL], ids=lambda family: family.key)
def test_declared_encoders_match_the_modules_the_shipped_configs_build(family: Family) -> None:
    """Widths (A1111's embedding shape check), pooled projection and LoRA components come from the real configs."""
    modules = build_components(family, family.config_dir).modules()
    assert family.embedding_widths(modules) == family.embedding_widths()
    assert {spec.component for spec in family.text_encoders} == set(modules) - {"unet", "vae"}
    for spec in family.text_encoders:
        assert hasattr(modules[spec.component], "text_projection") == spec.pooled
    assert set(family.lora_prefixes.values()) == set(modules) - {"vae"}


def test_only_sd1_honours_clip_skip() -> None:
    sd1 = build_components(SD1, SD1.config_dir)
    sd2 = build_components(SD2, SD2.config_dir)
    assert SD1.clip_skip_limit(sd1.text_encoder) == 12
    assert SD2.clip_skip_limit(sd2.text_encoder) is None and SDXL.clip_skip_limit(sd1.text_encoder) is None
    assert (SD1.effective_clip_skip(2), SD2.effective_clip_skip(2), SDXL.effective_clip_skip(2)) == (2, 1, 1)


def test_only_sdxl_sends_pooled_text_and_size_to_the_unet() -> None:
    assert SDXL.time_ids(64, 96) == [64, 96, 0, 0, 64, 96]
    pooled = torch.ones(2, 40, dtype=torch.float16)
    time_ids = torch.tensor([SDXL.time_ids(64, 96)], dtype=torch.float32)
    added = SDXL.unet_added_conditions(pooled, time_ids)
    assert added is not None and added["text_embeds"] is pooled
    assert added["time_ids"].dtype == torch.float16 and added["time_ids"].tolist() == [[64, 96, 0, 0, 64, 96]] * 2
    assert SD1.time_ids(64, 96) is None and SD2.unet_added_conditions(None, None) is None
    with pytest.raises(ValueError, match="pooled"):
        SDXL.unet_added_conditions(None, time_ids)


def test_prediction_type_per_family(tmp_path: Path) -> None:
    stated = {"prediction_type": "v_prediction"}
    # The shipped SD 2.x config serves eps and v files: only a sidecar's statement counts, else A1111's test runs.
    assert SD2.prediction_type(SD2.config_dir, stated) is None
    assert SD2.prediction_type(tmp_path / "model.config", stated) == "v_prediction"
    assert SD2.prediction_type(tmp_path / "model.config", {}) is None
    assert SD1.prediction_type(SD1.config_dir, {}) == SDXL.prediction_type(SDXL.config_dir, {}) == "epsilon"
    assert SD1.prediction_type(tmp_path / "model.config", stated) == "v_prediction"


def test_no_family_is_compared_outside_the_family_classes() -> None:
    """What differs between families lives in their classes: no `family == SDXL` branch anywhere else."""
    offenders = []
    for path in sorted(WEBUI.rglob("*.py")):
        if path.name == "families.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                names = {side.id for side in [node.left, *node.comparators] if isinstance(side, ast.Name)}
                names |= {side.attr for side in [node.left, *node.comparators] if isinstance(side, ast.Attribute)}
                if names & FAMILY_NAMES:
                    offenders.append(f"{path.relative_to(WEBUI)}:{node.lineno}")
    assert offenders == []
