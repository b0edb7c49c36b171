"""CFG Rescale: after the cond/uncond predictions are combined, match the guided prediction's spread to the conditional
one's. Imports only webui.extension_api (tensors are used through their own methods).

Lin, Liu, Li, Yang (2023), "Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4, eq. 15-16:
    x_rescaled = x_cfg · std(x_pos) / std(x_cfg);   x_final = φ·x_rescaled + (1 − φ)·x_cfg
The paper works on v/x0 predictions; like diffusers' `rescale_noise_cfg`, this applies it to the guided noise
prediction, per image over all latent channels and pixels. φ = 0 leaves the image unchanged.
"""

from __future__ import annotations

from typing import Any

from webui.extension_api import CfgContext, ExtensionAPI, HookPoint, Slider

INFOTEXT_KEY = "CFG Rescale"
# Keeps an all-flat prediction (std 0) from dividing by zero.
MIN_STD = 1e-8


def setup(api: ExtensionAPI) -> None:
    api.add_txt2img_section("CFG Rescale", [
        Slider("multiplier", "CFG Rescale multiplier φ (0: off)", 0.0, 1.0, step=0.05, default=0.0,
               infotext=INFOTEXT_KEY),
    ])

    def rescale(context: CfgContext) -> None:
        multiplier = float(api.values(context.params)["multiplier"])
        if multiplier > 0:
            context.guided = rescaled_guidance(context.guided, context.cond_pred, multiplier)

    api.on(HookPoint.CFG, rescale)


def rescaled_guidance(guided: Any, cond_pred: Any, multiplier: float) -> Any:
    """Eq. 15-16 of Lin et al. (2023) on tensors shaped [batch, channels, height, width]."""
    dims = tuple(range(1, guided.ndim))
    std_cond = cond_pred.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True).clamp_min(MIN_STD)
    rescaled = guided * (std_cond / std_guided)
    return multiplier * rescaled + (1.0 - multiplier) * guided
