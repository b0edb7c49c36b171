"""VAE decode: A1111's 8-bit conversion and the automatic float32 retry when half precision overflows to NaN.
Uses the tiny checkpoint's real VAE."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.cpu_models import load_on_cpu
from webui.engine.model_manager import LoadedModel
from webui.engine.vae import decode_latent, to_pil


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    return load_on_cpu(tiny_model_dir, "tiny")


def test_to_pil_truncates_like_a1111() -> None:
    image = torch.tensor([0.999, 0.5, 1.0]).reshape(3, 1, 1)
    assert np.asarray(to_pil(image))[0, 0].tolist() == [254, 127, 255]


def test_half_precision_overflow_is_retried_in_float32(model: LoadedModel) -> None:
    vae = copy.deepcopy(model.vae).to(torch.float32)
    with torch.no_grad():
        # Huge first-layer weights: float32 handles the activations, float16 overflows to inf/NaN,
        # which is what happens to some real fp16 VAEs at high resolution.
        vae.decoder.conv_in.weight.mul_(1e5)
    vae.half().float()  # round the weights to half precision once, so both decodes use the same weights
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = decode_latent(vae, latent, model.vae_scaling_factor)
        half_vae = vae.to(torch.float16)
        assert torch.isnan(half_vae.decode(latent.half() / model.vae_scaling_factor).sample).any()
        recovered = decode_latent(half_vae, latent, model.vae_scaling_factor)
    assert next(half_vae.parameters()).dtype == torch.float32
    assert not torch.isnan(recovered).any()
    torch.testing.assert_close(recovered, expected)
