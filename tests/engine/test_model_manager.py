"""Checkpoint detection, loading and failure handling on real safetensors files.
A bad file must fail with a message that says what it is, and leave the loaded model working."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from webui.core.params import GenerationParams
from webui.engine.devices import choose_device_policy
from webui.engine.families import CheckpointFormatError, detect_family, read_safetensors_header
from webui.engine.generate import generate
from webui.engine.model_manager import CheckpointLoadError, ModelManager, sidecar_config_dir
from webui.engine.model_registry import CheckpointNotFoundError, ModelRegistry, legacy_model_hash

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


def header_only_file(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    """A safetensors file with the given key names and shapes (zeros), for detection tests."""
    save_file({name: torch.zeros(shape) for name, shape in keys.items()}, str(path))
    return path


@pytest.fixture()
def models(tmp_path: Path, tiny_model_dir: Path) -> Path:
    folder = tmp_path / "Stable-diffusion"
    shutil.copytree(tiny_model_dir, folder)
    return folder


@pytest.mark.parametrize(
    "keys, message",
    [
        # SDXL base and SD 2.x load now (tests/engine/test_families.py); their inpainting variants do not.
        ({"conditioner.embedders.1.model.ln_final.weight": (4,), UNET_IN: (4, 9, 3, 3)}, "SDXL inpainting"),
        ({"conditioner.embedders.0.model.ln_final.weight": (4,), UNET_IN: (4, 4, 3, 3)}, "SDXL refiner"),
        ({"cond_stage_model.model.ln_final.weight": (4,), UNET_IN: (4, 9, 3, 3)}, "Stable Diffusion 2.x inpainting"),
        ({"model.diffusion_model.x_embedder.proj.weight": (4,)}, "Stable Diffusion 3"),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (4,)}, "Flux"),
        ({UNET_IN: (4, 9, 3, 3), "cond_stage_model.transformer.text_model.final_layer_norm.weight": (4,)}, "inpainting"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)}, "LoRA"),
        ({"encoder.conv_in.weight": (4, 3, 3, 3)}, "not a Stable Diffusion checkpoint"),
    ],
)
def test_unsupported_files_are_named(tmp_path: Path, keys: dict[str, tuple[int, ...]], message: str) -> None:
    path = header_only_file(tmp_path / "model.safetensors", keys)
    with pytest.raises(CheckpointFormatError, match=message):
        detect_family(path, read_safetensors_header(path))


def test_sd1_is_detected_from_the_header_alone(tiny_checkpoint: Path) -> None:
    assert detect_family(tiny_checkpoint, read_safetensors_header(tiny_checkpoint)).key == "sd1"


def test_failed_loads_leave_the_previous_model_generating(models: Path) -> None:
    manager = ModelManager(ModelRegistry([models]), choose_device_policy(force_cpu=True))
    working = manager.ensure("tiny")

    truncated = models / "truncated.safetensors"
    data = (models / "tiny_b.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    shutil.copytree(sidecar_config_dir(models / "tiny_b.safetensors"), sidecar_config_dir(truncated))
    garbage = models / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    renamed_pickle = models / "pickled.safetensors"
    renamed_pickle.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)

    expectations = {"truncated": "truncated", "garbage": "not a valid safetensors", "pickled": "pickle"}
    for name, message in expectations.items():
        with pytest.raises((CheckpointFormatError, CheckpointLoadError), match=message):
            manager.ensure(name)
        assert manager.current is working

    params = GenerationParams(prompt="still works", width=64, height=64, steps=2)
    images = [image for batch in generate(manager.current, params, 3, "test") for image in batch]
    assert len(images) == 1 and "Model: tiny," in images[0].infotext


def test_sidecar_config_overrides_the_shipped_one(models: Path) -> None:
    manager = ModelManager(ModelRegistry([models]), choose_device_policy(force_cpu=True))
    assert manager.ensure("tiny").config_dir == sidecar_config_dir(models / "tiny.safetensors")
    shutil.rmtree(sidecar_config_dir(models / "tiny_b.safetensors"))
    # Without its sidecar the tiny file is read against the full-size SD 1.x config and cannot fit.
    with pytest.raises(CheckpointLoadError, match="do not fit its config|has shape"):
        manager.ensure("tiny_b")
    assert manager.current is not None and manager.current.info.stem == "tiny"


def test_swapping_checkpoints_changes_the_model(models: Path) -> None:
    manager = ModelManager(ModelRegistry([models]), choose_device_policy(force_cpu=True))
    first = manager.ensure("tiny")
    assert manager.ensure("tiny.safetensors") is first
    second = manager.ensure("tiny_b")
    assert second.info.stem == "tiny_b" and second.short_hash != first.short_hash


def test_registry_names_hashes_and_containment(models: Path, tmp_path: Path) -> None:
    nested = models / "anime"
    nested.mkdir()
    shutil.copy(models / "tiny_b.safetensors", nested / "nested.safetensors")
    shutil.copy(models / "tiny.safetensors", models / "tiny.vae.safetensors")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(models / "tiny.safetensors", outside)
    registry = ModelRegistry([models])

    names = [info.name for info in registry.scan()]
    assert names == ["anime/nested.safetensors", "tiny.safetensors", "tiny_b.safetensors"]
    assert registry.resolve("anime/nested").stem == "nested"
    assert registry.resolve("nested").name == "anime/nested.safetensors"
    tiny = registry.resolve("tiny")
    assert registry.resolve(registry.short_hash(tiny)).path == tiny.path
    assert registry.resolve(legacy_model_hash(tiny.path)).path == tiny.path
    # A request (not the local command line) can never name a file outside the model folders.
    for query in (str(outside), "../outside", "../outside.safetensors"):
        with pytest.raises(CheckpointNotFoundError):
            registry.resolve(query)
    assert registry.resolve(str(outside), allow_outside_paths=True).path == outside.resolve()
