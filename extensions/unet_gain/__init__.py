"""UNet output gain: an example of a weight patch from an extension (merged for the job and undone exactly afterwards,
as LoRAs are). Imports only webui.extension_api (tensors are used through their own methods).

The patch adds gain·W to the UNet's final convolution (`unet.conv_out`), i.e. W' = (1 + gain)·W: a stronger or
weaker noise prediction. Gain 0 adds no patch, so the model stays untouched.
"""

from __future__ import annotations

from typing import Any

from webui.extension_api import ExtensionAPI, HookPoint, Slider, WeightPatchesContext, WeightPatchSpec

INFOTEXT_KEY = "UNet gain"
TARGET = "unet.conv_out"


def setup(api: ExtensionAPI) -> None:
    api.add_txt2img_section("UNet output gain", [
        Slider("gain", "Gain on the UNet's last convolution (0: off)", -0.5, 0.5, step=0.01, default=0.0,
               infotext=INFOTEXT_KEY),
    ])

    def add_patch(context: WeightPatchesContext) -> None:
        gain = float(api.values(context.params)["gain"])
        if gain != 0:
            context.patches.append(WeightPatchSpec(key=gain, label=f"unet_gain {gain:g}", deltas=conv_out_delta(gain)))

    api.on(HookPoint.WEIGHT_PATCHES, add_patch)


def conv_out_delta(gain: float) -> Any:
    def deltas(modules: Any) -> dict[str, tuple[Any, Any]]:
        conv_out = modules[TARGET]
        bias = conv_out.bias * gain if conv_out.bias is not None else None
        return {TARGET: (conv_out.weight * gain, bias)}

    return deltas
