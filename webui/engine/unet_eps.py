"""The loaded UNet as the samplers' eps model for every family: SDXL's added conditions, v-prediction turned into eps.
Must not import gradio, fastapi or webui.app."""

from __future__ import annotations

import torch

from webui.engine.k_sampling import DiscreteSchedule
from webui.engine.model_manager import LoadedModel

V_PREDICTION = "v_prediction"


class UNetEps:
    """Calls the UNet with what its family needs and returns eps in float32.

    Samplers hand the UNet x_in = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·eps (k-samplers: x scaled by c_in, so
    ᾱ = 1/(σ² + 1)). A v-prediction UNet returns v = sqrt(ᾱ)·eps − sqrt(1 − ᾱ)·x0, hence
    eps = sqrt(ᾱ)·v + sqrt(1 − ᾱ)·x_in. ᾱ at the timestep comes the way A1111 gets it: for k-samplers
    from σ(t) of the same log-sigma table that turned σ into t (CompVisVDenoiser works from σ); for
    DDIM/UniPC from alphas_cumprod at the timestep truncated to an integer (CompVisTimestepsVDenoiser).
    """

    def __init__(self, model: LoadedModel, timestep_sampler: bool, image_size: tuple[int, int]) -> None:
        self.unet = model.unet
        self.family = model.family
        self.dtype = model.policy.unet_dtype
        self.v_prediction = model.prediction_type == V_PREDICTION
        self.timestep_sampler = timestep_sampler
        self.alphas_cumprod = model.alphas_cumprod.detach().to("cpu", torch.float32)
        self.schedule = DiscreteSchedule(self.alphas_cumprod)
        height, width = image_size
        time_ids = model.family.time_ids(height, width)
        self.time_ids = torch.tensor([time_ids], dtype=torch.float32) if time_ids is not None else None

    def __call__(
        self, x_in: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None
    ) -> torch.Tensor:
        """(x_in (B,4,h,w), timesteps (B,), context (B,T,C), SDXL pooled text (B,P) or None) → eps (B,4,h,w)."""
        kwargs: dict[str, object] = {"encoder_hidden_states": context}
        added_conditions = self.family.unet_added_conditions(pooled, self.time_ids)
        if added_conditions is not None:
            kwargs["added_cond_kwargs"] = added_conditions
        output = self.unet(x_in.to(self.dtype), timesteps, **kwargs).sample.float()
        if not self.v_prediction:
            return output
        alphas = self.alphas_cumprod_at(timesteps).to(x_in.device)[:, None, None, None]
        return alphas.sqrt() * output + (1.0 - alphas).sqrt() * x_in.float()

    def alphas_cumprod_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """ᾱ at each (possibly fractional) timestep, float32 on the CPU."""
        t = timesteps.detach().to("cpu", torch.float32)
        if self.timestep_sampler:
            return self.alphas_cumprod[t.to(torch.int64)]
        sigmas = self.schedule.t_to_sigma(t)
        return 1.0 / (sigmas**2 + 1.0)
