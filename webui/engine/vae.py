"""Latents to pictures: VAE decode with the fp16 NaN fallback, and A1111's float-to-8-bit rule.
Must not import gradio, fastapi or webui.app."""

from __future__ import annotations

import logging
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from webui.engine.families import SD1, Family

logger = logging.getLogger(__name__)

# A latent pixel covers 8x8 image pixels; the preview is scaled up to show at image size.
PREVIEW_UPSCALE = 8


def decode_latent(vae: torch.nn.Module, latent: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """One latent (1, 4, h, w) → image tensor (3, H, W) in [0, 1].

    A half-precision VAE can overflow to NaN on some images (A1111's NansException); then the VAE
    is switched to float32 for good and the decode repeated, as A1111's auto_vae_precision does.
    """
    vae_dtype = next(vae.parameters()).dtype
    autoencoder = cast(Any, vae)  # diffusers' AutoencoderKL (its decode is not typed on nn.Module)
    decoded = autoencoder.decode(latent.to(vae_dtype) / scaling_factor).sample
    if torch.isnan(decoded).any() and vae_dtype != torch.float32:
        logger.warning("VAE produced NaN in %s; switching the VAE to float32 and decoding again", vae_dtype)
        vae.to(torch.float32)
        decoded = autoencoder.decode(latent.to(torch.float32) / scaling_factor).sample
    return torch.clamp((decoded[0].float() + 1.0) / 2.0, min=0.0, max=1.0)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] → RGB picture; 255·x truncated to uint8 exactly as A1111 does (not rounded)."""
    array = 255.0 * np.moveaxis(image.cpu().numpy(), 0, 2)
    return Image.fromarray(array.astype(np.uint8))


def cheap_preview(latents: torch.Tensor, family: Family = SD1) -> Image.Image:
    """The first latent of a batch (N, 4, h, w) as an RGB picture of size (8w, 8h), without the VAE.

    A1111's "Approx cheap" live preview: costs a matrix product, so it can run every few steps.
    """
    coefficients = torch.tensor(family.latent_rgb_coefficients, dtype=torch.float32)
    first = latents[0].detach().to(device="cpu", dtype=torch.float32)
    rgb = torch.einsum("chw,cr->rhw", first, coefficients)
    picture = to_pil(torch.clamp((rgb + 1.0) / 2.0, min=0.0, max=1.0))
    # Nearest keeps each latent pixel a crisp block, as a preview of the layout rather than a fake upscale.
    size = (picture.width * PREVIEW_UPSCALE, picture.height * PREVIEW_UPSCALE)
    return picture.resize(size, Image.Resampling.NEAREST)
