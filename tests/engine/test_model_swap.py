"""Swapping checkpoints: kept skeletons, the RAM cache, VAE choice, rollback, memory, and the hash cache.
Real tiny safetensors files on disk; the images compared are the decoded pixels users would save."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.vae_files import build_tiny_vae_file
from webui.core.files import sha256_of_file
from webui.core.infotext import parse_infotext
from webui.core.params import GenerationParams
from webui.engine import model_manager as model_manager_module
from webui.engine.checkpoint_loading import CheckpointLoadError, sidecar_config_dir
from webui.engine.devices import choose_device_policy
from webui.engine.generate import generate
from webui.engine.model_manager import LoadedModel, ModelManager
from webui.engine.model_registry import (
    FileHasher,
    ModelRegistry,
    VaeNotFoundError,
    VaeRegistry,
)

PARAMS = GenerationParams(prompt="a red fox", width=64, height=64, steps=3, seed=11)


def picture_bytes(model: LoadedModel, params: GenerationParams = PARAMS) -> tuple[bytes, str]:
    images = [image for batch in generate(model, params, params.seed, "test") for image in batch]
    return images[0].image.tobytes(), images[0].infotext


def resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture()
def data_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "Stable-diffusion")
    (tmp_path / "models" / "VAE").mkdir()
    return tmp_path


def make_manager(data_dir: Path, ram_cache_size: int = 1, hasher: FileHasher | None = None) -> ModelManager:
    hasher = hasher or FileHasher(data_dir / "cache" / "model-hashes.json")
    registry = ModelRegistry([data_dir / "models" / "Stable-diffusion"], hasher)
    vaes = VaeRegistry([data_dir / "models" / "VAE"], hasher)
    return ModelManager(registry, choose_device_policy(force_cpu=True), vaes, ram_cache_size=lambda: ram_cache_size)


class ReadCounter:
    """Counts checkpoint file reads while calling the real reader (the spy only observes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        real = model_manager_module.read_checkpoint

        def counting(info, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.names.append(info.name)
            return real(info, *args, **kwargs)

        monkeypatch.setattr(model_manager_module, "read_checkpoint", counting)


def test_swap_back_from_the_ram_cache_gives_the_same_image(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = ReadCounter(monkeypatch)
    manager = make_manager(data_dir)
    first_a = manager.ensure("tiny")
    unet_module = first_a.unet
    image_a, _ = picture_bytes(first_a)

    model_b = manager.ensure("tiny_b")
    image_b, _ = picture_bytes(model_b)
    assert image_b != image_a
    # Same family and config: B's weights went into A's modules, nothing was rebuilt.
    assert model_b.unet is unet_module
    assert [info.name for info in manager.ram_cached()] == ["tiny.safetensors"]

    back_to_a = manager.ensure("tiny")
    assert picture_bytes(back_to_a)[0] == image_a
    assert reads.names == ["tiny.safetensors", "tiny_b.safetensors"], "swapping back must not re-read the file"
    assert [info.name for info in manager.ram_cached()] == ["tiny_b.safetensors"]


def test_without_a_ram_cache_swapping_back_reads_the_file_again(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = ReadCounter(monkeypatch)
    manager = make_manager(data_dir, ram_cache_size=0)
    image_a = picture_bytes(manager.ensure("tiny"))[0]
    manager.ensure("tiny_b")
    assert manager.ram_cached() == []
    assert picture_bytes(manager.ensure("tiny"))[0] == image_a
    assert reads.names == ["tiny.safetensors", "tiny_b.safetensors", "tiny.safetensors"]


def test_corrupt_truncated_and_misfitting_files_leave_the_model_generating(data_dir: Path) -> None:
    models = data_dir / "models" / "Stable-diffusion"
    manager = make_manager(data_dir)
    working = manager.ensure("tiny")
    expected = picture_bytes(working)[0]
    manager.ensure("tiny_b")
    manager.ensure("tiny")  # tiny_b now waits in the RAM cache

    data = (models / "tiny_b.safetensors").read_bytes()
    (models / "truncated.safetensors").write_bytes(data[: len(data) * 2 // 3])
    tiny_b_config = sidecar_config_dir(models / "tiny_b.safetensors")
    shutil.copytree(tiny_b_config, sidecar_config_dir(models / "truncated.safetensors"))
    corrupt = bytearray(data)
    corrupt[8:40] = b"\xff" * 32  # the JSON header is broken
    (models / "corrupt.safetensors").write_bytes(bytes(corrupt))
    # A file whose weights do not fit its config (a sidecar with another UNet width): a "wrong family" load.
    shutil.copy(models / "tiny_b.safetensors", models / "misfit.safetensors")
    misfit_config = sidecar_config_dir(models / "misfit.safetensors")
    shutil.copytree(sidecar_config_dir(models / "tiny_b.safetensors"), misfit_config)
    unet_config = misfit_config / "unet" / "config.json"
    unet_config.write_text(unet_config.read_text().replace('"cross_attention_dim": 32', '"cross_attention_dim": 48'))

    for name, message in (("truncated", "truncated"), ("corrupt", "not a valid safetensors"), ("misfit", "shape")):
        with pytest.raises((CheckpointLoadError, ValueError), match=message):
            manager.ensure(name)
        assert manager.current is not None and manager.current.info.name == "tiny.safetensors"
        assert picture_bytes(manager.current)[0] == expected
    # The RAM cache slot was given up before reading the new file, so RAM never holds cache + current + new.
    assert manager.ram_cached() == []


def test_out_of_memory_while_placing_puts_the_previous_model_back(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = make_manager(data_dir)
    model_a = manager.ensure("tiny")
    expected = picture_bytes(model_a)[0]
    real_put = model_manager_module._put_weights
    calls = {"count": 0}

    # This machine has no GPU to run out of: the GPU's out-of-memory error is raised at the point where
    # a real one would come (copying the new weights into place), after one component was already copied.
    def running_out(module, weights, device):  # type: ignore[no-untyped-def]
        calls["count"] += 1
        if calls["count"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        real_put(module, weights, device)

    monkeypatch.setattr(model_manager_module, "_put_weights", running_out)
    with pytest.raises(CheckpointLoadError, match="out of GPU memory"):
        manager.ensure("tiny_b")
    monkeypatch.setattr(model_manager_module, "_put_weights", real_put)
    assert manager.current is model_a
    assert [info.name for info in manager.resident()] == ["tiny.safetensors"]
    assert picture_bytes(manager.current)[0] == expected


def test_fifty_swaps_keep_resident_memory_flat(data_dir: Path) -> None:
    manager = make_manager(data_dir)
    manager.ensure("tiny")
    manager.ensure("tiny_b")
    after_second_swap = resident_bytes()
    for index in range(50):
        manager.ensure("tiny" if index % 2 == 0 else "tiny_b")
    assert resident_bytes() <= after_second_swap * 1.10
    assert len(manager.ram_cached()) == 1 and len(manager.resident()) == 1


def test_vae_choice_automatic_file_and_none(data_dir: Path) -> None:
    models = data_dir / "models" / "Stable-diffusion"
    build_tiny_vae_file(data_dir / "models" / "VAE" / "tiny-ft.safetensors", seed=7)
    manager = make_manager(data_dir)
    own_image, own_infotext = picture_bytes(manager.ensure("tiny", vae="Automatic"))
    assert "VAE" not in parse_infotext(own_infotext).fields

    external = manager.ensure("tiny", vae="tiny-ft.safetensors")
    external_image, external_infotext = picture_bytes(external)
    assert external_image != own_image
    fields = parse_infotext(external_infotext).fields
    assert fields["VAE"] == "tiny-ft.safetensors"
    # The hash comes from the background hasher; wait for it as a user waits for a listing to fill in.
    deadline = time.monotonic() + 30
    while external.vae_hash is None and time.monotonic() < deadline:
        time.sleep(0.05)
    expected_hash = sha256_of_file(data_dir / "models" / "VAE" / "tiny-ft.safetensors")[:10]
    assert parse_infotext(picture_bytes(external)[1]).fields["VAE hash"] == expected_hash

    assert picture_bytes(manager.ensure("tiny", vae="None"))[0] == own_image

    # Automatic prefers <checkpoint>.vae.safetensors beside the checkpoint (A1111's rule), prefixed keys too.
    build_tiny_vae_file(models / "tiny.vae.safetensors", seed=7, keep_prefix=True)
    beside = manager.ensure("tiny", vae="Automatic")
    assert beside.vae_name == "tiny.vae.safetensors"
    assert picture_bytes(beside)[0] == external_image
    assert [info.name for info in manager.registry.scan()] == ["tiny.safetensors", "tiny_b.safetensors"]


def test_bad_vae_choices_fail_clearly_and_keep_the_model(data_dir: Path) -> None:
    manager = make_manager(data_dir)
    image = picture_bytes(manager.ensure("tiny"))[0]
    with pytest.raises(VaeNotFoundError, match=r"vae: no VAE named 'missing.safetensors' \(choices: Automatic, None"):
        manager.ensure("tiny", vae="missing.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)},
              str(data_dir / "models" / "VAE" / "lora.safetensors"))
    with pytest.raises(CheckpointLoadError, match="lora.safetensors holds no VAE decoder weights"):
        manager.ensure("tiny", vae="lora.safetensors")
    # A VAE of another architecture (here: fewer channels) is refused before anything is replaced.
    narrow = data_dir / "models" / "VAE" / "narrow.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3), "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)},
              str(narrow))
    with pytest.raises(CheckpointLoadError, match="narrow.safetensors"):
        manager.ensure("tiny", vae="narrow.safetensors")
    assert manager.current is not None and manager.current.vae_file is None
    assert picture_bytes(manager.current)[0] == image


def test_hash_cache_survives_a_restart_and_is_keyed_by_size_and_mtime(data_dir: Path) -> None:
    checkpoint = data_dir / "models" / "Stable-diffusion" / "tiny.safetensors"
    cache_file = data_dir / "cache" / "model-hashes.json"
    registry = ModelRegistry([checkpoint.parent], FileHasher(cache_file))
    info = registry.resolve("tiny")
    assert registry.cached_sha256(info) is None
    registry.hasher.hash_in_background(info)
    deadline = time.monotonic() + 30
    while registry.cached_sha256(info) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    real_hash = sha256_of_file(checkpoint)
    assert registry.cached_sha256(info) == real_hash and cache_file.is_file()

    # Change one byte but keep size and mtime: a restarted app trusts its cache (that is what makes it fast).
    stat = checkpoint.stat()
    data = bytearray(checkpoint.read_bytes())
    data[-1] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    restarted = ModelRegistry([checkpoint.parent], FileHasher(cache_file))
    assert restarted.short_hash(restarted.resolve("tiny")) == real_hash[:10]
    assert restarted.resolve(real_hash[:10]).name == "tiny.safetensors"

    # A new mtime is a new file version: hashed again.
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    newer = ModelRegistry([checkpoint.parent], FileHasher(cache_file))
    assert newer.sha256(newer.resolve("tiny")) == sha256_of_file(checkpoint) != real_hash


def test_a_damaged_hash_cache_is_ignored(data_dir: Path) -> None:
    cache_file = data_dir / "cache" / "model-hashes.json"
    cache_file.parent.mkdir()
    cache_file.write_text("{not json")
    registry = ModelRegistry([data_dir / "models" / "Stable-diffusion"], FileHasher(cache_file))
    info = registry.resolve("tiny")
    assert registry.short_hash(info) == sha256_of_file(info.path)[:10]
    assert '"version": 1' in cache_file.read_text()


def test_two_models_on_the_device_keep_their_own_weights(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = ReadCounter(monkeypatch)
    hasher = FileHasher(data_dir / "cache" / "model-hashes.json")
    registry = ModelRegistry([data_dir / "models" / "Stable-diffusion"], hasher)
    manager = ModelManager(registry, choose_device_policy(force_cpu=True), VaeRegistry([], hasher),
                           models_on_device=lambda: 2)
    model_a = manager.ensure("tiny")
    image_a = picture_bytes(model_a)[0]
    model_b = manager.ensure("tiny_b")
    assert model_b.unet is not model_a.unet, "a model that stays loaded must not lend its modules"
    image_b = picture_bytes(model_b)[0]
    assert image_b != image_a
    assert picture_bytes(manager.ensure("tiny"))[0] == image_a
    assert picture_bytes(manager.ensure("tiny_b"))[0] == image_b
    assert reads.names == ["tiny.safetensors", "tiny_b.safetensors"]
    assert [info.name for info in manager.resident()] == ["tiny.safetensors", "tiny_b.safetensors"]
