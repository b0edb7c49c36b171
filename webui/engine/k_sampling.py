"""Sampling math: sigma schedules and k-diffusion's samplers as A1111 runs them, plus A1111's DDIM and UniPC.
Must not import gradio, fastapi or webui.app; numerics use torch, numpy and torchsde only."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torchsde
from numpy.polynomial import Polynomial

from webui.core.samplers import SamplerSpec
from webui.engine.rng import RNG_SOURCES, ImageRNG, PhiloxGenerator

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x_in already scaled by c_in, float timesteps t of shape [B]) -> eps, with classifier-free guidance applied."""

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x, sigma of shape [B]) -> denoised x0."""

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(sigma, sigma_next) -> unit-variance noise shaped like the latent batch."""


@dataclass(frozen=True)
class StepInfo:
    """One sampler step as reported to the caller (progress, live preview, interrupt point).

    `x` is the sampler state at the report point (k-diffusion samplers report before the step's
    update, DDIM/UniPC after it, as in A1111); `denoised` is the step's x0 prediction; `sigma` is
    the step's noise level in k-diffusion units (for DDIM/UniPC: the level the step reached).
    """

    step: int
    total_steps: int
    x: torch.Tensor
    denoised: torch.Tensor
    sigma: float


StepCallback = Callable[[StepInfo], None]

KSampler = Callable[[Denoiser, torch.Tensor, torch.Tensor, NoiseSampler, StepCallback | None], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Noise levels of a discrete-time model
# ---------------------------------------------------------------------------------------------------------------


class DiscreteSchedule:
    """Sigma table of a discrete-time eps model, sigma_t = sqrt((1 - ᾱ_t) / ᾱ_t), with log-sigma interpolation.

    A1111 keeps ᾱ as a float32 buffer (CompVis computes it in float64 and stores float32), so the table
    is built in float32 whatever dtype the caller passes; sigmas live on the device of `alphas_cumprod`.
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        alphas_cumprod = alphas_cumprod.detach().to(torch.float32)
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
            raise ValueError(f"sampling: alphas_cumprod must be a 1-D table, got shape {tuple(alphas_cumprod.shape)}")
        self.alphas_cumprod: torch.Tensor = alphas_cumprod
        self.sigmas: torch.Tensor = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas: torch.Tensor = self.sigmas.log()
        self.sigma_min: float = float(self.sigmas[0])
        self.sigma_max: float = float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep whose interpolated log-sigma equals log(sigma); clamped to [0, len - 1]."""
        log_sigma = sigma.log()
        flat = log_sigma.reshape(-1).contiguous()
        # Last table entry at or below log(sigma); above the table the top segment is reused (and w clamps).
        low_idx = (torch.searchsorted(self.log_sigmas, flat, right=True) - 1).clamp(0, len(self.log_sigmas) - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - flat) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at fractional timestep t, interpolating log-sigma between the neighbouring table entries."""
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[(...,) + (None,) * (ndim - v.ndim)]


def eps_denoiser(eps_model: EpsModel, schedule: DiscreteSchedule) -> Denoiser:
    """x0 from an eps model at noise level sigma (k-diffusion's CompVisDenoiser / Karras et al. 2022, Table 1)."""

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma_x = _append_dims(sigma, x.ndim)
        # The model was trained on x_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) eps = (x0 + sigma eps) / sqrt(sigma² + 1).
        c_in = 1 / (sigma_x**2 + 1) ** 0.5
        eps = eps_model(x * c_in, schedule.sigma_to_t(sigma))
        return x - sigma_x * eps

    return denoiser


# ---------------------------------------------------------------------------------------------------------------
# Sigma schedules: (n, schedule) -> n sigmas followed by 0, on the CPU (A1111 1.10 builds them there)
# ---------------------------------------------------------------------------------------------------------------


def uniform_sigmas(n: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """The model's own discretisation: t = linspace(t_max, 0, n), sigma = t_to_sigma(t) (k-diffusion get_sigmas)."""
    t = torch.linspace(len(schedule.sigmas) - 1, 0, n, device=schedule.sigmas.device)
    return _append_zero(schedule.t_to_sigma(t)).cpu()


def karras_sigmas(n: int, schedule: DiscreteSchedule, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. (5): sigmas evenly spaced in sigma^(1/rho) between sigma_max and sigma_min."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = schedule.sigma_min ** (1 / rho)
    max_inv_rho = schedule.sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """Sigmas evenly spaced in log(sigma) from sigma_max down to sigma_min."""
    return _append_zero(torch.linspace(math.log(schedule.sigma_max), math.log(schedule.sigma_min), n).exp())


def polyexponential_sigmas(n: int, schedule: DiscreteSchedule, rho: float = 1.0) -> torch.Tensor:
    """log(sigma) a polynomial of degree rho in the step ramp (rho 1 is the exponential schedule)."""
    ramp = torch.linspace(1, 0, n) ** rho
    log_min, log_max = math.log(schedule.sigma_min), math.log(schedule.sigma_max)
    return _append_zero(torch.exp(ramp * (log_max - log_min) + log_min))


def sgm_uniform_sigmas(n: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """n timesteps uniform in t from t(sigma_max), excluding t(sigma_min), as the SGM/SDXL Turbo references do."""
    device = schedule.sigmas.device
    start = schedule.sigma_to_t(torch.tensor(schedule.sigma_max, device=device))
    end = schedule.sigma_to_t(torch.tensor(schedule.sigma_min, device=device))
    t = torch.linspace(float(start), float(end), n + 1)[:-1]
    return _append_zero(schedule.t_to_sigma(t.to(device))).cpu()


SIGMA_SCHEDULES: dict[str, Callable[[int, DiscreteSchedule], torch.Tensor]] = {
    "Automatic": uniform_sigmas,
    "Uniform": uniform_sigmas,
    "Karras": karras_sigmas,
    "Exponential": exponential_sigmas,
    "Polyexponential": polyexponential_sigmas,
    "SGM Uniform": sgm_uniform_sigmas,
}


def make_sigmas(
    schedule_label: str, steps: int, schedule: DiscreteSchedule, discard_penultimate_sigma: bool
) -> torch.Tensor:
    """steps + 1 float32 CPU sigmas ending in 0; with discard, A1111 builds steps + 2 and drops the penultimate."""
    if steps < 1:
        raise ValueError(f"sampling: steps must be at least 1, got {steps}")
    try:
        schedule_fn = SIGMA_SCHEDULES[schedule_label]
    except KeyError:
        raise ValueError(
            f"sampling: unknown schedule type {schedule_label!r}; choose one of: {', '.join(SIGMA_SCHEDULES)}"
        ) from None
    n = steps + 1 if discard_penultimate_sigma else steps
    sigmas = schedule_fn(n, schedule).to(torch.float32)
    if discard_penultimate_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


# ---------------------------------------------------------------------------------------------------------------
# k-diffusion samplers (eta = 1, s_noise = 1, s_churn = 0: A1111's defaults)
# ---------------------------------------------------------------------------------------------------------------


def _report(
    callback: StepCallback | None, step: int, total: int, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor
) -> None:
    if callback is not None:
        callback(StepInfo(step=step, total_steps=total, x=x, denoised=denoised, sigma=float(sigma)))


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


def _ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step into a deterministic move to sigma_down and fresh noise of std sigma_up (DDPM posterior, eta 1)."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _t_of(sigma: torch.Tensor) -> torch.Tensor:
    """DPM-Solver's time variable for x0-prediction: t = -log(sigma) (half log-SNR, lambda)."""
    return sigma.log().neg()


def _sigma_of(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: NoiseSampler,
    callback: StepCallback | None,
) -> torch.Tensor:
    """Euler steps on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space…", Alg. 2)."""
    s_in = x.new_ones([x.shape[0]])
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        d = _to_d(x, sigma, denoised)
        _report(callback, i, total, x, denoised, sigma)
        x = x + d * (sigma_next - sigma)
    return x


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: NoiseSampler,
    callback: StepCallback | None,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, DDPM) with Euler steps in sigma (Karras et al. 2022)."""
    s_in = x.new_ones([x.shape[0]])
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        _report(callback, i, total, x, denoised, sigma)
        d = _to_d(x, sigma, denoised)
        x = x + d * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: NoiseSampler,
    callback: StepCallback | None,
) -> torch.Tensor:
    """Heun's second-order steps on the probability-flow ODE (Karras et al. 2022, Alg. 2)."""
    s_in = x.new_ones([x.shape[0]])
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        d = _to_d(x, sigma, denoised)
        _report(callback, i, total, x, denoised, sigma)
        dt = sigma_next - sigma
        if sigma_next == 0:
            # The correction would divide by sigma = 0; the last step is plain Euler.
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = denoiser(x_2, sigma_next * s_in)
            d_2 = _to_d(x_2, sigma_next, denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


def sample_dpm_2(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: NoiseSampler,
    callback: StepCallback | None,
) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022, "DPM-Solver") midpoint steps in sigma, as in Karras et al. 2022's Alg. 2."""
    s_in = x.new_ones([x.shape[0]])
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        d = _to_d(x, sigma, denoised)
        _report(callback, i, total, x, denoised, sigma)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            # Midpoint in log-sigma, i.e. the geometric mean of the two noise levels.
            sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma)
            denoised_2 = denoiser(x_2, sigma_mid * s_in)
            d_2 = _to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigma_next - sigma)
    return x


def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: NoiseSampler,
    callback: StepCallback | None,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020) with DPM-Solver-2 steps (Lu et al. 2022) down to sigma_down."""
    s_in = x.new_ones([x.shape[0]])
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        _report(callback, i, total, x, denoised, sigma)
        d = _to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma)
            denoised_2 = denoiser(x_2, sigma_mid * s_in)
            d_2 = _to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigma_down - sigma)
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


def _lms_coefficient(order: int, sigmas: np.ndarray, i: int, j: int) -> float:
    """∫ over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node i - j on sigma_i … sigma_{i-order+1}.

    Integrated exactly (the basis is a polynomial of degree order - 1); k-diffusion uses adaptive quadrature,
    which is exact to rounding for these low degrees.
    """
    basis = Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis = basis * Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


def sample_lms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: NoiseSampler,
    callback: StepCallback | None,
    *,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth) on the probability-flow ODE in sigma (k-diffusion's LMS, order 4)."""
    s_in = x.new_ones([x.shape[0]])
    sigmas_np = sigmas.detach().cpu().to(torch.float64).numpy()
    total = len(sigmas) - 1
    derivatives: list[torch.Tensor] = []
    for i in range(total):
        sigma = sigmas[i]
        denoised = denoiser(x, sigma * s_in)
        derivatives.append(_to_d(x, sigma, denoised))
        if len(derivatives) > order:
            derivatives.pop(0)
        _report(callback, i, total, x, denoised, sigma)
        current_order = min(i + 1, order)
        coefficients = [_lms_coefficient(current_order, sigmas_np, i, j) for j in range(current_order)]
        update = torch.zeros_like(x)
        for coefficient, derivative in zip(coefficients, reversed(derivatives), strict=False):
            update = update + coefficient * derivative
        x = x + update
    return x


def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: NoiseSampler,
    callback: StepCallback | None,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, "DPM-Solver++", Alg. 1)."""
    s_in = x.new_ones([x.shape[0]])
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        _report(callback, i, total, x, denoised, sigma)
        if sigma_down == 0:
            d = _to_d(x, sigma, denoised)
            x = x + d * (sigma_down - sigma)
        else:
            t, t_next = _t_of(sigma), _t_of(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (_sigma_of(s) / _sigma_of(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = denoiser(x_2, _sigma_of(s) * s_in)
            x = (_sigma_of(t_next) / _sigma_of(t)) * x - (-h).expm1() * denoised_2
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: NoiseSampler,
    callback: StepCallback | None,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 1 / 2,
) -> torch.Tensor:
    """Stochastic DPM-Solver++ (Lu et al. 2022) with an ancestral intermediate stage at t + r·h (k-diffusion)."""
    s_in = x.new_ones([x.shape[0]])
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        _report(callback, i, total, x, denoised, sigma)
        if sigma_next == 0:
            d = _to_d(x, sigma, denoised)
            x = x + d * (sigma_next - sigma)
            continue
        t, t_next = _t_of(sigma), _t_of(sigma_next)
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        # The noise sampler is queried at sigma_of(t(sigma)), not sigma itself, so the Brownian tree sees
        # exactly the same query points as in A1111.
        sd, su = _ancestral_step(_sigma_of(t), _sigma_of(s), eta)
        s_ = _t_of(sd)
        x_2 = (_sigma_of(s_) / _sigma_of(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise_sampler(_sigma_of(t), _sigma_of(s)) * s_noise * su
        denoised_2 = denoiser(x_2, _sigma_of(s) * s_in)
        sd, su = _ancestral_step(_sigma_of(t), _sigma_of(t_next), eta)
        t_next_ = _t_of(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma_of(t_next_) / _sigma_of(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise_sampler(_sigma_of(t), _sigma_of(t_next)) * s_noise * su
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: NoiseSampler,
    callback: StepCallback | None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2)."""
    s_in = x.new_ones([x.shape[0]])
    total = len(sigmas) - 1
    old_denoised: torch.Tensor | None = None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        _report(callback, i, total, x, denoised, sigma)
        t, t_next = _t_of(sigma), _t_of(sigma_next)
        h = t_next - t
        if old_denoised is None or sigma_next == 0:
            # First step has no history; the last (sigma 0) is first order, as in the paper.
            x = (_sigma_of(t_next) / _sigma_of(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - _t_of(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_of(t_next) / _sigma_of(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: NoiseSampler,
    callback: StepCallback | None,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", §4 SDE solvers), midpoint or Heun correction."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"sampling: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    s_in = x.new_ones([x.shape[0]])
    total = len(sigmas) - 1
    old_denoised: torch.Tensor | None = None
    h_last: torch.Tensor | None = None
    h: torch.Tensor | None = None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        _report(callback, i, total, x, denoised, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            t, s = -sigma.log(), -sigma_next.log()
            h = s - t
            eta_h = eta * h
            x = sigma_next / sigma * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = noise_sampler(sigma, sigma_next)
                x = x + noise * sigma_next * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


def sample_dpmpp_2m_sde_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: NoiseSampler,
    callback: StepCallback | None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE with the Heun-type correction (Lu et al. 2022); A1111's "DPM++ 2M SDE Heun"."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, noise_sampler, callback, solver_type="heun")


def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_sampler: NoiseSampler,
    callback: StepCallback | None,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep (Lu et al. 2022) SDE variant from k-diffusion."""
    s_in = x.new_ones([x.shape[0]])
    total = len(sigmas) - 1
    denoised_1: torch.Tensor | None = None
    denoised_2: torch.Tensor | None = None
    h: torch.Tensor | None = None
    h_1: torch.Tensor | None = None
    h_2: torch.Tensor | None = None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        _report(callback, i, total, x, denoised, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            t, s = -sigma.log(), -sigma_next.log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None and h_1 is not None and denoised_1 is not None and denoised_2 is not None:
                r0 = h_1 / h
                r1 = h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None and denoised_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                noise = noise_sampler(sigma, sigma_next)
                x = x + noise * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


K_SAMPLERS: dict[str, KSampler] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
}


# ---------------------------------------------------------------------------------------------------------------
# Brownian-tree noise for the SDE samplers
# ---------------------------------------------------------------------------------------------------------------

TorchsdeRandn = Callable[[tuple[int, ...], torch.dtype, torch.device, int], torch.Tensor]


def _brownian_interval_class(randn: TorchsdeRandn) -> type:
    """torchsde's BrownianInterval from a private copy of its module whose seeded normal draws come from `randn`.

    torchsde draws every Brownian-bridge sample through the module function brownian_interval._randn, and
    A1111 replaces that function process-wide with its own seeded randn (so the "NV" source uses Philox
    there too). A private copy gives the same draws without changing torchsde for anyone else.
    """
    from torchsde._brownian import brownian_interval

    spec = importlib.util.spec_from_file_location(
        f"{brownian_interval.__package__}._webui_private_brownian_interval", brownian_interval.__file__
    )
    if spec is None or spec.loader is None:
        raise RuntimeError("sampling: cannot load torchsde's brownian_interval module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cast(Any, module)._randn = randn  # the private copy's noise source (the module has no typed attribute)
    return module.BrownianInterval


def _philox_torchsde_randn(size: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """A1111's randn_local for the "NV" source: the first Philox draw of a fresh generator seeded `seed`."""
    return torch.from_numpy(PhiloxGenerator(int(seed)).randn(tuple(size))).to(device=device, dtype=dtype)


class BrownianTreeNoiseSampler:
    """Unit noise from one Brownian tree per image, seeded with that image's seed (k-diffusion's
    BatchedBrownianTree with a seed list, as A1111 builds it for DPM++ SDE / 2M SDE / 3M SDE).

    The tree is indexed by sigma itself (k-diffusion's default identity transform, which A1111 uses), spans
    [sigma_min, sigma_max] of the schedule and returns (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|).
    Trees for the "GPU"/"CPU" sources live on `device` (the generator device: pass CPU for "CPU"), where
    torchsde's own seeded torch.randn equals A1111's; "NV" trees draw Philox normals (A1111's patched
    torchsde randn) and live on x's device. Results come back on x's device and dtype.
    """

    def __init__(
        self,
        x: torch.Tensor,
        sigma_min: float | torch.Tensor,
        sigma_max: float | torch.Tensor,
        seeds: Sequence[int],
        device: torch.device,
        *,
        source: str = "GPU",
    ) -> None:
        if source not in RNG_SOURCES:
            raise ValueError(f"sampling: unknown rng source {source!r}; choose one of: {', '.join(RNG_SOURCES)}")
        seeds = [int(seed) for seed in seeds]
        if len(seeds) != x.shape[0]:
            raise ValueError(f"sampling: {len(seeds)} seeds for a batch of {x.shape[0]} latents")
        t0, t1, self._sign = self._sorted(float(sigma_min), float(sigma_max))
        self._out_device = x.device
        self._out_dtype = x.dtype
        # The trees always run in float32: A1111 draws float32 normals and only then casts.
        if source == "NV":
            interval_class = _brownian_interval_class(_philox_torchsde_randn)
            # The interval settings torchsde.BrownianTree uses (its defaults), so only the draws differ.
            self._trees = [
                interval_class(
                    t0=t0, t1=t1, size=tuple(x.shape[1:]), dtype=torch.float32, device=x.device,
                    entropy=seed, tol=1e-6, pool_size=24, halfway_tree=True,
                )
                for seed in seeds
            ]
        else:
            w0 = torch.zeros(x.shape[1:], dtype=torch.float32, device=torch.device(device))
            self._trees = [torchsde.BrownianTree(t0, w0, t1, entropy=seed) for seed in seeds]

    @staticmethod
    def _sorted(a: float, b: float) -> tuple[float, float, int]:
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        sigma_next = torch.as_tensor(sigma_next)
        t0, t1, sign = self._sorted(float(sigma), float(sigma_next))
        w = torch.stack([tree(t0, t1) for tree in self._trees]) * (self._sign * sign)
        w = w.to(device=self._out_device, dtype=self._out_dtype)
        return w / (sigma_next - sigma).abs().sqrt().to(self._out_device)


# ---------------------------------------------------------------------------------------------------------------
# A1111's timestep samplers: DDIM and UniPC
# ---------------------------------------------------------------------------------------------------------------


def a1111_timesteps(steps: int, discard_penultimate_sigma: bool = False) -> torch.Tensor:
    """A1111's DDIM/UniPC timestep list: range(0, 1000, 1000 // steps) + 1, clipped to [0, 999].

    The list has ceil(1000 / (1000 // steps)) entries, which is more than `steps` when steps does not
    divide 1000 (A1111 quirk, kept: 30 steps gives 31 entries).
    """
    steps = steps + 1 if discard_penultimate_sigma else steps
    if not 1 <= steps <= 1000:
        raise ValueError(f"sampling: DDIM/UniPC need 1 to 1000 steps, got {steps}")
    return torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)


def sample_ddim(
    eps_model: EpsModel,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    callback: StepCallback | None,
    *,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) down A1111's timestep list.

    Runs len(timesteps) - 1 steps from the last timestep; the final step lands on ᾱ at the first entry
    (timestep 1), not on ᾱ = 1, exactly as A1111's sd_samplers_timesteps_impl.ddim.
    """
    if eta and noise_sampler is None:
        raise ValueError("sampling: DDIM with eta > 0 needs a noise sampler")
    alphas_cumprod = alphas_cumprod.detach().to(device=x.device, dtype=torch.float32)
    timesteps = timesteps.to(x.device)
    alphas = alphas_cumprod[timesteps]
    # ᾱ of the step's target: the previous list entry (ᾱ[0] pads the front, it is never used).
    prev_dtype = torch.float32 if x.device.type == "mps" else torch.float64
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(prev_dtype)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    sigmas = eta * torch.sqrt(
        (1 - alphas_prev) / (1 - alphas.to(prev_dtype)) * (1 - alphas.to(prev_dtype) / alphas_prev)
    )
    s_in = x.new_ones([x.shape[0]])
    s_x = x.new_ones([x.shape[0]] + [1] * (x.ndim - 1))
    total = len(timesteps) - 1
    for i in range(total):
        index = total - i
        e_t = eps_model(x, timesteps[index].item() * s_in)
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sigma_t = sigmas[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        x = a_prev.sqrt() * pred_x0 + dir_xt
        # The same step in k-diffusion units: from sigma(ᾱ_t) down to sigma(ᾱ_prev).
        step_sigma = ((1 - alphas[index]) / alphas[index]) ** 0.5
        reached_sigma = ((1 - alphas_prev[index]) / alphas_prev[index]) ** 0.5
        if eta and noise_sampler is not None:
            x = x + sigma_t * noise_sampler(step_sigma, reached_sigma)
        _report(callback, i, total, x, pred_x0, reached_sigma)
    return x


class _DiscreteVPSchedule:
    """A discrete ᾱ table as a continuous VP schedule on t ∈ [1/N, 1] (t_n = (n + 1) / N), log α piecewise linear.

    This is the "discrete" NoiseScheduleVP of DPM-Solver (Lu et al. 2022, App. D) that A1111's UniPC uses:
    log α_t = ½ log ᾱ interpolated linearly in t, σ_t = sqrt(1 - α_t²), λ_t = log α_t - log σ_t.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, device: torch.device) -> None:
        alphas_cumprod = alphas_cumprod.detach().to(torch.float32)
        self.total_n = len(alphas_cumprod)
        self.t_array = torch.linspace(0.0, 1.0, self.total_n + 1)[1:].to(device)
        self.log_alpha_array = (0.5 * torch.log(alphas_cumprod)).to(device)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        xp, fp = self.t_array, self.log_alpha_array
        flat = t.reshape(-1).contiguous()
        # Segment containing t; outside [t_1, t_N] the end segments are extended linearly.
        j = (torch.searchsorted(xp, flat) - 1).clamp(0, len(xp) - 2)
        start_x, end_x, start_y, end_y = xp[j], xp[j + 1], fp[j], fp[j + 1]
        return (start_y + (flat - start_x) * (end_y - start_y) / (end_x - start_x)).reshape(t.shape)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


def _unipc_bh_update(
    x: torch.Tensor,
    model_prev: list[torch.Tensor],
    t_prev: list[torch.Tensor],
    t: torch.Tensor,
    order: int,
    use_corrector: bool,
    vp: _DiscreteVPSchedule,
    data_prediction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    variant: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One UniPC step in data-prediction form with B(h) = h ("bh1") or e^h - 1 ("bh2") (Zhao et al. 2023, Alg. 2-3).

    UniP predicts x_t from the last `order` x0 predictions; UniC then re-evaluates the model at that x_t and
    corrects with order + 1 points. Returns the new x and the model's x0 at the predicted point (None
    without corrector), which the next step reuses as its newest history entry.
    """
    ndim = x.ndim
    t_prev_0 = t_prev[-1]
    model_prev_0 = model_prev[-1]
    lambda_prev_0 = vp.lambda_(t_prev_0)
    lambda_t = vp.lambda_(t)
    sigma_prev_0, sigma_t = vp.sigma(t_prev_0), vp.sigma(t)
    alpha_t = vp.alpha(t)
    h = lambda_t - lambda_prev_0

    # Earlier history points as ratios r_k of their log-SNR distance to the step size h.
    rks: list[torch.Tensor] = []
    d1s: list[torch.Tensor] = []
    for i in range(1, order):
        lambda_prev_i = vp.lambda_(t_prev[-(i + 1)])
        rk = ((lambda_prev_i - lambda_prev_0) / h)[0]
        rks.append(rk)
        d1s.append((model_prev[-(i + 1)] - model_prev_0) / rk)
    rks.append(torch.ones((), dtype=h.dtype, device=h.device))
    rks_t = torch.stack(rks).to(x.device)

    # Data prediction integrates in -λ, so hh = -h; h·φ_k(hh) follows φ_{k+1}(z) = (φ_k(z) - 1/k!) / z.
    hh = -h[0]
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = torch.expm1(hh)
    else:
        raise ValueError(f"sampling: UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    r_rows: list[torch.Tensor] = []
    b_values: list[torch.Tensor] = []
    for i in range(1, order + 1):
        r_rows.append(torch.pow(rks_t, i - 1))
        b_values.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    r_matrix = torch.stack(r_rows)
    b = torch.stack(b_values).to(x.device)

    d1s_t = torch.stack(d1s, dim=1) if d1s else None
    rhos_p: torch.Tensor | None = None
    if d1s_t is not None:
        # Order 2 has a closed form; UniPC uses 1/2 there instead of solving the 1x1 system.
        rhos_p = torch.tensor([0.5], device=x.device) if order == 2 else torch.linalg.solve(r_matrix[:-1, :-1], b[:-1])
    rhos_c: torch.Tensor | None = None
    if use_corrector:
        rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(r_matrix, b)

    x_t_ = _append_dims(sigma_t / sigma_prev_0, ndim) * x - _append_dims(alpha_t * h_phi_1, ndim) * model_prev_0
    if d1s_t is not None and rhos_p is not None:
        pred_res: torch.Tensor | float = torch.einsum("k,bk...->b...", rhos_p, d1s_t)
    else:
        pred_res = 0
    x_t = x_t_ - _append_dims(alpha_t * b_h, ndim) * pred_res

    model_t: torch.Tensor | None = None
    if use_corrector and rhos_c is not None:
        model_t = data_prediction(x_t, t)
        corr_res: torch.Tensor | float = (
            torch.einsum("k,bk...->b...", rhos_c[:-1], d1s_t) if d1s_t is not None else 0
        )
        d1_t = model_t - model_prev_0
        x_t = x_t_ - _append_dims(alpha_t * b_h, ndim) * (corr_res + rhos_c[-1] * d1_t)
    return x_t, model_t


def sample_unipc(
    eps_model: EpsModel,
    x: torch.Tensor,
    steps: int,
    alphas_cumprod: torch.Tensor,
    callback: StepCallback | None,
    *,
    order: int = 3,
    variant: str = "bh1",
    lower_order_final: bool = True,
) -> torch.Tensor:
    """UniPC multistep (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework…"), as A1111 runs it.

    Data prediction, time-uniform steps in t from 1 to 1/N of the discrete VP schedule, order `order`
    with lower orders to warm up and (lower_order_final) to finish; the corrector is skipped on the last
    step. The model sees the continuous timestep (t - 1/N)·N, generally not an integer. `steps` is the
    number of model evaluations, one per step. A1111 refuses steps < order; here the order is capped.
    """
    if steps < 1:
        raise ValueError(f"sampling: UniPC needs at least 1 step, got {steps}")
    order = min(order, steps)
    vp = _DiscreteVPSchedule(alphas_cumprod, x.device)
    batch = x.shape[0]
    ndim = x.ndim

    def data_prediction(x_t: torch.Tensor, t_vec: torch.Tensor) -> torch.Tensor:
        eps = eps_model(x_t, (t_vec - 1.0 / vp.total_n) * 1000.0)
        alpha_t, sigma_t = vp.alpha(t_vec), vp.sigma(t_vec)
        return (x_t - _append_dims(sigma_t, ndim) * eps) / _append_dims(alpha_t, ndim)

    def report(index: int, x_now: torch.Tensor, model_x: torch.Tensor | None, t_vec: torch.Tensor) -> None:
        if callback is None:
            return
        reached_sigma = (vp.sigma(t_vec[:1]) / vp.alpha(t_vec[:1]))[0]
        # The last step evaluates no model; its x is already the clean estimate.
        _report(callback, index, steps, x_now, model_x if model_x is not None else x_now, reached_sigma)

    timesteps = torch.linspace(1.0, 1.0 / vp.total_n, steps + 1).to(x.device)
    t_vec = timesteps[0].expand(batch)
    model_prev = [data_prediction(x, t_vec)]
    t_prev = [t_vec]
    step_index = 0
    for init_order in range(1, order):
        t_vec = timesteps[init_order].expand(batch)
        x, model_x = _unipc_bh_update(x, model_prev, t_prev, t_vec, init_order, True, vp, data_prediction, variant)
        if model_x is None:
            model_x = data_prediction(x, t_vec)
        report(step_index, x, model_x, t_vec)
        step_index += 1
        model_prev.append(model_x)
        t_prev.append(t_vec)
    for step in range(order, steps + 1):
        t_vec = timesteps[step].expand(batch)
        step_order = min(order, steps + 1 - step) if lower_order_final else order
        use_corrector = step != steps
        x, model_x = _unipc_bh_update(
            x, model_prev, t_prev, t_vec, step_order, use_corrector, vp, data_prediction, variant
        )
        report(step_index, x, model_x, t_vec)
        step_index += 1
        model_prev = model_prev[1:] + model_prev[-1:]
        t_prev = t_prev[1:] + [t_vec]
        if step < steps:
            model_prev[-1] = model_x if model_x is not None else data_prediction(x, t_vec)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def sample(
    sampler: SamplerSpec,
    schedule_label: str,
    steps: int,
    eps_model: EpsModel,
    alphas_cumprod: torch.Tensor,
    rng: ImageRNG,
    seeds: Sequence[int],
    callback: StepCallback | None,
) -> torch.Tensor:
    """txt2img latents for one batch, the way A1111 samples them.

    `schedule_label` is the resolved "Schedule type" (the caller turns Automatic into the sampler's
    default); timestep samplers ignore it. Noise: rng.first() is the initial noise (scaled by sigmas[0]
    for k-samplers); ancestral noise continues each image's stream via rng.next(); Brownian samplers use
    one tree per seed. Exceptions from eps_model or callback (interrupts) propagate unchanged.
    """
    if steps < 1:
        raise ValueError(f"sampling: steps must be at least 1, got {steps}")
    with torch.no_grad():
        noise = rng.first()
        if sampler.timestep_sampler:
            timesteps = a1111_timesteps(steps, sampler.discard_penultimate_sigma)
            if sampler.function == "ddim":
                return sample_ddim(eps_model, noise, timesteps, alphas_cumprod, callback)
            if sampler.function == "unipc":
                return sample_unipc(eps_model, noise, len(timesteps), alphas_cumprod, callback)
            raise ValueError(f"sampling: no implementation for timestep sampler {sampler.name!r}")
        try:
            k_sampler = K_SAMPLERS[sampler.function]
        except KeyError:
            raise ValueError(f"sampling: no implementation for sampler {sampler.name!r}") from None
        schedule = DiscreteSchedule(alphas_cumprod.to(noise.device))
        sigmas = make_sigmas(schedule_label, steps, schedule, sampler.discard_penultimate_sigma).to(noise.device)
        x = noise * sigmas[0]
        noise_sampler: NoiseSampler
        if sampler.brownian_noise:
            noise_sampler = BrownianTreeNoiseSampler(
                x, sigmas[sigmas > 0].min(), sigmas.max(), seeds, rng.generator_device, source=rng.source
            )
        else:

            def noise_sampler(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
                return rng.next()

        return k_sampler(eps_denoiser(eps_model, schedule), x, sigmas, noise_sampler, callback)
