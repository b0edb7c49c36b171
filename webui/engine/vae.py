"""Latents to pictures: VAE decode with the fp16 NaN fallback, and A1111's float-to-8-bit rule.
Must not import gradio, fastapi or webui.app."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from webui.engine.families import SD1, SDXL, Family

logger = logging.getLogger(__name__)

# A1111's "Approx cheap" preview: a fixed linear map from the 4 SD 1.x latent channels to RGB
# (one row per latent channel, one column per colour), good enough to see composition mid-sampling.
SD1_LATENT_RGB_COEFFICIENTS = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
# A1111's set for SDXL's latent space (sd_vae_approx.cheap_approximation); SD 2.x shares SD 1.x's VAE and set.
SDXL_LATENT_RGB_COEFFICIENTS = (
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)
# A latent pixel covers 8x8 image pixels; the preview is scaled up to show at image size.
PREVIEW_UPSCALE = 8


def decode_latent(vae: torch.nn.Module, latent: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """One latent (1, 4, h, w) → image tensor (3, H, W) in [0, 1].

    A half-precision VAE can overflow to NaN on some images (A1111's NansException); then the VAE
    is switched to float32 for good and the decode repeated, as A1111's auto_vae_precision does.
    """
    vae_dtype = next(vae.parameters()).dtype
    decoded = vae.decode(latent.to(vae_dtype) / scaling_factor).sample
    if torch.isnan(decoded).any() and vae_dtype != torch.float32:
        logger.warning("VAE produced NaN in %s; switching the VAE to float32 and decoding again", vae_dtype)
        vae.to(torch.float32)
        decoded = vae.decode(latent.to(torch.float32) / scaling_factor).sample
    return torch.clamp((decoded[0].float() + 1.0) / 2.0, min=0.0, max=1.0)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] → RGB picture; 255·x truncated to uint8 exactly as A1111 does (not rounded)."""
    array = 255.0 * np.moveaxis(image.cpu().numpy(), 0, 2)
    return Image.fromarray(array.astype(np.uint8))


def latent_rgb_coefficients(family: Family) -> tuple[tuple[float, float, float], ...]:
    """The cheap preview's latent-channel → RGB map for the model's family."""
    return SDXL_LATENT_RGB_COEFFICIENTS if family == SDXL else SD1_LATENT_RGB_COEFFICIENTS


def cheap_preview(latents: torch.Tensor, family: Family = SD1) -> Image.Image:
    """The first latent of a batch (N, 4, h, w) as an RGB picture of size (8w, 8h), without the VAE.

    A1111's "Approx cheap" live preview: costs a matrix product, so it can run every few steps.
    """
    coefficients = torch.tensor(latent_rgb_coefficients(family), dtype=torch.float32)
    first = latents[0].detach().to(device="cpu", dtype=torch.float32)
    rgb = torch.einsum("chw,cr->rhw", first, coefficients)
    picture = to_pil(torch.clamp((rgb + 1.0) / 2.0, min=0.0, max=1.0))
    # Nearest keeps each latent pixel a crisp block, as a preview of the layout rather than a fake upscale.
    size = (picture.width * PREVIEW_UPSCALE, picture.height * PREVIEW_UPSCALE)
    return picture.resize(size, Image.Resampling.NEAREST)
