"""Tests of the SD 1.x/2.x/SDXL fixtures and shipped configs: single-file layouts diffusers' converters read back.
Must not import webui: the fixtures are checked against diffusers itself, never against the engine they will test."""

from __future__ import annotations

import inspect
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from tests.fixtures.ldm_layout import (
    CLIP_POSITION_IDS_KEY,
    CLIP_TEXT_PREFIX,
    DDPM_BUFFER_NAMES,
    UNET_PREFIX,
    VAE_PREFIX,
    ddpm_schedule_buffers,
    ldm_state_dict,
    unet_to_ldm,
)
from tests.fixtures.tiny_sd import (
    MODEL_INDEX_FILE,
    SCHEDULER_CONFIG_FILE,
    SHIPPED_SD1_CONFIG_DIR,
    TEXT_ENCODER_CONFIG_FILE,
    TINY_UNET,
    UNET_CONFIG_FILE,
    VAE_CONFIG_FILE,
    SD1Modules,
    build_tiny_sd1_checkpoint,
    build_tiny_sd1_modules,
    read_json,
    shipped_sd1_configs,
    shipped_sd1_scheduler_config,
    sidecar_dir_for,
)

# Parameter counts of the real SD 1.5 components (runwayml/stable-diffusion-v1-5 and CLIP ViT-L/14's text tower).
SD15_UNET_PARAMETERS = 859_520_964
SD15_VAE_PARAMETERS = 83_653_863
SD15_CLIP_TEXT_PARAMETERS = 123_060_480
# Key counts of a real SD 1.5 single file (no EMA copy): UNet, VAE, CLIP text (with position_ids), DDPM buffers.
SD15_UNET_KEYS = 686
SD15_VAE_KEYS = 248
SD15_CLIP_KEYS = 197
SD15_TOTAL_KEYS = SD15_UNET_KEYS + SD15_VAE_KEYS + SD15_CLIP_KEYS + len(DDPM_BUFFER_NAMES)
CLIP_KEYS_PER_LAYER = 16

# Keys (and shapes) every real SD 1.x file has, spread over the parts whose index arithmetic is easy to get wrong.
SD15_PROBE_SHAPES: dict[str, tuple[int, ...]] = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
    "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
    "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.0.conv1.weight": (128, 256, 3, 3),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    "alphas_cumprod": (1000,),
}

# transformers config.json keys that describe the file, not the constructor.
TRANSFORMERS_FILE_KEYS = {"architectures", "model_type"}


@pytest.fixture
def network_blocked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to resolve or open a connection fails loudly, so "works offline" is proven, not assumed."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access attempted: {args[:2]!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield


def _constructor_keys(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _empty_modules(config_dir: Path) -> SD1Modules:
    """Modules from a config folder with weights on the meta device: structure only, nothing allocated."""
    text_config = read_json(config_dir / TEXT_ENCODER_CONFIG_FILE)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(read_json(config_dir / UNET_CONFIG_FILE))
        vae = AutoencoderKL.from_config(read_json(config_dir / VAE_CONFIG_FILE))
        text_encoder = CLIPTextModel(
            CLIPTextConfig(**{key: value for key, value in text_config.items() if key != "model_type"})
        )
    return SD1Modules(unet, vae, text_encoder)


def _parameter_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _load_with_diffusers_converters(checkpoint: dict[str, Tensor], config_dir: Path) -> SD1Modules:
    """What a from_single_file-free loader does: diffusers' converters, then a strict load into fresh empty modules."""
    modules = _empty_modules(config_dir)
    unet_state = convert_ldm_unet_checkpoint(checkpoint, dict(modules.unet.config))
    vae_state = convert_ldm_vae_checkpoint(checkpoint, dict(modules.vae.config))
    # The flattened (transformers >= 5.6) CLIPTextModel has no `text_model.` level and position_ids is not persistent.
    text_state = {
        key.removeprefix("text_model."): value
        for key, value in convert_ldm_clip_checkpoint(checkpoint).items()
        if not key.endswith("position_ids")
    }
    for module, state in ((modules.unet, unet_state), (modules.vae, vae_state), (modules.text_encoder, text_state)):
        module.load_state_dict(state, strict=True, assign=True)
    return modules


def _assert_state_dicts_identical(loaded: nn.Module, original: nn.Module, dtype: torch.dtype) -> None:
    loaded_state = loaded.state_dict()
    original_state = original.state_dict()
    assert loaded_state.keys() == original_state.keys()
    for name, original_tensor in original_state.items():
        loaded_tensor = loaded_state[name]
        expected = original_tensor.to(dtype) if original_tensor.is_floating_point() else original_tensor
        assert loaded_tensor.device.type == "cpu", f"{name} left on {loaded_tensor.device}"
        assert loaded_tensor.dtype == expected.dtype, name
        assert torch.equal(loaded_tensor, expected), f"{name} differs"


# --- the shipped config --------------------------------------------------------------------------------------------


def test_shipped_sd1_config_has_the_sd15_values() -> None:
    model_index = read_json(SHIPPED_SD1_CONFIG_DIR / MODEL_INDEX_FILE)
    assert model_index["_class_name"] == "StableDiffusionPipeline"
    assert model_index["safety_checker"] == [None, None]
    assert model_index["feature_extractor"] == [None, None]
    assert model_index["requires_safety_checker"] is False
    assert not (SHIPPED_SD1_CONFIG_DIR / "tokenizer").exists()

    configs = shipped_sd1_configs()
    assert configs.unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert configs.unet["layers_per_block"] == 2
    assert configs.unet["attention_head_dim"] == 8
    assert configs.unet["cross_attention_dim"] == 768
    assert configs.unet["sample_size"] == 64
    assert configs.unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert configs.unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert configs.vae["block_out_channels"] == [128, 256, 512, 512]
    assert configs.vae["latent_channels"] == 4
    assert configs.vae["sample_size"] == 512
    assert configs.vae["scaling_factor"] == 0.18215
    text = configs.text_encoder
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (768, 12, 12)
    assert (text["intermediate_size"], text["vocab_size"], text["max_position_embeddings"]) == (3072, 49408, 77)
    assert text["hidden_act"] == "quick_gelu"
    assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (0, 2, 1)

    scheduler = shipped_sd1_scheduler_config()
    assert scheduler["_class_name"] == "PNDMScheduler"
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (0.00085, 0.012)
    assert scheduler["beta_schedule"] == "scaled_linear"
    assert scheduler["num_train_timesteps"] == 1000
    assert scheduler["steps_offset"] == 1
    assert scheduler["set_alpha_to_one"] is False
    assert scheduler["prediction_type"] == "epsilon"


def test_shipped_sd1_config_has_only_keys_diffusers_and_transformers_understand() -> None:
    configs = shipped_sd1_configs()
    for component_class, config in ((UNet2DConditionModel, configs.unet), (AutoencoderKL, configs.vae)):
        accepted = set(inspect.signature(component_class.__init__).parameters)
        assert set(_constructor_keys(config)) <= accepted, component_class.__name__
        assert config["_class_name"] == component_class.__name__

    text_accepted = set(inspect.signature(CLIPTextConfig.__init__).parameters) | TRANSFORMERS_FILE_KEYS
    assert set(configs.text_encoder) <= text_accepted
    assert configs.text_encoder["model_type"] == CLIPTextConfig.model_type

    scheduler = shipped_sd1_scheduler_config()
    pndm_accepted = set(inspect.signature(PNDMScheduler.__init__).parameters)
    # clip_sample is not PNDM's, but the real SD 1.5 file has it and from_config carries it to the schedulers that
    # use it: without it a DDIM derived from this config would clip x0, which SD 1.x sampling does not do.
    foreign_keys = set(_constructor_keys(scheduler)) - pndm_accepted
    assert foreign_keys == {"clip_sample"}
    assert "clip_sample" in inspect.signature(DDIMScheduler.__init__).parameters


def test_shipped_sd1_config_builds_full_size_modules_without_allocating(network_blocked: None) -> None:
    modules = _empty_modules(SHIPPED_SD1_CONFIG_DIR)
    assert _parameter_count(modules.unet) == SD15_UNET_PARAMETERS
    assert _parameter_count(modules.vae) == SD15_VAE_PARAMETERS
    assert _parameter_count(modules.text_encoder) == SD15_CLIP_TEXT_PARAMETERS
    assert all(parameter.device.type == "meta" for parameter in modules.unet.parameters())
    assert modules.vae.config.scaling_factor == 0.18215

    pndm = PNDMScheduler.from_config(shipped_sd1_scheduler_config())
    assert pndm.config.prediction_type == "epsilon"
    assert pndm.config.steps_offset == 1
    assert DDIMScheduler.from_config(pndm.config).config.clip_sample is False


def test_full_size_ldm_layout_has_the_keys_of_real_sd15_files() -> None:
    modules = _empty_modules(SHIPPED_SD1_CONFIG_DIR)
    state = ldm_state_dict(modules.unet, modules.vae, modules.text_encoder, shipped_sd1_scheduler_config())
    assert len(state) == SD15_TOTAL_KEYS
    assert sum(key.startswith(UNET_PREFIX) for key in state) == SD15_UNET_KEYS
    assert sum(key.startswith(VAE_PREFIX) for key in state) == SD15_VAE_KEYS
    assert sum(key.startswith(CLIP_TEXT_PREFIX) for key in state) == SD15_CLIP_KEYS
    for key, shape in SD15_PROBE_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert state[CLIP_POSITION_IDS_KEY].dtype == torch.int64


# --- the DDPM buffers ---------------------------------------------------------------------------------------------


def test_ddpm_buffers_follow_ldm_and_agree_with_diffusers_schedule() -> None:
    buffers = ddpm_schedule_buffers(shipped_sd1_scheduler_config())
    assert tuple(buffers) == DDPM_BUFFER_NAMES
    assert all(tensor.dtype == torch.float32 and tensor.shape == (1000,) for tensor in buffers.values())
    assert buffers["betas"][0].item() == pytest.approx(0.00085)
    assert buffers["betas"][-1].item() == pytest.approx(0.012)
    assert buffers["alphas_cumprod_prev"][0].item() == 1.0
    assert torch.equal(buffers["alphas_cumprod_prev"][1:], buffers["alphas_cumprod"][:-1])
    assert buffers["posterior_variance"][0].item() == 0.0
    assert buffers["posterior_log_variance_clipped"][0].item() == pytest.approx(-46.0517, abs=1e-3)
    diffusers_schedule = DDPMScheduler.from_config(shipped_sd1_scheduler_config())
    torch.testing.assert_close(buffers["alphas_cumprod"], diffusers_schedule.alphas_cumprod, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buffers["sqrt_alphas_cumprod"] ** 2, buffers["alphas_cumprod"])
    torch.testing.assert_close(buffers["sqrt_recip_alphas_cumprod"] * buffers["sqrt_alphas_cumprod"], torch.ones(1000))


# --- tiny and mini checkpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "dtype"),
    [("tiny", torch.float16), ("mini", torch.float16), ("tiny", torch.float32)],
)
def test_diffusers_converters_read_the_file_back_bit_identically(
    tmp_path: Path, variant: str, dtype: torch.dtype, network_blocked: None
) -> None:
    checkpoint_path = build_tiny_sd1_checkpoint(tmp_path, name=variant, seed=3, dtype=dtype, variant=variant)
    checkpoint = load_file(checkpoint_path)
    original = build_tiny_sd1_modules(variant, seed=3)

    loaded = _load_with_diffusers_converters(checkpoint, sidecar_dir_for(checkpoint_path))

    for loaded_module, original_module in zip(loaded, original, strict=True):
        _assert_state_dicts_identical(loaded_module, original_module, dtype)


def test_file_carries_what_real_sd1_files_carry(tiny_checkpoint: Path) -> None:
    checkpoint = load_file(tiny_checkpoint)
    position_ids = checkpoint[CLIP_POSITION_IDS_KEY]
    assert position_ids.dtype == torch.int64
    assert torch.equal(position_ids, torch.arange(77).unsqueeze(0))
    for name in DDPM_BUFFER_NAMES:
        assert checkpoint[name].shape == (1000,), name
    assert all(checkpoint[key].dtype == torch.float16 for key in checkpoint if key != CLIP_POSITION_IDS_KEY)
    assert checkpoint[VAE_PREFIX + "encoder.mid.attn_1.k.weight"].shape == (16, 16, 1, 1)
    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_TEXT_PREFIX)
    assert all(key.startswith(prefixes) or key in DDPM_BUFFER_NAMES for key in checkpoint)


def test_mini_file_has_the_structure_of_a_real_sd15_file(tmp_path: Path) -> None:
    mini_keys = set(load_file(build_tiny_sd1_checkpoint(tmp_path, name="mini", variant="mini")))
    empty = _empty_modules(SHIPPED_SD1_CONFIG_DIR)
    full_size = ldm_state_dict(empty.unet, empty.vae, empty.text_encoder, shipped_sd1_scheduler_config())

    def outside_clip_layers(keys: set[str]) -> set[str]:
        return {key for key in keys if ".encoder.layers." not in key}

    def clip_layer_keys(keys: set[str], layer: int) -> set[str]:
        return {key for key in keys if f"text_model.encoder.layers.{layer}." in key}

    # Only the CLIP depth differs (2 layers instead of 12); everything else matches key for key.
    assert outside_clip_layers(mini_keys) == outside_clip_layers(set(full_size))
    for layer in range(2):
        assert clip_layer_keys(mini_keys, layer) == clip_layer_keys(set(full_size), layer)
    assert len(mini_keys) == SD15_TOTAL_KEYS - 10 * CLIP_KEYS_PER_LAYER
    for probe_key in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert probe_key in mini_keys


def test_sidecar_has_the_shipped_schema(tiny_checkpoint: Path) -> None:
    sidecar = sidecar_dir_for(tiny_checkpoint)
    assert sidecar.name == "tiny.config"

    def relative_files(directory: Path) -> set[Path]:
        return {path.relative_to(directory) for path in directory.rglob("*") if path.is_file()}

    assert relative_files(sidecar) == relative_files(SHIPPED_SD1_CONFIG_DIR)
    for relative in (MODEL_INDEX_FILE, SCHEDULER_CONFIG_FILE):
        assert read_json(sidecar / relative) == read_json(SHIPPED_SD1_CONFIG_DIR / relative)
    for relative in (UNET_CONFIG_FILE, VAE_CONFIG_FILE, TEXT_ENCODER_CONFIG_FILE):
        assert read_json(sidecar / relative).keys() == read_json(SHIPPED_SD1_CONFIG_DIR / relative).keys()
    assert read_json(sidecar / UNET_CONFIG_FILE)["block_out_channels"] == TINY_UNET["block_out_channels"]


def test_builds_are_deterministic_and_seeds_differ(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = load_file(tiny_model_dir / "tiny.safetensors")
    rebuilt = load_file(build_tiny_sd1_checkpoint(tmp_path, name="tiny", seed=0))
    other_seed = load_file(tiny_model_dir / "tiny_b.safetensors")
    assert (tiny_model_dir / "tiny_b.config" / MODEL_INDEX_FILE).is_file()
    assert first.keys() == rebuilt.keys() == other_seed.keys()
    assert all(torch.equal(first[key], rebuilt[key]) for key in first)
    weight_keys = [key for key in first if key.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_TEXT_PREFIX))]
    weight_keys.remove(CLIP_POSITION_IDS_KEY)
    assert not any(torch.equal(first[key], other_seed[key]) for key in weight_keys)


def test_tiny_modules_respond_to_prompt_latents_and_timestep() -> None:
    modules = build_tiny_sd1_modules("tiny", seed=0)
    generator = torch.Generator().manual_seed(0)
    token_ids = torch.randint(0, 49408, (2, 77), generator=generator)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    other_latents = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        prompts = modules.text_encoder(token_ids).last_hidden_state
        first, second = prompts[:1], prompts[1:]
        baseline = modules.unet(latents, 500, encoder_hidden_states=first).sample
        outputs = {
            "prompt": modules.unet(latents, 500, encoder_hidden_states=second).sample,
            "latents": modules.unet(other_latents, 500, encoder_hidden_states=first).sample,
            "timestep": modules.unet(latents, 20, encoder_hidden_states=first).sample,
        }
        image = modules.vae.decode(latents / modules.vae.config.scaling_factor).sample

    assert torch.isfinite(baseline).all()
    assert 0.1 < baseline.std().item() < 10.0
    for cause, output in outputs.items():
        assert (output - baseline).abs().mean().item() > 1e-3, f"UNet output ignores the {cause}"
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()
    # Mostly inside [-1, 1], so decoded images are not saturated to flat colour.
    assert 0.1 < image.std().item() < 1.5
    assert (image.abs() < 1).float().mean().item() > 0.5


def test_ldm_mapping_refuses_tensors_it_cannot_place() -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**TINY_UNET, "time_cond_proj_dim": 8})
    with pytest.raises(ValueError, match="no LDM mapping"):
        unet_to_ldm(unet)


def _byte_level_tokenizer() -> Any:
    """A CLIPTokenizer over the 256 byte symbols only: real token ids are not needed to drive a random model."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols: list[str] = []
    next_private = 256
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            # Same byte -> unicode trick as GPT-2/CLIP: unprintable bytes get code points above 255.
            symbols.append(chr(next_private))
            next_private += 1
    vocabulary = {symbol: index for index, symbol in enumerate(symbols)}
    vocabulary.update({symbol + "</w>": index + 256 for index, symbol in enumerate(symbols)})
    vocabulary["<|startoftext|>"] = 512
    vocabulary["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocabulary, merges=[], model_max_length=77, pad_token="<|endoftext|>")


def test_sidecar_works_as_from_single_file_config_offline(tiny_checkpoint: Path, network_blocked: None) -> None:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_single_file(
        str(tiny_checkpoint),
        config=str(sidecar_dir_for(tiny_checkpoint)),
        tokenizer=_byte_level_tokenizer(),
        local_files_only=True,
        torch_dtype=torch.float32,
    )
    pipeline.set_progress_bar_config(disable=True)

    def render(prompt: str, seed: int) -> Tensor:
        result = pipeline(
            prompt,
            num_inference_steps=2,
            height=64,
            width=64,
            guidance_scale=7.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        )
        return result.images[0]

    cat = render("a cat", 0)
    assert cat.shape == (3, 64, 64)
    assert (render("a dog", 0) - cat).abs().mean().item() > 0.01
    assert (render("a cat", 1) - cat).abs().mean().item() > 0.01
    assert torch.equal(render("a cat", 0), cat)


@pytest.mark.gpu
def test_gpu_marker_runs_only_with_cuda() -> None:
    # Fails on a CPU-only machine unless the conftest hook skips it: this proves the hook works.
    assert torch.cuda.is_available()
    assert torch.ones(1, device="cuda").item() == 1.0


def test_ldm_layout_names_follow_the_original_module_tree() -> None:
    keys = set(unet_to_ldm(build_tiny_sd1_modules("tiny", seed=0).unet))
    diffusers_only_names = re.compile(
        r"\b(down_blocks|up_blocks|mid_block|resnets|attentions|downsamplers|upsamplers|time_emb_proj|conv_shortcut)\b"
    )
    assert not [key for key in keys if diffusers_only_names.search(key)]
    assert UNET_PREFIX + "input_blocks.1.0.emb_layers.1.weight" in keys
    assert UNET_PREFIX + "input_blocks.2.0.op.weight" in keys  # layers_per_block 1: level 0's downsampler is block 2
    assert UNET_PREFIX + "input_blocks.3.0.skip_connection.weight" in keys  # 32 -> 64 channels
    assert UNET_PREFIX + "output_blocks.1.1.conv.weight" in keys  # the up path's level 0 has no attention: slot 1
    assert UNET_PREFIX + "output_blocks.3.1.proj_out.weight" in keys


# --- SD 2.x and SDXL layouts ---------------------------------------------------------------------------------------


def _meta_family_state_dict(family: str) -> dict[str, Tensor]:
    """The fixture's single-file state dict of the full-size shipped model, built on the meta device (no memory)."""
    from transformers import CLIPTextModelWithProjection

    from tests.fixtures.ldm_layout import sd2_ldm_state_dict, sdxl_sgm_state_dict
    from tests.fixtures.tiny_sd import SHIPPED_SD2_CONFIG_DIR, SHIPPED_SDXL_CONFIG_DIR

    def text_config(path: Path, **changes: Any) -> CLIPTextConfig:
        values = {**read_json(path), **changes}
        return CLIPTextConfig(**{k: v for k, v in values.items() if k not in TRANSFORMERS_FILE_KEYS})

    config_dir = SHIPPED_SD2_CONFIG_DIR if family == "sd2" else SHIPPED_SDXL_CONFIG_DIR
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(read_json(config_dir / UNET_CONFIG_FILE))
        vae = AutoencoderKL.from_config(read_json(config_dir / VAE_CONFIG_FILE))
        if family == "sd2":
            # The file holds OpenCLIP-H's whole text tower: 24 layers and a 1024 x 1024 projection.
            tower = CLIPTextModelWithProjection(
                text_config(config_dir / TEXT_ENCODER_CONFIG_FILE, num_hidden_layers=24, projection_dim=1024)
            )
            return sd2_ldm_state_dict(unet, vae, tower, shipped_sd1_scheduler_config())
        clip_l = CLIPTextModel(text_config(config_dir / TEXT_ENCODER_CONFIG_FILE))
        clip_g = CLIPTextModelWithProjection(text_config(config_dir / "text_encoder_2" / "config.json"))
    return sdxl_sgm_state_dict(unet, vae, clip_l, clip_g)


def test_full_size_sdxl_layout_has_the_keys_of_the_real_base_file() -> None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    state = _meta_family_state_dict("sdxl")
    # sd_xl_base_1.0.safetensors: 1680 UNet + 248 VAE + 197 CLIP-L (with position_ids) + 390 bigG tensors.
    assert len(state) == 2515
    probes = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.input_blocks.7.1.proj_in.weight": (1280, 1280),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.ln_final.weight": (1280,),
    }
    assert {key: tuple(state[key].shape) for key in probes} == probes
    assert not any(key.startswith("alphas_cumprod") for key in state)  # sgm files carry no DDPM buffers
    assert infer_diffusers_model_type(state) == "xl_base"


def test_full_size_sd2_layout_has_the_keys_of_a_real_sd21_file() -> None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    state = _meta_family_state_dict("sd2")
    probes = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),  # linear, not 1x1 conv as in SD 1.x
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "alphas_cumprod": (1000,),
    }
    assert {key: tuple(state[key].shape) for key in probes} == probes
    assert sum(key.startswith("cond_stage_model.model.") for key in state) == 24 * 12 + 6
    assert infer_diffusers_model_type(state) == "v2"
