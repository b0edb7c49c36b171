"""LoRA tags in a txt2img job: the image equals a checkpoint with the same delta merged into its weights, multiplier 0
and plain jobs are byte for byte the plain image after any sequence of LoRA jobs and swaps, bad files are warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.images import pixels, png_bytes
from tests.fixtures.network_files import SD1_LORA_PREFIXES, kohya_name, ref_lora, write_checkpoint_with_deltas
from tests.fixtures.tiny_sd import build_tiny_sd1_modules, write_tiny_checkpoint
from webui.core.infotext import parse_infotext
from webui.core.params import GenerationParams
from webui.engine.devices import choose_device_policy
from webui.engine.generate import GeneratedImage, generate
from webui.engine.model_manager import ModelManager
from webui.engine.model_registry import ModelRegistry
from webui.engine.networks.activation import ExtraNetworks
from webui.engine.networks.registry import LoraRegistry

SMALL = dict(width=64, height=64, steps=3, sampler="Euler")
RANK = 2
ALPHA = 1.0


def _targets(modules: object) -> list[tuple[str, str, torch.nn.Module]]:
    """A few Linear and Conv2d layers of the UNet and the text encoder: what a kohya LoCon touches."""
    chosen: list[tuple[str, str, torch.nn.Module]] = []
    for component, root in (("unet", modules.unet), ("text_encoder", modules.text_encoder)):  # type: ignore[attr-defined]
        for path, module in root.named_modules():
            is_attention = isinstance(module, torch.nn.Linear) and ("attn" in path or "self_attn" in path)
            is_resnet_conv = isinstance(module, torch.nn.Conv2d) and "resnets" in path and path.endswith("conv1")
            if is_attention or is_resnet_conv:
                chosen.append((component, path, module))
    return chosen


def _write_lora_and_merged(tmp_path: Path, multiplier: float) -> tuple[Path, Path]:
    """models/Stable-diffusion/{base,merged}.safetensors and models/Lora/style.safetensors (kohya LoCon)."""
    modules = build_tiny_sd1_modules(seed=0)
    model_dir = tmp_path / "models" / "Stable-diffusion"
    write_tiny_checkpoint(model_dir / "base.safetensors", modules)
    generator = torch.Generator().manual_seed(7)
    lora: dict[str, torch.Tensor] = {}
    deltas: dict[str, tuple[torch.Tensor, None]] = {}
    for component, path, module in _targets(modules):
        weight = module.weight
        out_features, in_features = weight.shape[0], weight.shape[1]
        kernel = weight.shape[2:]
        down = torch.randn((RANK, in_features, *kernel), generator=generator) * 0.3
        up = torch.randn((out_features, RANK, *([1] * len(kernel))), generator=generator) * 0.3
        name = kohya_name(f"{component}.{path}", SD1_LORA_PREFIXES)
        lora[f"{name}.lora_down.weight"] = down
        lora[f"{name}.lora_up.weight"] = up
        lora[f"{name}.alpha"] = torch.tensor(ALPHA)
        deltas[f"{component}.{path}"] = (ref_lora(up, down, tuple(weight.shape)) * (ALPHA / RANK) * multiplier, None)
    write_checkpoint_with_deltas(model_dir / "merged.safetensors", modules, deltas)
    lora_dir = tmp_path / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    save_file(lora, str(lora_dir / "style.safetensors"), metadata={"ss_output_name": "style_alias"})
    return model_dir, lora_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelManager, ExtraNetworks, Path]:
    tmp_path = tmp_path_factory.mktemp("lora_job")
    model_dir, lora_dir = _write_lora_and_merged(tmp_path, multiplier=0.8)
    manager = ModelManager(ModelRegistry([model_dir]), choose_device_policy(force_cpu=True), ram_cache_size=lambda: 1)
    return manager, ExtraNetworks(LoraRegistry([lora_dir])), lora_dir


def _run(manager: ModelManager, networks: ExtraNetworks, checkpoint: str, prompt: str,
         warnings: list[str] | None = None) -> GeneratedImage:
    model = manager.ensure(checkpoint)
    params = GenerationParams(prompt=prompt, **SMALL)  # type: ignore[arg-type]
    on_warning = warnings.append if warnings is not None else None
    batches = generate(model, params, 42, "test", networks=networks, on_warning=on_warning)
    return [image for batch in batches for image in batch][0]


def test_lora_tag_gives_the_image_of_the_checkpoint_with_the_delta_merged(setup) -> None:
    manager, networks, _ = setup
    plain = _run(manager, networks, "base", "a cat")
    with_lora = _run(manager, networks, "base", "a cat <lora:style:0.8>")
    reference = _run(manager, networks, "merged", "a cat")
    assert not np.array_equal(pixels(plain), pixels(with_lora))
    # Same weights up to float32 rounding of W + ΔW: at most one step of 255 anywhere.
    assert np.abs(pixels(with_lora) - pixels(reference)).max() <= 1
    infotext = parse_infotext(with_lora.infotext)
    assert infotext.prompt == "a cat <lora:style:0.8>"
    assert infotext.fields["Lora hashes"].startswith("style: ")
    assert len(infotext.fields["Lora hashes"].split(": ")[1]) == 12


def test_alias_and_lyco_tag_find_the_same_file(setup) -> None:
    manager, networks, _ = setup
    by_stem = _run(manager, networks, "base", "a cat <lora:style:0.8>")
    by_alias = _run(manager, networks, "base", "a cat <lyco:style_alias:0.8>")
    assert np.array_equal(pixels(by_stem), pixels(by_alias))


def test_multiplier_zero_and_plain_jobs_after_lora_jobs_and_swaps_are_byte_identical(setup) -> None:
    manager, networks, _ = setup
    first_plain = png_bytes(_run(manager, networks, "base", "a cat"))
    assert png_bytes(_run(manager, networks, "base", "a cat <lora:style:0>")) == first_plain
    _run(manager, networks, "base", "a cat <lora:style:1>")
    _run(manager, networks, "base", "a cat <lora:style:1>")  # same set: kept merged
    _run(manager, networks, "merged", "a cat")  # swap: base goes to the RAM cache (unpatched)
    _run(manager, networks, "base", "a cat <lora:style:0.5:1>")  # back from the RAM cache, patched again
    assert png_bytes(_run(manager, networks, "base", "a cat")) == first_plain


def test_missing_and_broken_networks_are_warnings_and_the_job_runs(setup) -> None:
    manager, networks, lora_dir = setup
    (lora_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    plain = png_bytes(_run(manager, networks, "base", "a cat"))
    warnings: list[str] = []
    image = _run(manager, networks, "base", "a cat <lora:nothere:1> <lora:broken:1>", warnings)
    assert png_bytes(image) == plain
    assert any("Lora not found: nothere" in warning for warning in warnings)
    assert any("broken" in warning and "broken.safetensors" in warning for warning in warnings)


def test_an_extension_weight_patch_is_merged_for_the_job_and_undone(setup, tmp_path: Path) -> None:
    """The shipped unet_gain example: gain g gives W' = (1+g)·W on unet.conv_out, through the same patch layer."""
    from tests.app.test_extensions import make_host

    manager, networks, _ = setup
    host = make_host(tmp_path)
    host.enable("unet_gain")
    model = manager.ensure("base")
    plain = png_bytes(_run(manager, networks, "base", "a cat"))
    original = model.unet.conv_out.weight.detach().clone()

    def run_with_gain(gain: float) -> GeneratedImage:
        params = GenerationParams(prompt="a cat", **SMALL).with_extension_values("unet_gain", {"gain": gain})  # type: ignore[arg-type]
        return [image for batch in generate(model, params, 42, "test", hooks=host) for image in batch][0]

    boosted = run_with_gain(0.3)
    assert torch.allclose(model.unet.conv_out.weight, original * 1.3)  # still merged: kept for a job asking the same
    assert png_bytes(boosted) != plain and "UNet gain: 0.3" in boosted.infotext
    assert png_bytes(run_with_gain(0.0)) == plain
    assert torch.equal(model.unet.conv_out.weight, original)
