"""Reading a single-file checkpoint: the same weights as safetensors' loader and diffusers' converters, owned
tensors that outlive the file, errors that name the bad tensor; and a background hash that waits at low priority."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from webui.engine.checkpoint_loading import CheckpointLoadError, build_components, read_checkpoint, sidecar_config_dir
from webui.engine.families import Family
from webui.engine.model_registry import FileHasher, ModelRegistry


def _reference_weights(checkpoint: Path, config_dir: Path, family: Family) -> dict[str, dict[str, torch.Tensor]]:
    """The UNet and VAE as diffusers' own converters make them from safetensors' own loader (the old path)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    skeleton = build_components(family, config_dir)
    raw = load_file(str(checkpoint))
    return {
        "unet": convert_ldm_unet_checkpoint(dict(raw), skeleton.unet.config),
        "vae": convert_ldm_vae_checkpoint(dict(raw), skeleton.vae.config),
    }


def test_weights_are_the_files_own_bit_for_bit_at_the_file_dtype_or_converted(tiny_model_dir: Path) -> None:
    info = ModelRegistry([tiny_model_dir]).resolve("tiny")
    as_stored = read_checkpoint(info)
    as_float32 = read_checkpoint(info, dtype_of=lambda component: torch.float32)
    reference = _reference_weights(info.path, as_stored.config_dir, as_stored.family)
    for component, weights in reference.items():
        assert set(as_stored.state_dicts[component]) == set(weights)
        for name, tensor in weights.items():
            stored, converted = as_stored.state_dicts[component][name], as_float32.state_dicts[component][name]
            assert stored.dtype == tensor.dtype and torch.equal(stored, tensor), name
            assert converted.dtype == torch.float32 and torch.equal(converted, tensor.to(torch.float32)), name
    assert set(as_float32.state_dicts) == set(as_stored.state_dicts)
    for component, weights in as_stored.state_dicts.items():
        for name, tensor in weights.items():
            expected = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
            assert torch.equal(as_float32.state_dicts[component][name], expected), f"{component}.{name}"
            assert as_float32.state_dicts[component][name].dtype == expected.dtype, f"{component}.{name}"


def test_weights_own_their_memory_and_outlive_the_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    original, copy = tiny_model_dir / "tiny.safetensors", models / "copy.safetensors"
    shutil.copy(original, copy)
    shutil.copytree(sidecar_config_dir(original), sidecar_config_dir(copy))
    info = ModelRegistry([models]).resolve("copy")
    weights = read_checkpoint(info)
    before = {name: tensor.clone() for name, tensor in weights.state_dicts["unet"].items()}
    copy.write_bytes(b"\0" * info.size)  # the same file pages, overwritten
    copy.unlink()
    for name, tensor in weights.state_dicts["unet"].items():
        assert torch.equal(tensor, before[name]), name
        tensor.add_(1)  # writable: a tensor of its own, not a view of a read-only map


def _rewrite_header(source: Path, target: Path, change: dict[str, object]) -> str:
    """`source` with one UNet tensor's header entry updated by `change`; returns that tensor's name."""
    data = source.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = next(key for key in sorted(header) if key.startswith("model.diffusion_model.output_blocks."))
    header[name].update(change)
    encoded = json.dumps(header).encode("utf-8")
    target.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])
    shutil.copytree(sidecar_config_dir(source), sidecar_config_dir(target))
    return name


@pytest.mark.parametrize(
    ("change", "message"),
    [({"dtype": "U16"}, "unsupported dtype U16"), ({"shape": [3, 5, 7, 11]}, "bytes for shape")],
)
def test_a_tensor_the_header_describes_wrongly_is_named_in_the_error(
    tiny_model_dir: Path, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    name = _rewrite_header(tiny_model_dir / "tiny.safetensors", tmp_path / "bad.safetensors", change)
    info = ModelRegistry([tmp_path]).resolve("bad")
    with pytest.raises(CheckpointLoadError, match=message) as raised:
        read_checkpoint(info)
    assert name in str(raised.value) and "bad" in str(raised.value)


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are a POSIX feature")
def test_background_hashing_runs_at_the_lowest_priority(tiny_model_dir: Path) -> None:
    priorities: list[int] = []

    def recording_digest(path: Path) -> str:
        priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return "0" * 64

    hasher = FileHasher(digest=recording_digest)
    info = ModelRegistry([tiny_model_dir], hasher).resolve("tiny")
    hasher.hash_in_background(info)
    deadline = time.monotonic() + 30
    while hasher.cached(info) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hasher.cached(info) == "0" * 64
    # A load starting with its file's hash gets every core; the hash takes what is left (nice 19).
    assert priorities == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19, "only the hasher's thread is lowered"
