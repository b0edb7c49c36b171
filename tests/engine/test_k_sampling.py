"""The sampling math against references: k-diffusion's samplers and schedules (what A1111 runs), a DDIM
re-derived from A1111's formulas, diffusers' UniPC; loads k-diffusion by file from site-packages, never torchvision."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel, UniPCMultistepScheduler

from webui.core.samplers import SAMPLERS, SCHEDULES, SamplerSpec, resolved_schedule_label
from webui.engine import k_sampling
from webui.engine.k_sampling import (
    K_SAMPLERS,
    SIGMA_SCHEDULES,
    BrownianTreeNoiseSampler,
    DiscreteSchedule,
    StepInfo,
    a1111_timesteps,
    eps_denoiser,
    make_sigmas,
    sample,
    sample_unipc,
)
from webui.engine.rng import ImageRNG, PhiloxGenerator

CPU = torch.device("cpu")
STEPS = 8
CFG_SCALE = 7.0
UNET_WEIGHT = 0.2
LATENT_SHAPE = (4, 8, 8)
SEEDS = [1234, 98765]


# ---------------------------------------------------------------------------------------------------------------
# Reference k-diffusion, loaded by file
# ---------------------------------------------------------------------------------------------------------------


def _load_k_diffusion() -> SimpleNamespace:
    """k_diffusion.sampling and .external without running k_diffusion/__init__.py.

    torchvision cannot be installed here; k_diffusion/__init__.py and utils.py import it, but only the
    image helpers (PIL <-> tensor conversion) use it, and the samplers never call those. So the package is
    a bare module whose __path__ points at the installed files, and torchvision.transforms.functional is
    a stub while the two modules load; sys.modules is restored afterwards.
    """
    spec = importlib.util.find_spec("k_diffusion")
    assert spec is not None and spec.origin is not None, "k-diffusion (test reference) is not installed"
    package_dir = Path(spec.origin).parent
    stub_names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
    names = ["k_diffusion", "k_diffusion.utils", "k_diffusion.sampling", "k_diffusion.external", *stub_names]
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    try:
        package = ModuleType("k_diffusion")
        package.__path__ = [str(package_dir)]
        sys.modules["k_diffusion"] = package
        stubs = [ModuleType(name) for name in stub_names]
        stubs[0].transforms = stubs[1]  # type: ignore[attr-defined]
        stubs[1].functional = stubs[2]  # type: ignore[attr-defined]
        for stub in stubs:
            if stub.__name__ not in saved:
                sys.modules[stub.__name__] = stub
        loaded: dict[str, ModuleType] = {}
        for name in ("utils", "sampling", "external"):
            file_spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", package_dir / f"{name}.py")
            assert file_spec is not None and file_spec.loader is not None
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[f"k_diffusion.{name}"] = module
            setattr(package, name, module)
            file_spec.loader.exec_module(module)
            loaded[name] = module
        return SimpleNamespace(sampling=loaded["sampling"], external=loaded["external"])
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def kd() -> SimpleNamespace:
    return _load_k_diffusion()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny UNet gains nothing from threads, and on a busy 2-core machine OpenMP spinning costs 30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# A tiny random UNet with CFG, in both the engine's and the reference's shape
# ---------------------------------------------------------------------------------------------------------------


def ldm_alphas_cumprod() -> torch.Tensor:
    """SD 1.x ᾱ the CompVis way: scaled-linear betas in float64, stored as float32."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).to(torch.float32)


class TinyModel:
    """A seeded tiny UNet2DConditionModel plus fixed cond/uncond contexts, as an eps model.

    eps = sqrt(1 - ᾱ(t))·x_in (the exact eps of unit-Gaussian data) + UNET_WEIGHT·UNet(x_in, t, context):
    the random UNet alone predicts no noise, so trajectories would never denoise; the prior term gives
    SD-like O(1) latents, and the UNet (under CFG 7) makes the field nonlinear and prompt-dependent.
    """

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ).eval()
        generator = torch.Generator().manual_seed(1)
        self.cond = torch.randn((1, 7, 32), generator=generator)
        self.uncond = torch.randn((1, 7, 32), generator=generator)
        self.alphas_cumprod = ldm_alphas_cumprod()

    def contexts(self, batch: int) -> torch.Tensor:
        return torch.cat([self.cond.expand(batch, -1, -1), self.uncond.expand(batch, -1, -1)])

    def raw_eps(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        t = t.clamp(0, len(self.alphas_cumprod) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        alpha_bar = (1 - w) * self.alphas_cumprod[low] + w * self.alphas_cumprod[high]
        prior = (1 - alpha_bar).sqrt()[:, None, None, None] * x_in
        with torch.no_grad():
            return prior + UNET_WEIGHT * self.unet(x_in, t, context).sample

    def eps_model(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The engine's EpsModel: classifier-free guidance on eps."""
        eps = self.raw_eps(torch.cat([x_in, x_in]), torch.cat([t, t]), self.contexts(x_in.shape[0]))
        eps_cond, eps_uncond = eps.chunk(2)
        return eps_uncond + CFG_SCALE * (eps_cond - eps_uncond)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """CompVis LatentDiffusion.apply_model, what k-diffusion's CompVisDenoiser wraps."""
        return self.raw_eps(x, t, cond)


@pytest.fixture(scope="module")
def tiny() -> TinyModel:
    return TinyModel()


def a1111_cfg_denoiser(kd: SimpleNamespace, tiny: TinyModel) -> tuple[Callable, torch.nn.Module]:
    """A1111's CFGDenoiser over k-diffusion's CompVisDenoiser: guidance combines the two *denoised* outputs."""
    wrapped = kd.external.CompVisDenoiser(tiny)

    def model(x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        batch = x.shape[0]
        out = wrapped(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=tiny.contexts(batch))
        denoised_cond, denoised_uncond = out.chunk(2)
        return denoised_uncond + (denoised_cond - denoised_uncond) * CFG_SCALE

    return model, wrapped


class ReferenceStreams:
    """Per-image torch generators, independent of webui.engine.rng (A1111's CPU source)."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...]) -> None:
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.shape = shape

    def draw(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=generator) for generator in self.generators])


def reference_sigmas(kd: SimpleNamespace, wrapped: torch.nn.Module, label: str, n: int) -> torch.Tensor:
    sigma_min, sigma_max = wrapped.sigmas[0].item(), wrapped.sigmas[-1].item()
    if label in ("Automatic", "Uniform"):
        return wrapped.get_sigmas(n)
    if label == "Karras":
        return kd.sampling.get_sigmas_karras(n=n, sigma_min=sigma_min, sigma_max=sigma_max)
    if label == "Exponential":
        return kd.sampling.get_sigmas_exponential(n=n, sigma_min=sigma_min, sigma_max=sigma_max)
    if label == "Polyexponential":
        return kd.sampling.get_sigmas_polyexponential(n=n, sigma_min=sigma_min, sigma_max=sigma_max, rho=1.0)
    if label == "SGM Uniform":
        # A1111 sd_schedulers.sgm_uniform: n timesteps from t(sigma_max) towards t(sigma_min), last one dropped.
        start = wrapped.sigma_to_t(torch.tensor(sigma_max))
        end = wrapped.sigma_to_t(torch.tensor(sigma_min))
        sigmas = [wrapped.t_to_sigma(t) for t in torch.linspace(start, end, n + 1)[:-1]]
        return torch.FloatTensor([*sigmas, 0.0])
    raise AssertionError(label)


def spec_for(function: str) -> SamplerSpec:
    return next(spec for spec in SAMPLERS.values() if spec.function == function)


def run(
    tiny: TinyModel,
    spec: SamplerSpec,
    label: str,
    steps: int,
    seeds: list[int],
    source: str = "CPU",
    callback: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor:
    """The engine's entry point on the tiny model, with a fresh ImageRNG for `seeds`."""
    rng = ImageRNG(LATENT_SHAPE, seeds, source, CPU)
    return sample(spec, label, steps, tiny.eps_model, tiny.alphas_cumprod, rng, seeds, callback)


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


def test_schedule_table_covers_every_schedule_label_and_sampler_function() -> None:
    assert set(SIGMA_SCHEDULES) == set(SCHEDULES)
    k_functions = {spec.function for spec in SAMPLERS.values() if not spec.timestep_sampler}
    assert set(K_SAMPLERS) == k_functions


def test_discrete_schedule_matches_k_diffusion(kd: SimpleNamespace, tiny: TinyModel) -> None:
    ours = DiscreteSchedule(tiny.alphas_cumprod.to(torch.float64))
    reference = kd.external.CompVisDenoiser(tiny)
    assert torch.equal(ours.sigmas, reference.sigmas)
    assert ours.sigma_min == reference.sigmas[0].item() and ours.sigma_max == reference.sigmas[-1].item()
    assert ours.sigma_min == pytest.approx(0.0292, abs=1e-4) and ours.sigma_max == pytest.approx(14.6146, abs=1e-4)
    sigmas = torch.cat([torch.logspace(-2, 1.3, 97), reference.sigmas[::37], torch.tensor([0.01, 20.0])])
    torch.testing.assert_close(ours.sigma_to_t(sigmas), reference.sigma_to_t(sigmas), atol=1e-4, rtol=0)
    t = torch.linspace(0, 999, 301)
    torch.testing.assert_close(ours.t_to_sigma(t), reference.t_to_sigma(t), atol=0, rtol=1e-6)


@pytest.mark.parametrize("label", list(SCHEDULES))
@pytest.mark.parametrize("discard", [False, True])
def test_sigma_schedules_match_a1111(kd: SimpleNamespace, tiny: TinyModel, label: str, discard: bool) -> None:
    schedule = DiscreteSchedule(tiny.alphas_cumprod)
    reference = kd.external.CompVisDenoiser(tiny)
    for steps in (1, 2, 10, 20):
        ours = make_sigmas(label, steps, schedule, discard)
        expected = reference_sigmas(kd, reference, label, steps + 1 if discard else steps)
        if discard:
            expected = torch.cat([expected[:-2], expected[-1:]])
        assert ours.dtype == torch.float32 and ours.device == CPU and len(ours) == steps + 1
        assert ours[-1] == 0
        torch.testing.assert_close(ours, expected.to(torch.float32), atol=0, rtol=1e-6)


def test_unknown_schedule_and_bad_steps_raise(tiny: TinyModel) -> None:
    schedule = DiscreteSchedule(tiny.alphas_cumprod)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_sigmas("Beta", 10, schedule, False)
    with pytest.raises(ValueError, match="at least 1"):
        make_sigmas("Karras", 0, schedule, False)


def test_eps_denoiser_equals_compvis_denoiser(kd: SimpleNamespace, tiny: TinyModel) -> None:
    reference = kd.external.CompVisDenoiser(tiny)
    context = tiny.cond.expand(2, -1, -1)
    ours = eps_denoiser(lambda x, t: tiny.apply_model(x, t, context), DiscreteSchedule(tiny.alphas_cumprod))
    x = torch.randn((2, *LATENT_SHAPE), generator=torch.Generator().manual_seed(5)) * 3
    sigma = torch.tensor([7.5, 0.3])
    torch.testing.assert_close(ours(x, sigma), reference(x, sigma, cond=tiny.cond.expand(2, -1, -1)), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# k-diffusion samplers through sample(), against k-diffusion's own functions
# ---------------------------------------------------------------------------------------------------------------


def reference_run(
    kd: SimpleNamespace, tiny: TinyModel, spec: SamplerSpec, label: str, seeds: list[int]
) -> torch.Tensor:
    """What A1111's KDiffusionSampler.sample does, with k-diffusion's code and an independent noise stream."""
    model, wrapped = a1111_cfg_denoiser(kd, tiny)
    sigmas = reference_sigmas(kd, wrapped, label, STEPS + 1 if spec.discard_penultimate_sigma else STEPS)
    if spec.discard_penultimate_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    streams = ReferenceStreams(seeds, LATENT_SHAPE)
    x = streams.draw() * sigmas[0]
    function_name = "dpmpp_2m_sde" if spec.function == "dpmpp_2m_sde_heun" else spec.function
    function = getattr(kd.sampling, f"sample_{function_name}")
    kwargs: dict[str, object] = {}
    if spec.function == "dpmpp_2m_sde_heun":
        kwargs["solver_type"] = "heun"
    if spec.brownian_noise:
        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        kwargs["noise_sampler"] = kd.sampling.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seeds)
    elif "noise_sampler" in inspect.signature(function).parameters:
        kwargs["noise_sampler"] = lambda sigma, sigma_next: streams.draw()
    with torch.no_grad():
        return function(model, x, sigmas, disable=True, **kwargs)


@pytest.mark.parametrize("function", list(K_SAMPLERS))
def test_k_sampler_matches_k_diffusion(kd: SimpleNamespace, tiny: TinyModel, function: str) -> None:
    spec = spec_for(function)
    label = resolved_schedule_label(spec, SCHEDULES["Automatic"])
    steps_seen: list[StepInfo] = []
    ours = run(tiny, spec, label, STEPS, SEEDS, callback=steps_seen.append)
    expected = reference_run(kd, tiny, spec, label, SEEDS)
    assert ours.shape == (len(SEEDS), *LATENT_SHAPE)
    assert torch.isfinite(expected).all()
    # Not bit-identical only because the engine guides eps while A1111 guides the denoised x0.
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert [info.step for info in steps_seen] == list(range(STEPS))
    assert all(info.total_steps == STEPS for info in steps_seen)
    assert all(info.denoised.shape == ours.shape and info.sigma > 0 for info in steps_seen)


@pytest.mark.parametrize("function", list(K_SAMPLERS))
def test_sampler_math_is_k_diffusions_given_the_same_denoiser(
    kd: SimpleNamespace, tiny: TinyModel, function: str
) -> None:
    """With A1111's own CFG denoiser plugged into both, every sampler is bit-identical to k-diffusion's.

    LMS is the exception by design: its coefficients are integrated exactly here, by quadrature there.
    """
    spec = spec_for(function)
    model, wrapped = a1111_cfg_denoiser(kd, tiny)
    sigmas = reference_sigmas(kd, wrapped, "Karras", STEPS)
    x = ReferenceStreams(SEEDS, LATENT_SHAPE).draw() * sigmas[0]
    ours_streams, reference_streams = ReferenceStreams([5, 6], LATENT_SHAPE), ReferenceStreams([5, 6], LATENT_SHAPE)
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    function_name = "dpmpp_2m_sde" if function == "dpmpp_2m_sde_heun" else function
    reference_function = getattr(kd.sampling, f"sample_{function_name}")
    kwargs: dict[str, object] = {"solver_type": "heun"} if function == "dpmpp_2m_sde_heun" else {}
    ours_noise: k_sampling.NoiseSampler
    if spec.brownian_noise:
        ours_noise = BrownianTreeNoiseSampler(x, sigma_min, sigma_max, SEEDS, CPU)
        kwargs["noise_sampler"] = kd.sampling.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=SEEDS)
    else:
        ours_noise = lambda sigma, sigma_next: ours_streams.draw()  # noqa: E731
        if "noise_sampler" in inspect.signature(reference_function).parameters:
            kwargs["noise_sampler"] = lambda sigma, sigma_next: reference_streams.draw()
    with torch.no_grad():
        ours = K_SAMPLERS[function](model, x, sigmas, ours_noise, None)
        expected = reference_function(model, x, sigmas, disable=True, **kwargs)
    if function == "lms":
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    else:
        assert torch.equal(ours, expected)


@pytest.mark.parametrize("function", ["euler_ancestral", "dpmpp_2m_sde"])
def test_images_do_not_depend_on_batch_size(tiny: TinyModel, function: str) -> None:
    spec = spec_for(function)
    label = resolved_schedule_label(spec, SCHEDULES["Automatic"])
    batch = run(tiny, spec, label, STEPS, SEEDS)
    single = run(tiny, spec, label, STEPS, SEEDS[1:])
    torch.testing.assert_close(batch[1:], single, atol=1e-4, rtol=0)


def test_exceptions_from_the_model_or_callback_propagate(tiny: TinyModel) -> None:
    class Stop(Exception):
        pass

    def failing_callback(info: StepInfo) -> None:
        if info.step == 2:
            raise Stop

    def failing_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise Stop

    rng = ImageRNG(LATENT_SHAPE, SEEDS, "CPU", CPU)
    for spec in (SAMPLERS["DPM++ 2M"], SAMPLERS["DDIM"], SAMPLERS["UniPC"]):
        with pytest.raises(Stop):
            sample(spec, "Karras", STEPS, tiny.eps_model, tiny.alphas_cumprod, rng, SEEDS, failing_callback)
        with pytest.raises(Stop):
            sample(spec, "Karras", STEPS, failing_model, tiny.alphas_cumprod, rng, SEEDS, None)


# ---------------------------------------------------------------------------------------------------------------
# Brownian tree noise
# ---------------------------------------------------------------------------------------------------------------


def test_brownian_noise_matches_k_diffusion_batched_tree(kd: SimpleNamespace) -> None:
    x = torch.zeros((2, *LATENT_SHAPE))
    sigmas = torch.tensor([14.6146, 7.0, 2.5, 0.9, 0.0292])
    ours = BrownianTreeNoiseSampler(x, sigmas.min(), sigmas.max(), SEEDS, CPU)
    reference = kd.sampling.BrownianTreeNoiseSampler(x, sigmas.min(), sigmas.max(), seed=SEEDS)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        assert torch.equal(ours(sigma, sigma_next), reference(sigma, sigma_next))
    first = ours(sigmas[0], sigmas[1])
    assert abs(float(first.std()) - 1.0) < 0.25


def test_nv_brownian_noise_uses_philox_like_a1111(kd: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111 replaces torchsde's seeded randn with its randn_local; for the NV source that is a fresh Philox draw."""
    import torchsde._brownian.brownian_interval as brownian_interval

    def a1111_randn_local(size: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
        return torch.asarray(PhiloxGenerator(seed).randn(size)).to(device=device, dtype=dtype)

    x = torch.zeros((2, *LATENT_SHAPE))
    sigmas = torch.tensor([14.6146, 3.0, 0.4, 0.0292])
    ours = BrownianTreeNoiseSampler(x, sigmas.min(), sigmas.max(), SEEDS, CPU, source="NV")
    monkeypatch.setattr(brownian_interval, "_randn", a1111_randn_local)
    reference = kd.sampling.BrownianTreeNoiseSampler(x, sigmas.min(), sigmas.max(), seed=SEEDS)
    expected = [reference(a, b) for a, b in zip(sigmas[:-1], sigmas[1:], strict=True)]
    monkeypatch.undo()
    for (sigma, sigma_next), reference_noise in zip(zip(sigmas[:-1], sigmas[1:], strict=True), expected, strict=True):
        assert torch.equal(ours(sigma, sigma_next), reference_noise)
    # The private copy left torchsde's own randn alone.
    cpu_tree = BrownianTreeNoiseSampler(x, sigmas.min(), sigmas.max(), SEEDS, CPU)
    assert not torch.equal(cpu_tree(sigmas[0], sigmas[1]), expected[0])


# ---------------------------------------------------------------------------------------------------------------
# DDIM and UniPC
# ---------------------------------------------------------------------------------------------------------------


def test_a1111_timesteps() -> None:
    assert a1111_timesteps(20).tolist() == list(range(1, 1000, 50))
    assert len(a1111_timesteps(30)) == 31 and a1111_timesteps(30)[-1] == 991
    assert a1111_timesteps(10, discard_penultimate_sigma=True).tolist() == list(range(1, 1000, 90))
    assert a1111_timesteps(1000).tolist() == [*range(1, 1000), 999]


def reference_ddim(tiny: TinyModel, noise: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
    """DDIM with eta 0 re-derived from A1111's sd_samplers_timesteps_impl.ddim formulas.

    Timesteps t_k = 1 + k·(1000 // steps); each step goes from t_k to t_(k-1) for k = last … 1:
    x0 = (x - sqrt(1 - ᾱ_t) eps) / sqrt(ᾱ_t), x = sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev) eps.
    """
    alphas_cumprod = tiny.alphas_cumprod.to(torch.float64)
    timesteps = [1 + k * (1000 // steps) for k in range(steps + 1) if k * (1000 // steps) < 1000]
    x = noise
    evaluations = 0
    for t, t_prev in zip(reversed(timesteps[1:]), reversed(timesteps[:-1]), strict=True):
        eps = tiny.eps_model(x, torch.full((x.shape[0],), float(t)))
        evaluations += 1
        a_t, a_prev = alphas_cumprod[t].item(), alphas_cumprod[t_prev].item()
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x, evaluations


@pytest.mark.parametrize("steps", [8, 30])
def test_ddim_matches_a1111_formulas(tiny: TinyModel, steps: int) -> None:
    infos: list[StepInfo] = []
    ours = run(tiny, SAMPLERS["DDIM"], "Automatic", steps, SEEDS, callback=infos.append)
    noise = ReferenceStreams(SEEDS, LATENT_SHAPE).draw()
    expected, evaluations = reference_ddim(tiny, noise, steps)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    # A1111 quirk: len(range(0, 1000, 1000 // steps)) - 1 steps: 7 for 8 (125 | 1000), 30 for 30 (31 entries).
    assert len(infos) == evaluations == len(a1111_timesteps(steps)) - 1
    assert [info.step for info in infos] == list(range(evaluations))


def diffusers_unipc(eps_model: k_sampling.EpsModel, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' UniPC (bh1, order 3, lower_order_final, x0 prediction) on integer timesteps 999 … 999/steps.

    A1111's grid t = linspace(1, 1/1000, steps + 1) hits those timesteps exactly when steps divides 999, and
    both end on ᾱ[0] ("sigma_min"), so the two must agree there up to float rounding.
    """
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        solver_order=3, prediction_type="epsilon", predict_x0=True, solver_type="bh1",
        lower_order_final=True, timestep_spacing="linspace", final_sigmas_type="sigma_min",
    )
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == [999 - k * (999 // steps) for k in range(steps)]
    x = noise
    for t in scheduler.timesteps:
        eps = eps_model(x, torch.full((x.shape[0],), float(t)))
        x = scheduler.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [3, 9, 27])
def test_unipc_matches_diffusers_on_integer_timesteps(tiny: TinyModel, steps: int) -> None:
    alphas_cumprod = UniPCMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ).alphas_cumprod
    noise = ReferenceStreams(SEEDS, LATENT_SHAPE).draw()
    infos: list[StepInfo] = []
    ours = sample_unipc(tiny.eps_model, noise, steps, alphas_cumprod, infos.append)
    expected = diffusers_unipc(tiny.eps_model, noise, steps)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert [info.step for info in infos] == list(range(steps))
    assert all(info.total_steps == steps for info in infos)


def euler_reference(tiny: TinyModel, noise: torch.Tensor, steps: int) -> torch.Tensor:
    schedule = DiscreteSchedule(tiny.alphas_cumprod)
    sigmas = make_sigmas("Uniform", steps, schedule, False)
    denoiser = eps_denoiser(tiny.eps_model, schedule)
    return k_sampling.sample_euler(denoiser, noise * sigmas[0], sigmas, lambda a, b: torch.zeros(()), None)


def test_unipc_is_deterministic_and_converges(tiny: TinyModel) -> None:
    rng = ImageRNG(LATENT_SHAPE, SEEDS, "CPU", CPU)
    runs = {
        steps: sample(SAMPLERS["UniPC"], "Automatic", steps, tiny.eps_model, tiny.alphas_cumprod, rng, SEEDS, None)
        for steps in (4, 8, 20)
    }
    again = sample(SAMPLERS["UniPC"], "Automatic", 8, tiny.eps_model, tiny.alphas_cumprod, rng, SEEDS, None)
    assert torch.equal(runs[8], again)
    target = euler_reference(tiny, rng.first(), 100)
    errors = [float((runs[steps] - target).abs().mean()) for steps in (4, 8, 20)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1 * float(target.abs().mean())


def test_unipc_with_fewer_steps_than_its_order_still_runs(tiny: TinyModel) -> None:
    noise = ReferenceStreams(SEEDS, LATENT_SHAPE).draw()
    for steps in (1, 2):
        infos: list[StepInfo] = []
        out = sample_unipc(tiny.eps_model, noise, steps, tiny.alphas_cumprod, infos.append)
        assert torch.isfinite(out).all() and len(infos) == steps


def test_every_registered_sampler_runs_through_sample_with_the_nv_source(tiny: TinyModel) -> None:
    for spec in SAMPLERS.values():
        label = resolved_schedule_label(spec, SCHEDULES["Automatic"])
        out = run(tiny, spec, label, 3, SEEDS, source="NV")
        assert out.shape == (2, *LATENT_SHAPE) and torch.isfinite(out).all(), spec.name


def test_sample_works_under_inference_mode(tiny: TinyModel) -> None:
    """The engine samples inside torch.inference_mode(); the Brownian trees and schedules must cope."""
    spec = SAMPLERS["DPM++ SDE"]
    plain = run(tiny, spec, "Karras", 4, SEEDS)
    with torch.inference_mode():
        inside = run(tiny, spec, "Karras", 4, SEEDS)
    assert torch.equal(plain, inside)
