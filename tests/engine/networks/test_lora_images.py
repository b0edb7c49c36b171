"""Every LoRA/LyCORIS format, applied at run time by a `<lora:name:te:unet>` tag, gives the image of a checkpoint
with the same ΔW merged into its weights (at most 1/255 apart), on the tiny SD 1.x and SDXL files.

Each network is a file in its trainer's layout in models/Lora (kohya names; SDXL: lora_te1_/lora_te2_ and LDM UNet
names; diffusers/PEFT keys). Its ΔW is computed here from the file's tensors with A1111 1.10's formulas written out
in plain torch (tests/fixtures/network_files), never by webui.engine.networks, and added to a copy of the weights
saved as another checkpoint. te 0.5 and unet 1.2 differ, so a multiplier on the wrong component shows.
Must not import gradio, fastapi or webui.app."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.images import pixels
from tests.fixtures.network_files import (
    SD1_LORA_PREFIXES,
    SDXL_LORA_PREFIXES,
    SDXL_METADATA,
    kohya_name,
    ldm_unet_names,
    ref_cp,
    ref_dora_per_input,
    ref_dora_per_output,
    ref_lora,
    ref_tucker,
    write_checkpoint_with_deltas,
)
from tests.fixtures.tiny_sd import SD1Modules, SDXLModules, build_tiny_sd1_modules, build_tiny_sdxl_modules
from tests.fixtures.tiny_sd import write_tiny_checkpoint as write_checkpoint
from webui.core.params import GenerationParams
from webui.engine.devices import choose_device_policy
from webui.engine.generate import GeneratedImage, generate
from webui.engine.model_manager import ModelManager
from webui.engine.model_registry import ModelRegistry
from webui.engine.networks.activation import ExtraNetworks
from webui.engine.networks.registry import LoraRegistry

SMALL = dict(width=64, height=64, steps=3, sampler="Euler")
PROMPT = "a cat"
SEED = 42
TE, UNET = 0.5, 1.2
# float32 rounding of W + ΔW, added in another order: at most one step of 255 anywhere.
TOLERANCE = 1
# What a network must change at least (largest pixel difference), so that "equal to the merged checkpoint" says
# more than "equal to the plain one".
VISIBLE = 8


# ------------------------------------------------------------------------------------------- tiny models


@dataclass(frozen=True)
class Tiny:
    """A tiny model and the modules the networks patch, by role ("<component>.<path>" paths)."""

    key: str
    modules: SD1Modules | SDXLModules
    prefixes: dict[str, str]
    te_linears: tuple[str, ...]  # first layer of each text encoder (SDXL conditions on the penultimate one)
    te_norms: tuple[str, ...]
    unet_linear: str  # a Linear without bias
    conv3: str  # Conv2d 3×3, out ≠ in
    conv1: str  # Conv2d 1×1 with bias
    group_norm: str
    metadata: dict[str, str] = field(default_factory=dict)
    ldm_names: dict[str, str] = field(default_factory=dict)  # SDXL kohya files spell the UNet in LDM names

    def weight(self, path: str) -> torch.Tensor:
        component, _, inner = path.partition(".")
        return getattr(self.modules, component).get_submodule(inner).weight.detach()

    def kohya(self, path: str) -> str:
        component, _, inner = path.partition(".")
        if component == "unet" and self.ldm_names:
            return "lora_unet_" + self.ldm_names[inner].replace(".", "_")
        return kohya_name(path, self.prefixes)

    @staticmethod
    def multiplier(path: str) -> float:
        return TE if path.startswith("text_encoder") else UNET


def tiny_sd1() -> Tiny:
    return Tiny(
        key="sd1",
        modules=build_tiny_sd1_modules(seed=0),
        prefixes=SD1_LORA_PREFIXES,
        te_linears=("text_encoder.encoder.layers.0.mlp.fc1",),  # 37×32
        te_norms=("text_encoder.encoder.layers.0.layer_norm1",),
        unet_linear="unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
        conv3="unet.up_blocks.0.resnets.0.conv1",  # 64×128×3×3
        conv1="unet.down_blocks.1.resnets.0.conv_shortcut",  # 64×32×1×1
        group_norm="unet.up_blocks.0.resnets.0.norm1",
    )


def tiny_sdxl() -> Tiny:
    modules = build_tiny_sdxl_modules(seed=0)
    return Tiny(
        key="sdxl",
        modules=modules,
        prefixes=SDXL_LORA_PREFIXES,
        te_linears=("text_encoder.encoder.layers.0.mlp.fc1", "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"),
        te_norms=("text_encoder.encoder.layers.0.layer_norm1", "text_encoder_2.text_model.encoder.layers.0.layer_norm1"),
        unet_linear="unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
        conv3="unet.up_blocks.0.resnets.0.conv1",  # 64×128×3×3
        conv1="unet.up_blocks.0.resnets.0.conv_shortcut",  # 64×128×1×1
        group_norm="unet.up_blocks.1.resnets.0.norm1",
        metadata=SDXL_METADATA,
        ldm_names=ldm_unet_names(modules.unet),
    )


# ---------------------------------------------------------------------------------------------- networks


class Rand:
    """Seeded random tensors, so every run writes the same files."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * scale


class Network:
    """A network file's tensors and the ΔW (times its component's multiplier) it should add to each module."""

    def __init__(self, tiny: Tiny) -> None:
        self.tiny = tiny
        self.tensors: dict[str, torch.Tensor] = {}
        self.metadata: dict[str, str] = dict(tiny.metadata)
        self.deltas: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def add(self, path: str, parts: dict[str, torch.Tensor], weight_delta: torch.Tensor,
            bias_delta: torch.Tensor | None = None, name: str | None = None) -> None:
        """`parts` under the module's kohya name (or `name`); ΔW and Δbias before the multiplier (A1111 applies
        it last, to every type)."""
        for part, tensor in parts.items():
            self.tensors[f"{name or self.tiny.kohya(path)}.{part}"] = tensor.contiguous()
        multiplier = self.tiny.multiplier(path)
        self.deltas[path] = (weight_delta * multiplier, None if bias_delta is None else bias_delta * multiplier)


def lora_parts(rand: Rand, shape: torch.Size, rank: int, alpha: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """kohya lora_down (rank, in[, k, k]) / lora_up (out, rank[, 1, 1]) / alpha, and ΔW = up·down·alpha/rank."""
    down = rand(rank, shape[1], *shape[2:])
    up = rand(shape[0], rank, *[1] * (len(shape) - 2))
    parts = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha)}
    return parts, ref_lora(up, down, tuple(shape)) * (alpha / rank)


def kohya_lora_locon(net: Network, rand: Rand) -> None:
    tiny = net.tiny
    for path in (*tiny.te_linears, tiny.unet_linear, tiny.conv3, tiny.conv1):
        parts, delta = lora_parts(rand, tiny.weight(path).shape, rank=4, alpha=2.0)
        net.add(path, parts, delta)


def locon_cp(net: Network, rand: Rand) -> None:
    tiny = net.tiny
    parts, delta = lora_parts(rand, tiny.weight(tiny.te_linears[0]).shape, rank=4, alpha=4.0)
    net.add(tiny.te_linears[0], parts, delta)
    out_dim, in_dim, k, _ = tiny.weight(tiny.conv3).shape
    down, mid, up = rand(3, in_dim, 1, 1), rand(3, 3, k, k), rand(out_dim, 3, 1, 1)
    parts = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up, "alpha": torch.tensor(1.5)}
    net.add(tiny.conv3, parts, ref_cp(up, down, mid) * (1.5 / 3))


def loha(net: Network, rand: Rand) -> None:
    tiny = net.tiny
    for path in (*tiny.te_linears, tiny.unet_linear):
        out_dim, in_dim = tiny.weight(path).shape
        w1a, w1b, w2a, w2b = rand(out_dim, 4), rand(4, in_dim), rand(out_dim, 4), rand(4, in_dim)
        parts = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(2.0)}
        net.add(path, parts, (w1a @ w1b) * (w2a @ w2b) * (2.0 / 4))
    # Tucker conv (LyCORIS layout): w_a (r, out), w_b (r, in), t (r, r, k, k).
    out_dim, in_dim, k, _ = tiny.weight(tiny.conv3).shape
    w1a, w1b, t1 = rand(3, out_dim, scale=0.5), rand(3, in_dim, scale=0.5), rand(3, 3, k, k, scale=0.5)
    w2a, w2b, t2 = rand(3, out_dim, scale=0.5), rand(3, in_dim, scale=0.5), rand(3, 3, k, k, scale=0.5)
    parts = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_t1": t1, "hada_w2_a": w2a, "hada_w2_b": w2b, "hada_t2": t2,
             "alpha": torch.tensor(1.0)}
    net.add(tiny.conv3, parts, ref_tucker(t1, w1a, w1b) * ref_tucker(t2, w2a, w2b) * (1.0 / 3))


def _kron_factor(size: int) -> int:
    return 4 if size % 4 == 0 else 1


def lokr(net: Network, rand: Rand) -> None:
    tiny = net.tiny
    for path in tiny.te_linears:  # both factors full: no rank, so alpha has no effect
        out_dim, in_dim = tiny.weight(path).shape
        a, b = _kron_factor(out_dim), _kron_factor(in_dim)
        w1, w2 = rand(a, b, scale=0.5), rand(out_dim // a, in_dim // b)
        net.add(path, {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(99.0)}, torch.kron(w1, w2))
    out_dim, in_dim = tiny.weight(tiny.unet_linear).shape
    w1, w2a, w2b = rand(4, 4, scale=0.5), rand(out_dim // 4, 2), rand(2, in_dim // 4)
    parts = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)}
    net.add(tiny.unet_linear, parts, torch.kron(w1, w2a @ w2b) * (1.0 / 2))
    out_dim, in_dim, k, _ = tiny.weight(tiny.conv3).shape
    w1, w2a, w2b, t2 = rand(8, 8, scale=0.5), rand(2, out_dim // 8), rand(2, in_dim // 8), rand(2, 2, k, k)
    parts = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "lokr_t2": t2, "alpha": torch.tensor(4.0)}
    net.add(tiny.conv3, parts, torch.kron(w1[:, :, None, None], ref_tucker(t2, w2a, w2b)) * (4.0 / 2))


def ia3(net: Network, rand: Rand) -> None:
    """W ⊙ w: one value per output row, or per input column with on_input (ΔW = W·w, so W' = W·(1 + m·w))."""
    tiny = net.tiny
    for path, on_input in ((tiny.te_linears[0], False), (tiny.te_linears[-1], True), (tiny.unet_linear, True)):
        weight = tiny.weight(path)
        vector = rand(weight.shape[1] if on_input else weight.shape[0], scale=0.8)
        scaled = weight * (vector[None, :] if on_input else vector[:, None])
        net.add(path, {"weight": vector, "on_input": torch.tensor(on_input)}, scaled)


def full(net: Network, rand: Rand) -> None:
    tiny = net.tiny
    for path in (tiny.te_linears[0], tiny.conv1):
        weight = tiny.weight(path)
        diff, diff_b = rand(*weight.shape, scale=0.1), rand(weight.shape[0], scale=0.3)
        net.add(path, {"diff": diff, "diff_b": diff_b}, diff, diff_b)
    diff = rand(*tiny.weight(tiny.unet_linear).shape, scale=0.1)
    net.add(tiny.unet_linear, {"diff": diff}, diff)


def norm(net: Network, rand: Rand) -> None:
    tiny = net.tiny
    for path in (*tiny.te_norms, tiny.group_norm):
        channels = tiny.weight(path).shape[0]
        w_norm, b_norm = rand(channels, scale=0.5), rand(channels, scale=0.5)
        net.add(path, {"w_norm": w_norm, "b_norm": b_norm}, w_norm, b_norm)


def _column_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def dora(net: Network, rand: Rand) -> None:
    """kohya/A1111 dora_scale (1, in[, 1, 1]) per input channel; LyCORIS' (out, 1) per output row. Magnitudes near
    the norms of W + ΔW, as training leaves them."""
    tiny = net.tiny
    for path in (tiny.te_linears[0], tiny.conv3):
        weight = tiny.weight(path)
        parts, lora = lora_parts(rand, weight.shape, rank=4, alpha=2.0)
        magnitude = _column_norms(weight + lora) * (1 + rand(weight.shape[1]).abs())
        parts["dora_scale"] = magnitude.reshape(1, -1, *[1] * (weight.dim() - 2))
        net.add(path, parts, ref_dora_per_input(weight, lora, parts["dora_scale"]))
    weight = tiny.weight(tiny.unet_linear)
    parts, lora = lora_parts(rand, weight.shape, rank=4, alpha=2.0)
    parts["dora_scale"] = ((weight + lora).norm(dim=1) * (1 + rand(weight.shape[0]).abs())).reshape(-1, 1)
    net.add(tiny.unet_linear, parts, ref_dora_per_output(weight, lora, parts["dora_scale"]))


def diffusers_peft(net: Network, rand: Rand) -> None:
    """diffusers' save_lora_weights layout: "<component>.<module path>.lora_A/lora_B.weight" (text encoders with
    transformers' text_model level), alpha from the PEFT adapter config in the metadata."""
    tiny = net.tiny
    adapter: dict[str, object] = {}
    for path in (*tiny.te_linears, tiny.unet_linear, tiny.conv3):
        component, _, inner = path.partition(".")
        rank, alpha = (4, 8) if component == "unet" else (2, 1)
        adapter.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha})
        if component != "unet" and not inner.startswith("text_model."):
            inner = "text_model." + inner
        shape = tiny.weight(path).shape
        down, up = rand(rank, shape[1], *shape[2:]), rand(shape[0], rank, *[1] * (len(shape) - 2))
        parts = {"lora_A.weight": down, "lora_B.weight": up}
        net.add(path, parts, ref_lora(up, down, tuple(shape)) * (alpha / rank), name=f"{component}.{inner}")
    net.metadata = {"lora_adapter_metadata": json.dumps(adapter)}


FORMATS: dict[str, Callable[[Network, Rand], None]] = {
    "kohya_lora_locon": kohya_lora_locon,
    "locon_cp": locon_cp,
    "loha": loha,
    "lokr": lokr,
    "ia3": ia3,
    "full": full,
    "norm": norm,
    "dora": dora,
    "diffusers_peft": diffusers_peft,
}
# Run on every `pytest`; the rest is marked slow.
FAST = {("sd1", "kohya_lora_locon"), ("sdxl", "kohya_lora_locon"), ("sd1", "lokr"), ("sdxl", "dora")}


# ---------------------------------------------------------------------------------------------- the jobs


@dataclass
class World:
    tiny: Tiny
    model_dir: Path
    lora_dir: Path
    manager: ModelManager
    networks: ExtraNetworks
    plain: np.ndarray

    def run(self, checkpoint: str, prompt: str) -> GeneratedImage:
        model = self.manager.ensure(checkpoint)
        params = GenerationParams(prompt=prompt, **SMALL)  # type: ignore[arg-type]
        warnings: list[str] = []
        batches = generate(model, params, SEED, "test", networks=self.networks, on_warning=warnings.append)
        assert warnings == []
        return [image for batch in batches for image in batch][0]


def build_world(tiny: Tiny, root: Path) -> World:
    """models/Stable-diffusion/base.safetensors and an empty models/Lora, a manager and the plain image."""
    model_dir, lora_dir = root / "models" / "Stable-diffusion", root / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    write_checkpoint(model_dir / "base.safetensors", tiny.modules)
    manager = ModelManager(ModelRegistry([model_dir]), choose_device_policy(force_cpu=True), ram_cache_size=lambda: 1)
    world = World(tiny, model_dir, lora_dir, manager, ExtraNetworks(LoraRegistry([lora_dir])), np.empty(0))
    world.plain = pixels(world.run("base", PROMPT))
    return world


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], World]:
    """The world of a family ("sd1", "sdxl"), built on first use and kept for the module."""
    built: dict[str, World] = {}

    def get(family: str) -> World:
        if family not in built:
            tiny = tiny_sd1() if family == "sd1" else tiny_sdxl()
            built[family] = build_world(tiny, tmp_path_factory.mktemp(f"lora_images_{family}"))
        return built[family]

    return get


def cases() -> list[object]:
    params = []
    for family in ("sd1", "sdxl"):
        for format_name in FORMATS:
            marks = () if (family, format_name) in FAST else (pytest.mark.slow,)
            params.append(pytest.param(family, format_name, marks=marks, id=f"{family}-{format_name}"))
    return params


@pytest.mark.parametrize(("family", "format_name"), cases())
def test_network_at_run_time_gives_the_image_of_the_checkpoint_with_its_delta_merged(
    worlds: Callable[[str], World], family: str, format_name: str
) -> None:
    world = worlds(family)
    net = Network(world.tiny)
    FORMATS[format_name](net, Rand(sorted(FORMATS).index(format_name)))
    save_file(net.tensors, str(world.lora_dir / f"{format_name}.safetensors"), metadata=net.metadata or None)
    write_checkpoint_with_deltas(world.model_dir / f"merged_{format_name}.safetensors", world.tiny.modules, net.deltas)

    with_lora = pixels(world.run("base", f"{PROMPT} <lora:{format_name}:{TE}:{UNET}>"))
    swapped = pixels(world.run("base", f"{PROMPT} <lora:{format_name}:{UNET}:{TE}>"))
    merged = pixels(world.run(f"merged_{format_name}", PROMPT))

    assert np.abs(merged - world.plain).max() >= VISIBLE
    assert np.abs(with_lora - merged).max() <= TOLERANCE
    # The text encoders' and the UNet's parts both show: te and unet multipliers swapped give another image.
    assert np.abs(swapped - merged).max() > TOLERANCE
