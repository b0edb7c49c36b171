"""Device and dtype policy: CUDA in fp16 with SDPA when present, CPU in fp32 otherwise.
The only module that calls torch.cuda.*; must not import diffusers, gradio or webui.app."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class DevicePolicy:
    """Where the model runs and in which dtypes; chosen once at start-up."""

    device: torch.device
    unet_dtype: torch.dtype
    text_encoder_dtype: torch.dtype
    vae_dtype: torch.dtype

    @property
    def name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return self.device.type


def choose_device_policy(force_cpu: bool = False) -> DevicePolicy:
    """CUDA fp16 when a GPU is present (VAE decode falls back to fp32 on NaN), else CPU fp32.

    fp32 on CPU because this class of CPU has no fast half precision (bf16 measured >50x slower).
    """
    if not force_cpu and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        return DevicePolicy(device, torch.float16, torch.float16, torch.float16)
    cpu = torch.device("cpu")
    return DevicePolicy(cpu, torch.float32, torch.float32, torch.float32)


def empty_cache(device: torch.device) -> None:
    """Give cached GPU memory back after a model is dropped (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
