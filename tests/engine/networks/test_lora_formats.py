"""LoRA/LyCORIS file formats: real kohya / LyCORIS / diffusers-PEFT layouts written with safetensors for the tiny
SD 1.x and SDXL fixtures, loaded by webui.engine.networks.lora; every ΔW is checked against the formulas of
A1111 1.10 (spec §1.4) written out in tests/fixtures/network_files, and key names against §12.6 and the full-size
configs.
Must not import gradio, fastapi or webui.app."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.fixtures.network_files import (
    kohya_name,
    ldm_unet_names,
    ref_cp,
    ref_dora_per_input,
    ref_dora_per_output,
    ref_lora,
    ref_tucker,
)
from tests.fixtures.tiny_sd import (
    SHIPPED_SD1_CONFIG_DIR,
    SHIPPED_SDXL_CONFIG_DIR,
    build_tiny_sd1_modules,
    build_tiny_sdxl_modules,
    read_json,
)
from webui.engine.families import SD1, SDXL
from webui.engine.networks.lora import LoraError, LoraPatch, load_lora_file, model_modules
from webui.engine.patches import PatchError

ATOL = 1e-5
RTOL = 1e-4

# Non-square targets, so a transposed factor cannot pass. transformers 5 builds CLIPTextModel without the
# `text_model` level LoRA files name (CLIPTextModelWithProjection, SDXL's text_encoder_2, keeps it).
SD1_TE_FC1 = "text_encoder.encoder.layers.0.mlp.fc1"  # Linear 37×32
SD1_TE_Q = "text_encoder.encoder.layers.1.self_attn.q_proj"  # Linear 32×32
SD1_FF = "unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"  # Linear 256×32
SD1_TIME_EMB = "unet.up_blocks.0.resnets.0.time_emb_proj"  # Linear 64×128
SD1_CONV3 = "unet.up_blocks.0.resnets.0.conv1"  # Conv 64×128×3×3
SD1_CONV1 = "unet.down_blocks.1.resnets.0.conv_shortcut"  # Conv 64×32×1×1
SD1_PROJ_IN = "unet.up_blocks.1.attentions.0.proj_in"  # Conv 32×32×1×1 (SD 1.x: no linear projection)
SD1_GROUP_NORM = "unet.up_blocks.0.resnets.0.norm1"
SD1_LAYER_NORM = "text_encoder.encoder.layers.0.layer_norm1"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def sd1() -> dict[str, nn.Module]:
    modules = build_tiny_sd1_modules(seed=3)
    return model_modules({"unet": modules.unet, "vae": modules.vae, "text_encoder": modules.text_encoder})


@pytest.fixture(scope="module")
def sdxl_components() -> dict[str, nn.Module]:
    modules = build_tiny_sdxl_modules(seed=5)
    return {
        "unet": modules.unet, "vae": modules.vae,
        "text_encoder": modules.text_encoder, "text_encoder_2": modules.text_encoder_2,
    }


@pytest.fixture(scope="module")
def sdxl(sdxl_components: dict[str, nn.Module]) -> dict[str, nn.Module]:
    return model_modules(sdxl_components)


class Rand:
    """Seeded random tensors, so every test builds the same files."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * 0.1


def write(tmp_path: Path, name: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def weight_of(modules: Mapping[str, nn.Module], path: str) -> torch.Tensor:
    weight = modules[path].weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach().float()


def shape_of(modules: Mapping[str, nn.Module], path: str) -> tuple[int, ...]:
    return tuple(weight_of(modules, path).shape)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------- LoRA / LoCon


def lora_file(rand: Rand, modules: Mapping[str, nn.Module], paths: list[str], prefixes, rank: int, alpha: float):
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        shape = shape_of(modules, path)
        name = kohya_name(path, prefixes)
        tensors[f"{name}.lora_down.weight"] = rand(rank, shape[1], *shape[2:])
        tensors[f"{name}.lora_up.weight"] = rand(shape[0], rank, *[1] * (len(shape) - 2))
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def test_kohya_lora_and_locon_deltas_match_up_down_scale_and_multipliers(tmp_path, sd1):
    paths = [SD1_TE_FC1, SD1_TE_Q, SD1_FF, SD1_TIME_EMB, SD1_CONV3, SD1_CONV1, SD1_PROJ_IN]
    tensors = lora_file(Rand(1), sd1, paths, SD1.lora_prefixes, rank=4, alpha=2.0)
    file = write(tmp_path, "locon.safetensors", tensors, {"ss_network_module": "networks.lora"})

    network = load_lora_file(file)
    patch = LoraPatch(network, SD1, te_multiplier=0.5, unet_multiplier=0.8)
    assert patch.label == "locon.safetensors"
    assert patch.key == (str(file), file.stat().st_mtime, file.stat().st_size, 0.5, 0.8, None)
    assert patch.matched_modules(sd1) == len(paths)
    deltas = patch.deltas(sd1)
    assert set(deltas) == set(paths)
    for path in paths:
        name = kohya_name(path, SD1.lora_prefixes)
        multiplier = 0.5 if path.startswith("text_encoder") else 0.8
        expected = ref_lora(tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"],
                            shape_of(sd1, path)) * (2.0 / 4) * multiplier
        delta = deltas[path]
        close(delta.weight, expected)
        assert delta.bias is None
        assert delta.weight.dtype == sd1[path].weight.dtype


def test_multipliers_route_per_component_and_zero_patches_nothing(tmp_path, sd1):
    paths = [SD1_TE_FC1, SD1_FF]
    file = write(tmp_path, "route.safetensors", lora_file(Rand(2), sd1, paths, SD1.lora_prefixes, 4, 4.0))
    network = load_lora_file(file)

    unet_only = LoraPatch(network, SD1, te_multiplier=0.0, unet_multiplier=1.0).deltas(sd1)
    te_only = LoraPatch(network, SD1, te_multiplier=1.0, unet_multiplier=0.0).deltas(sd1)
    assert set(unet_only) == {SD1_FF}
    assert set(te_only) == {SD1_TE_FC1}
    assert dict(LoraPatch(network, SD1, 0.0, 0.0).deltas(sd1)) == {}
    double = LoraPatch(network, SD1, te_multiplier=2.0, unet_multiplier=-1.0).deltas(sd1)
    close(double[SD1_TE_FC1].weight, te_only[SD1_TE_FC1].weight * 2)
    close(double[SD1_FF].weight, -unet_only[SD1_FF].weight)


def test_dyn_keeps_the_first_ranks_and_scale_stays_alpha_over_full_rank(tmp_path, sd1):
    tensors = lora_file(Rand(3), sd1, [SD1_FF, SD1_CONV3], SD1.lora_prefixes, rank=6, alpha=3.0)
    network = load_lora_file(write(tmp_path, "dyn.safetensors", tensors))
    patch = LoraPatch(network, SD1, 1.0, 1.0, dyn=2)
    assert patch.key[-1] == 2
    deltas = patch.deltas(sd1)
    for path in (SD1_FF, SD1_CONV3):
        name = kohya_name(path, SD1.lora_prefixes)
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        expected = ref_lora(up[:, :2], down[:2], shape_of(sd1, path)) * (3.0 / 6)
        close(deltas[path].weight, expected)


def test_locon_cp_with_lora_mid(tmp_path, sd1):
    rand = Rand(4)
    name = kohya_name(SD1_CONV3, SD1.lora_prefixes)
    out_dim, in_dim, k, _ = shape_of(sd1, SD1_CONV3)
    tensors = {
        f"{name}.lora_down.weight": rand(3, in_dim, 1, 1),
        f"{name}.lora_mid.weight": rand(3, 3, k, k),
        f"{name}.lora_up.weight": rand(out_dim, 3, 1, 1),
        f"{name}.alpha": torch.tensor(1.5),
    }
    network = load_lora_file(write(tmp_path, "cp.safetensors", tensors))
    # dyn does not apply to CP modules (A1111 passes dyn only to rebuild_conventional).
    delta = LoraPatch(network, SD1, 1.0, 0.7, dyn=1).deltas(sd1)[SD1_CONV3]
    expected = ref_cp(tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"],
                      tensors[f"{name}.lora_mid.weight"]) * (1.5 / 3) * 0.7
    close(delta.weight, expected)


# ----------------------------------------------------------------------------------------------- LyCORIS


def test_loha_linear_and_tucker_conv(tmp_path, sd1):
    rand = Rand(5)
    linear = kohya_name(SD1_FF, SD1.lora_prefixes)
    conv = kohya_name(SD1_CONV3, SD1.lora_prefixes)
    out_l, in_l = shape_of(sd1, SD1_FF)
    out_c, in_c, k, _ = shape_of(sd1, SD1_CONV3)
    tensors = {
        f"{linear}.hada_w1_a": rand(out_l, 4), f"{linear}.hada_w1_b": rand(4, in_l),
        f"{linear}.hada_w2_a": rand(out_l, 4), f"{linear}.hada_w2_b": rand(4, in_l),
        f"{linear}.alpha": torch.tensor(2.0),
        # LyCORIS Tucker layout: w_a (r, out), w_b (r, in), t (r, r, k, k).
        f"{conv}.hada_w1_a": rand(3, out_c), f"{conv}.hada_w1_b": rand(3, in_c), f"{conv}.hada_t1": rand(3, 3, k, k),
        f"{conv}.hada_w2_a": rand(3, out_c), f"{conv}.hada_w2_b": rand(3, in_c), f"{conv}.hada_t2": rand(3, 3, k, k),
        f"{conv}.alpha": torch.tensor(1.0),
    }
    network = load_lora_file(write(tmp_path, "loha.safetensors", tensors))
    assert {module.kind for module in network.modules.values()} == {"LoHa"}
    deltas = LoraPatch(network, SD1, 1.0, 0.6).deltas(sd1)
    t = tensors
    expected_linear = (t[f"{linear}.hada_w1_a"] @ t[f"{linear}.hada_w1_b"]) * (
        t[f"{linear}.hada_w2_a"] @ t[f"{linear}.hada_w2_b"]) * (2.0 / 4) * 0.6
    close(deltas[SD1_FF].weight, expected_linear)
    expected_conv = ref_tucker(t[f"{conv}.hada_t1"], t[f"{conv}.hada_w1_a"], t[f"{conv}.hada_w1_b"]) * ref_tucker(
        t[f"{conv}.hada_t2"], t[f"{conv}.hada_w2_a"], t[f"{conv}.hada_w2_b"]) * (1.0 / 3) * 0.6
    close(deltas[SD1_CONV3].weight, expected_conv)


def test_lokr_full_factors_decomposed_factor_and_tucker_conv(tmp_path, sd1):
    rand = Rand(6)
    full = kohya_name(SD1_TE_FC1, SD1.lora_prefixes)  # 37×32: 37 is prime, so w1 is 1×4, w2 37×8
    split = kohya_name(SD1_FF, SD1.lora_prefixes)  # 256×32 = kron(4×4, 64×8), w2 = w2_a @ w2_b at rank 2
    conv = kohya_name(SD1_CONV3, SD1.lora_prefixes)  # 64×128×3×3 = kron(8×8, (8×16×3×3 from t2))
    tensors = {
        f"{full}.lokr_w1": rand(1, 4), f"{full}.lokr_w2": rand(37, 8), f"{full}.alpha": torch.tensor(99.0),
        f"{split}.lokr_w1": rand(4, 4), f"{split}.lokr_w2_a": rand(64, 2), f"{split}.lokr_w2_b": rand(2, 8),
        f"{split}.alpha": torch.tensor(1.0),
        f"{conv}.lokr_w1": rand(8, 8), f"{conv}.lokr_w2_a": rand(2, 8), f"{conv}.lokr_w2_b": rand(2, 16),
        f"{conv}.lokr_t2": rand(2, 2, 3, 3), f"{conv}.alpha": torch.tensor(4.0),
    }
    network = load_lora_file(write(tmp_path, "lokr.safetensors", tensors))
    deltas = LoraPatch(network, SD1, 1.0, 1.0).deltas(sd1)
    t = tensors
    # Both factors full: no rank, so alpha has no effect (scale 1).
    close(deltas[SD1_TE_FC1].weight, torch.kron(t[f"{full}.lokr_w1"], t[f"{full}.lokr_w2"]))
    close(deltas[SD1_FF].weight,
          torch.kron(t[f"{split}.lokr_w1"], t[f"{split}.lokr_w2_a"] @ t[f"{split}.lokr_w2_b"]) * (1.0 / 2))
    w2 = ref_tucker(t[f"{conv}.lokr_t2"], t[f"{conv}.lokr_w2_a"], t[f"{conv}.lokr_w2_b"])
    expected = torch.kron(t[f"{conv}.lokr_w1"][:, :, None, None], w2) * (4.0 / 2)
    close(deltas[SD1_CONV3].weight, expected)


def test_ia3_scales_rows_or_input_columns(tmp_path, sd1):
    rand = Rand(7)
    rows = kohya_name(SD1_FF, SD1.lora_prefixes)
    columns = kohya_name(SD1_TIME_EMB, SD1.lora_prefixes)
    tensors = {
        f"{rows}.weight": rand(256), f"{rows}.on_input": torch.tensor(False),
        f"{columns}.weight": rand(128), f"{columns}.on_input": torch.tensor(True),
    }
    network = load_lora_file(write(tmp_path, "ia3.safetensors", tensors))
    deltas = LoraPatch(network, SD1, 1.0, 0.5).deltas(sd1)
    close(deltas[SD1_FF].weight, weight_of(sd1, SD1_FF) * tensors[f"{rows}.weight"][:, None] * 0.5)
    close(deltas[SD1_TIME_EMB].weight,
          weight_of(sd1, SD1_TIME_EMB) * tensors[f"{columns}.weight"][None, :] * 0.5)


def test_full_diff_and_norm_modules_patch_weight_and_bias(tmp_path, sd1):
    rand = Rand(8)
    diff = kohya_name(SD1_CONV1, SD1.lora_prefixes)
    group = kohya_name(SD1_GROUP_NORM, SD1.lora_prefixes)
    layer = kohya_name(SD1_LAYER_NORM, SD1.lora_prefixes)
    tensors = {
        f"{diff}.diff": rand(*shape_of(sd1, SD1_CONV1)), f"{diff}.diff_b": rand(64),
        f"{group}.w_norm": rand(128), f"{group}.b_norm": rand(128),
        f"{layer}.w_norm": rand(32), f"{layer}.b_norm": rand(32),
    }
    network = load_lora_file(write(tmp_path, "full_norm.safetensors", tensors))
    assert {network.modules[diff].kind, network.modules[group].kind} == {"full", "norm"}
    deltas = LoraPatch(network, SD1, te_multiplier=0.25, unet_multiplier=0.5).deltas(sd1)
    close(deltas[SD1_CONV1].weight, tensors[f"{diff}.diff"] * 0.5)
    close(deltas[SD1_CONV1].bias, tensors[f"{diff}.diff_b"] * 0.5)
    close(deltas[SD1_GROUP_NORM].weight, tensors[f"{group}.w_norm"] * 0.5)
    close(deltas[SD1_GROUP_NORM].bias, tensors[f"{group}.b_norm"] * 0.5)
    close(deltas[SD1_LAYER_NORM].weight, tensors[f"{layer}.w_norm"] * 0.25)
    close(deltas[SD1_LAYER_NORM].bias, tensors[f"{layer}.b_norm"] * 0.25)


def test_dora_per_input_channel_as_a1111_then_multiplier(tmp_path, sd1):
    rand = Rand(9)
    tensors = lora_file(rand, sd1, [SD1_TE_FC1, SD1_CONV3], SD1.lora_prefixes, rank=4, alpha=2.0)
    fc1 = kohya_name(SD1_TE_FC1, SD1.lora_prefixes)
    conv = kohya_name(SD1_CONV3, SD1.lora_prefixes)
    tensors[f"{fc1}.dora_scale"] = 1 + rand(1, 32).abs()
    tensors[f"{conv}.dora_scale"] = 1 + rand(1, 128, 1, 1).abs()
    network = load_lora_file(write(tmp_path, "dora.safetensors", tensors))
    deltas = LoraPatch(network, SD1, te_multiplier=0.5, unet_multiplier=0.8).deltas(sd1)
    for path, name, multiplier in ((SD1_TE_FC1, fc1, 0.5), (SD1_CONV3, conv, 0.8)):
        lora = ref_lora(tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"], shape_of(sd1, path))
        expected = ref_dora_per_input(weight_of(sd1, path), lora * 0.5, tensors[f"{name}.dora_scale"]) * multiplier
        close(deltas[path].weight, expected)


def test_dora_per_output_magnitudes_lycoris_and_peft(tmp_path, sd1):
    rand = Rand(10)
    tensors = lora_file(rand, sd1, [SD1_TE_FC1], SD1.lora_prefixes, rank=4, alpha=4.0)
    fc1 = kohya_name(SD1_TE_FC1, SD1.lora_prefixes)
    tensors[f"{fc1}.dora_scale"] = 1 + rand(37, 1).abs()  # LyCORIS wd_on_out=True
    network = load_lora_file(write(tmp_path, "dora_out.safetensors", tensors))
    delta = LoraPatch(network, SD1, 1.0, 1.0).deltas(sd1)[SD1_TE_FC1]
    lora = ref_lora(tensors[f"{fc1}.lora_up.weight"], tensors[f"{fc1}.lora_down.weight"], (37, 32))
    close(delta.weight, ref_dora_per_output(weight_of(sd1, SD1_TE_FC1), lora, tensors[f"{fc1}.dora_scale"]))

    module = SD1_FF
    down, up, magnitude = rand(2, 32), rand(256, 2), 1 + rand(256).abs()
    peft = {
        f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up, f"{module}.lora_magnitude_vector": magnitude,
    }
    delta = LoraPatch(load_lora_file(write(tmp_path, "peft_dora.safetensors", peft)), SD1, 1.0, 0.5).deltas(sd1)
    close(delta[module].weight, ref_dora_per_output(weight_of(sd1, module), up @ down, magnitude) * 0.5)


def test_delta_comes_back_in_the_weight_dtype(tmp_path):
    modules = build_tiny_sd1_modules(seed=3)
    half = model_modules({"text_encoder": modules.text_encoder.half()})
    tensors = lora_file(Rand(11), half, [SD1_TE_FC1], SD1.lora_prefixes, rank=2, alpha=2.0)
    delta = LoraPatch(load_lora_file(write(tmp_path, "half.safetensors", tensors)), SD1, 1.0, 1.0).deltas(half)
    name = kohya_name(SD1_TE_FC1, SD1.lora_prefixes)
    assert delta[SD1_TE_FC1].weight.dtype == torch.float16
    expected = tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"]
    torch.testing.assert_close(delta[SD1_TE_FC1].weight.float(), expected, atol=1e-3, rtol=1e-2)


# ---------------------------------------------------------------------------------------------- SDXL, names


def test_sdxl_kohya_ldm_unet_and_te1_te2_names_patch_the_right_modules(tmp_path, sdxl, sdxl_components):
    ldm = ldm_unet_names(sdxl_components["unet"])
    assert len(ldm) > 50
    rand = Rand(12)
    tensors: dict[str, torch.Tensor] = {}
    expected_paths = {}
    for path, ldm_name in ldm.items():
        shape = tuple(sdxl[f"unet.{path}"].weight.shape)
        if len(shape) < 2:
            continue  # norms: see the full/norm test
        name = "lora_unet_" + ldm_name.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = rand(2, shape[1], *shape[2:])
        tensors[f"{name}.lora_up.weight"] = rand(shape[0], 2, *[1] * (len(shape) - 2))
        expected_paths[name] = f"unet.{path}"
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    te2 = "lora_te2_text_model_encoder_layers_1_mlp_fc1"
    for name, path in ((te1, "text_encoder.encoder.layers.0.self_attn.q_proj"),
                       (te2, "text_encoder_2.text_model.encoder.layers.1.mlp.fc1")):
        out_dim, in_dim = sdxl[path].weight.shape
        tensors[f"{name}.lora_down.weight"] = rand(2, in_dim)
        tensors[f"{name}.lora_up.weight"] = rand(out_dim, 2)
        expected_paths[name] = path
    network = load_lora_file(write(tmp_path, "sdxl.safetensors", tensors, {"ss_base_model_version": "sdxl_base_v1-0"}))
    patch = LoraPatch(network, SDXL, te_multiplier=0.3, unet_multiplier=1.0)
    assert patch.targets(sdxl) == {path: network.modules[name] for name, path in expected_paths.items()}
    deltas = patch.deltas(sdxl)
    for name, path in expected_paths.items():
        multiplier = 0.3 if path.startswith("text_encoder") else 1.0
        expected = ref_lora(tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"],
                            tuple(sdxl[path].weight.shape)) * multiplier
        close(deltas[path].weight, expected)


def test_every_ldm_name_of_the_tiny_unets_resolves_including_norms(tmp_path, sd1, sdxl, sdxl_components):
    sd1_unet = build_tiny_sd1_modules(seed=3).unet
    for family, modules, unet in ((SD1, sd1, sd1_unet), (SDXL, sdxl, sdxl_components["unet"])):
        tensors = {}
        names = {}
        for path, ldm_name in ldm_unet_names(unet).items():
            name = "lora_unet_" + ldm_name.replace(".", "_")
            tensors[f"{name}.diff"] = torch.zeros(modules[f"unet.{path}"].weight.shape)
            names[name] = f"unet.{path}"
        network = load_lora_file(write(tmp_path, f"ldm_{family.key}.safetensors", tensors))
        targets = LoraPatch(network, family, 1.0, 1.0).targets(modules)
        assert {module.name: path for path, module in targets.items()} == names


def test_diffusers_and_peft_keys_with_adapter_metadata_alpha(tmp_path, sdxl):
    rand = Rand(13)
    unet_q = "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    unet_ff = "unet.up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    te2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj"
    tensors = {}
    for path, rank in ((unet_q, 4), (unet_ff, 4), (te2, 2)):
        out_dim, in_dim = sdxl[path].weight.shape
        tensors[f"{path}.lora_A.weight"] = rand(rank, in_dim)
        tensors[f"{path}.lora_B.weight"] = rand(out_dim, rank)
    metadata = {"lora_adapter_metadata": json.dumps({
        "unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_k": 2},
        "text_encoder_2.r": 2, "text_encoder_2.lora_alpha": 2,
    })}
    network = load_lora_file(write(tmp_path, "pytorch_lora_weights.safetensors", tensors, metadata))
    deltas = LoraPatch(network, SDXL, te_multiplier=0.5, unet_multiplier=1.0).deltas(sdxl)
    for path, scale in ((unet_q, 2 / 4), (unet_ff, 8 / 4), (te2, 2 / 2 * 0.5)):
        close(deltas[path].weight, tensors[f"{path}.lora_B.weight"] @ tensors[f"{path}.lora_A.weight"] * scale)


def test_old_diffusers_attention_processor_keys(tmp_path, sd1):
    rand = Rand(14)
    base = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    tensors = {
        f"{base}.processor.to_out_lora.down.weight": rand(2, 32),
        f"{base}.processor.to_out_lora.up.weight": rand(32, 2),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": rand(2, 32),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": rand(37, 2),
    }
    network = load_lora_file(write(tmp_path, "old_diffusers.safetensors", tensors))
    deltas = LoraPatch(network, SD1, 1.0, 1.0).deltas(sd1)
    assert set(deltas) == {f"{base}.to_out.0", SD1_TE_FC1}  # text_model. dropped: see SD1_TE_FC1
    close(deltas[f"{base}.to_out.0"].weight,
          tensors[f"{base}.processor.to_out_lora.up.weight"] @ tensors[f"{base}.processor.to_out_lora.down.weight"])


# ------------------------------------------------------------------------- full-size configs, no weights


def meta_unet(config_dir: Path) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(read_json(config_dir / "unet" / "config.json"))


def meta_text_encoder(config_dir: Path, component: str) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = read_json(config_dir / component / "config.json")
    config.pop("model_type", None)
    model_class = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    with torch.device("meta"):
        return model_class(CLIPTextConfig(**config))


@pytest.fixture(scope="module")
def full_sd1() -> dict[str, nn.Module]:
    return model_modules({
        "unet": meta_unet(SHIPPED_SD1_CONFIG_DIR),
        "text_encoder": meta_text_encoder(SHIPPED_SD1_CONFIG_DIR, "text_encoder"),
    })


@pytest.fixture(scope="module")
def full_sdxl() -> dict[str, nn.Module]:
    return model_modules({
        "unet": meta_unet(SHIPPED_SDXL_CONFIG_DIR),
        "text_encoder": meta_text_encoder(SHIPPED_SDXL_CONFIG_DIR, "text_encoder"),
        "text_encoder_2": meta_text_encoder(SHIPPED_SDXL_CONFIG_DIR, "text_encoder_2"),
    })


def names_network(tmp_path: Path, file_name: str, names: list[str]):
    """A file with one (empty-rank) LoRA module per name: only the names matter here."""
    tensors = {}
    for name in names:
        tensors[f"{name}.lora_down.weight"] = torch.zeros(1, 1)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(1, 1)
    return load_lora_file(write(tmp_path, file_name, tensors))


SPEC_12_6 = [
    (SD1, "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
     "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    (SD1, "lora_unet_up_blocks_3_resnets_2_conv2", "unet.up_blocks.3.resnets.2.conv2"),
    (SD1, "lora_unet_mid_block_resnets_1_time_emb_proj", "unet.mid_block.resnets.1.time_emb_proj"),
    (SD1, "lora_unet_down_blocks_2_downsamplers_0_conv", "unet.down_blocks.2.downsamplers.0.conv"),
    (SD1, "lora_unet_up_blocks_1_upsamplers_0_conv", "unet.up_blocks.1.upsamplers.0.conv"),
    # §12.6 writes text_encoder.text_model.…; transformers 5's CLIPTextModel has no text_model level.
    (SD1, "lora_te_text_model_encoder_layers_11_mlp_fc2", "text_encoder.encoder.layers.11.mlp.fc2"),
    # The same SD 1.x modules under their A1111/LDM names (§12.6 middle column).
    (SD1, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
     "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    (SD1, "lora_unet_output_blocks_11_0_out_layers_3", "unet.up_blocks.3.resnets.2.conv2"),
    (SD1, "lora_unet_middle_block_2_emb_layers_1", "unet.mid_block.resnets.1.time_emb_proj"),
    (SD1, "lora_unet_input_blocks_9_0_op", "unet.down_blocks.2.downsamplers.0.conv"),
    (SD1, "lora_unet_output_blocks_5_2_conv", "unet.up_blocks.1.upsamplers.0.conv"),
    (SD1, "lora_unet_output_blocks_2_1_conv", "unet.up_blocks.0.upsamplers.0.conv"),
    (SDXL, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    (SDXL, "lora_unet_output_blocks_2_2_conv", "unet.up_blocks.0.upsamplers.0.conv"),
    (SDXL, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder.encoder.layers.0.self_attn.q_proj"),
    (SDXL, "lora_te2_text_model_encoder_layers_5_self_attn_k_proj",
     "text_encoder_2.text_model.encoder.layers.5.self_attn.k_proj"),
    (SDXL, "lora_te2_text_model_encoder_layers_5_mlp_fc1", "text_encoder_2.text_model.encoder.layers.5.mlp.fc1"),
]


def test_spec_key_mapping_examples_on_full_size_models(tmp_path, full_sd1, full_sdxl):
    for family, models in ((SD1, full_sd1), (SDXL, full_sdxl)):
        examples = [(name, path) for fam, name, path in SPEC_12_6 if fam is family]
        network = names_network(tmp_path, f"spec_{family.key}.safetensors", [name for name, _ in examples])
        assert LoraPatch(network, family, 1.0, 1.0).module_paths(models) == dict(examples)


RESNET_TO_LDM = {"norm1": "in_layers_0", "conv1": "in_layers_2", "time_emb_proj": "emb_layers_1",
                 "norm2": "out_layers_0", "conv2": "out_layers_3", "conv_shortcut": "skip_connection"}
TOP_LEVEL_TO_LDM = {"conv_in": "input_blocks_0_0", "conv_out": "out_2", "conv_norm_out": "out_0",
                    "time_embedding.linear_1": "time_embed_0", "time_embedding.linear_2": "time_embed_2",
                    "add_embedding.linear_1": "label_emb_0_0", "add_embedding.linear_2": "label_emb_0_2"}


def a1111_ldm_name(path: str, per_level: int, up_levels_with_attention: set[int]) -> str:
    """A diffusers UNet path in A1111's LDM spelling (spec §1.3 table, with per-level block counts)."""
    if path in TOP_LEVEL_TO_LDM:
        return TOP_LEVEL_TO_LDM[path]

    def rest(kind: str, tail: str) -> str:
        head, _, remainder = tail.partition(".")
        if kind == "resnets":
            head = RESNET_TO_LDM[head]
        return "_".join(part for part in (head, remainder.replace(".", "_")) if part)

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        block = 1 + int(m[1]) * (per_level + 1) + int(m[3])
        return f"input_blocks_{block}_{0 if m[2] == 'resnets' else 1}_{rest(m[2], m[4])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks_{(int(m[1]) + 1) * (per_level + 1)}_0_op"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
        block = 1 if m[1] == "attentions" else 2 * int(m[2])
        return f"middle_block_{block}_{rest(m[1], m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        block = int(m[1]) * (per_level + 1) + int(m[3])
        return f"output_blocks_{block}_{0 if m[2] == 'resnets' else 1}_{rest(m[2], m[4])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        level = int(m[1])
        slot = 2 if level in up_levels_with_attention else 1
        return f"output_blocks_{level * (per_level + 1) + per_level}_{slot}_conv"
    raise AssertionError(f"no LDM name for {path}")


@pytest.mark.parametrize("family", [SD1, SDXL], ids=["sd1", "sdxl"])
def test_every_weighted_module_of_the_full_size_models_resolves_by_both_spellings(
    tmp_path, family, full_sd1, full_sdxl
):
    models = full_sd1 if family is SD1 else full_sdxl
    weighted = [p for p, m in models.items() if isinstance(getattr(m, "weight", None), torch.Tensor)
                and not p.endswith("embeddings.token_embedding") and not p.endswith("embeddings.position_embedding")]
    config = read_json((SHIPPED_SD1_CONFIG_DIR if family is SD1 else SHIPPED_SDXL_CONFIG_DIR) / "unet" / "config.json")
    up_with_attention = {i for i, kind in enumerate(config["up_block_types"]) if kind.startswith("CrossAttn")}
    expected: dict[str, str] = {}
    for path in weighted:
        expected[kohya_name(path, family.lora_prefixes)] = path
        if path.startswith("unet."):
            ldm = a1111_ldm_name(path.removeprefix("unet."), config["layers_per_block"], up_with_attention)
            expected["lora_unet_" + ldm] = path
    network = names_network(tmp_path, f"all_{family.key}.safetensors", list(expected))
    assert LoraPatch(network, family, 1.0, 1.0).module_paths(models) == expected


# ----------------------------------------------------------------------------------------- what does not fit


def test_a_network_for_the_other_family_matches_nothing(tmp_path, sd1, sdxl):
    sd1_network = load_lora_file(write(tmp_path, "sd1_lora.safetensors",
                                       lora_file(Rand(15), sd1, [SD1_TE_FC1, SD1_FF], SD1.lora_prefixes, 2, 2.0)))
    assert LoraPatch(sd1_network, SDXL, 1.0, 1.0).matched_modules(sdxl) == 0
    assert dict(LoraPatch(sd1_network, SDXL, 1.0, 1.0).deltas(sdxl)) == {}
    q = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    sdxl_network = load_lora_file(write(tmp_path, "sdxl_lora.safetensors", lora_file(
        Rand(16), sdxl, [q, "unet.down_blocks.1.attentions.0.proj_in"], SDXL.lora_prefixes, 2, 2.0)))
    assert LoraPatch(sdxl_network, SD1, 1.0, 1.0).matched_modules(sd1) == 0


def test_wrong_shapes_raise_patch_error_naming_the_file_before_any_delta(tmp_path, sd1):
    tensors = lora_file(Rand(17), sd1, [SD1_TE_FC1, SD1_FF], SD1.lora_prefixes, 2, 2.0)
    name = kohya_name(SD1_FF, SD1.lora_prefixes)
    tensors[f"{name}.lora_down.weight"] = torch.zeros(2, 33)  # the model's ff takes 32 inputs
    patch = LoraPatch(load_lora_file(write(tmp_path, "wrong_shape.safetensors", tensors)), SD1, 1.0, 1.0)
    assert patch.matched_modules(sd1) == 2
    with pytest.raises(PatchError) as raised:
        patch.deltas(sd1)
    assert raised.value.label == "wrong_shape.safetensors"
    assert "wrong_shape.safetensors" in str(raised.value)
    assert SD1_FF in raised.value.reason and "256×33" in raised.value.reason and "256×32" in raised.value.reason


def test_an_sd1_unet_lora_on_sdxl_fails_on_shapes_naming_the_file(tmp_path, sd1, sdxl):
    cross = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"  # exists in both, other widths
    tensors = lora_file(Rand(18), sd1, [cross], SD1.lora_prefixes, 2, 2.0)
    patch = LoraPatch(load_lora_file(write(tmp_path, "sd1_unet_only.safetensors", tensors)), SDXL, 1.0, 1.0)
    assert patch.matched_modules(sdxl) == 1
    with pytest.raises(PatchError, match=r"sd1_unet_only\.safetensors: .*another model family"):
        patch.deltas(sdxl)


def test_corrupt_truncated_and_non_safetensors_files_raise_lora_error_naming_the_file(tmp_path, sd1):
    good = write(tmp_path, "good.safetensors", lora_file(Rand(19), sd1, [SD1_FF], SD1.lora_prefixes, 2, 2.0))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    pickle_file = tmp_path / "old.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, pickle_file)
    for path, reason in ((truncated, "corrupt or truncated"), (garbage, "corrupt or truncated"),
                         (pickle_file, "only .safetensors"), (tmp_path / "missing.safetensors", "cannot be read")):
        with pytest.raises(LoraError) as raised:
            load_lora_file(path)
        assert raised.value.label == path.name
        assert str(raised.value).startswith(f"{path.name}: ")
        assert reason in raised.value.reason


def test_unknown_and_unsupported_module_types_refuse_the_file(tmp_path):
    unknown = write(tmp_path, "unknown.safetensors", {"lora_unet_conv_in.mystery": torch.zeros(2)})
    with pytest.raises(LoraError, match=r"unknown\.safetensors: module lora_unet_conv_in has keys mystery"):
        load_lora_file(unknown)
    glora = write(tmp_path, "glora.safetensors", {f"lora_unet_conv_in.{p}": torch.zeros(2, 2) for p in
                                                  ("a1.weight", "a2.weight", "b1.weight", "b2.weight")})
    with pytest.raises(LoraError, match="GLoRA module, which is not supported"):
        load_lora_file(glora)
    nothing = write(tmp_path, "checkpoint.safetensors", {"model.diffusion_model.x": torch.zeros(2)})
    with pytest.raises(LoraError, match="no LoRA/LyCORIS keys"):
        load_lora_file(nothing)


def test_bundled_embeddings_and_metadata_are_kept(tmp_path, sd1):
    tensors = lora_file(Rand(20), sd1, [SD1_FF], SD1.lora_prefixes, 2, 2.0)
    tensors["bundle_emb.mychar.string_to_param.*"] = torch.ones(2, 32)
    network = load_lora_file(write(tmp_path, "bundle.safetensors", tensors, {"ss_output_name": "bundle_alias"}))
    assert network.metadata["ss_output_name"] == "bundle_alias"
    assert list(network.bundled_embeddings) == ["mychar"]
    torch.testing.assert_close(network.bundled_embeddings["mychar"]["string_to_param.*"], torch.ones(2, 32))
    assert set(network.modules) == {kohya_name(SD1_FF, SD1.lora_prefixes)}
    assert all(tensor.device.type == "cpu" for module in network.modules.values() for tensor in module.tensors.values())
