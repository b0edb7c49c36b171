"""CUDA path: fp16 UNet and text encoder with SDPA, deterministic images, NaN-free decode.
Marked gpu: skipped without CUDA, run on the lent GPU machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from webui.core.params import GenerationParams
from webui.engine.devices import choose_device_policy
from webui.engine.generate import generate
from webui.engine.model_manager import ModelManager
from webui.engine.model_registry import ModelRegistry

pytestmark = pytest.mark.gpu


def test_cuda_generation_is_half_precision_and_reproducible(tiny_model_dir: Path) -> None:
    policy = choose_device_policy()
    assert policy.device.type == "cuda" and policy.unet_dtype == torch.float16
    model = ModelManager(ModelRegistry([tiny_model_dir]), policy).ensure("tiny")
    assert next(model.unet.parameters()).dtype == torch.float16
    params = GenerationParams(prompt="a cat", width=64, height=64, steps=6, sampler="Euler a", batch_size=2)

    def images() -> list[np.ndarray]:
        return [np.asarray(i.image) for batch in generate(model, params, 9, "test") for i in batch]

    first, second = images(), images()
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(image.std() > 0 for image in first)
    assert not np.array_equal(first[0], first[1])


def test_cpu_rng_source_gives_the_same_noise_on_cuda_as_on_cpu(tiny_model_dir: Path) -> None:
    cuda_model = ModelManager(ModelRegistry([tiny_model_dir]), choose_device_policy()).ensure("tiny")
    cpu_model = ModelManager(ModelRegistry([tiny_model_dir]), choose_device_policy(force_cpu=True)).ensure("tiny")
    params = GenerationParams(prompt="a cat", width=64, height=64, steps=6, sampler="Euler", rng_source="CPU")
    on_cuda = next(iter(generate(cuda_model, params, 3, "test")))[0]
    on_cpu = next(iter(generate(cpu_model, params, 3, "test")))[0]
    # Same noise; only fp16 vs fp32 arithmetic differs, so the pictures are close, not equal.
    difference = np.abs(np.asarray(on_cuda.image, dtype=np.int16) - np.asarray(on_cpu.image, dtype=np.int16))
    assert difference.mean() < 4
