"""A1111's noise rules: per-image seeded generators for the "GPU", "CPU" and "NV" (Philox) sources, ImageRNG.
Must not import diffusers, gradio, fastapi or webui.app (torch and numpy only); never calls torch.cuda.*."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

RNG_SOURCES: tuple[str, ...] = ("GPU", "CPU", "NV")

# Philox4x32-10 round multipliers and Weyl key increments (Salmon et al. 2011, as used by cuRAND).
_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = np.uint32(0x9E3779B9)
_PHILOX_W1 = np.uint32(0xBB67AE85)
_PHILOX_ROUNDS = 10
_LOW_32_BITS = np.uint64(0xFFFFFFFF)
_SHIFT_32 = np.uint64(32)

# cuRAND's Box-Muller constants are float32 literals; A1111 rounds them to float32 the same way.
_TWO_POW32_INV = float(np.float32(2.3283064e-10))
_TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


class UnknownRngSourceError(ValueError):
    """A random number source other than "GPU", "CPU" or "NV"."""


def _check_source(source: str) -> None:
    if source not in RNG_SOURCES:
        raise UnknownRngSourceError(f"rng: unknown source {source!r}; choose one of: {', '.join(RNG_SOURCES)}")


def _mulhilo(a: np.ndarray, multiplier: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """High and low 32-bit halves of the 64-bit product of uint32 lanes with a 32-bit constant."""
    product = a.astype(np.uint64) * multiplier
    return (product >> _SHIFT_32).astype(np.uint32), (product & _LOW_32_BITS).astype(np.uint32)


def _philox4x32(counter: np.ndarray, key0: np.uint32, key1: np.uint32) -> np.ndarray:
    """Philox4x32-10 on a [4, N] uint32 counter block (Salmon et al., "Parallel random numbers", SC 2011)."""
    c0, c1, c2, c3 = counter
    k0 = np.full_like(c0, key0)
    k1 = np.full_like(c0, key1)
    for round_index in range(_PHILOX_ROUNDS):
        if round_index > 0:
            k0 = k0 + _PHILOX_W0
            k1 = k1 + _PHILOX_W1
        hi0, lo0 = _mulhilo(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack([c0, c1, c2, c3])


class PhiloxGenerator:
    """Numpy Philox4x32-10 + Box-Muller that reproduces NVIDIA torch.randn on any device (A1111's "NV" source).

    Each randn call uses counter (offset, 0, element index, 0) with key = the 64-bit seed, keeps only the
    first Box-Muller output of the first two words, and then advances offset by one, as A1111's
    modules/rng_philox.py does. Box-Muller runs in float64 with cuRAND's float32 constants and the result is
    rounded to float32, which is what A1111 computes (numpy promotes its uint32 x float32 products to float64).
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        shape = tuple(int(size) for size in shape)
        count = math.prod(shape)
        if count >= 2**32:
            raise ValueError(f"rng: the NV source draws at most 2**32 numbers per call, asked for {count}")
        counter = np.zeros((4, count), dtype=np.uint32)
        counter[0] = np.uint32(self.offset & 0xFFFFFFFF)
        counter[2] = np.arange(count, dtype=np.uint32)
        seed = self.seed & 0xFFFFFFFFFFFFFFFF
        words = _philox4x32(counter, np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32))
        self.offset += 1
        # Box-Muller: the +half-step keeps u away from 0 so log(u) is finite.
        u = words[0].astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
        v = words[1].astype(np.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
        radius = np.sqrt(-2.0 * np.log(u))
        return (radius * np.sin(v)).astype(np.float32).reshape(shape)


def generator_device(source: str, device: torch.device) -> torch.device:
    """Where torch generators of this source live: the compute device for "GPU" (CPU on MPS, as A1111), else CPU."""
    _check_source(source)
    device = torch.device(device)
    if source == "GPU" and device.type != "mps":
        return device
    return torch.device("cpu")


def create_generator(seed: int, source: str, device: torch.device) -> torch.Generator | PhiloxGenerator:
    """A fresh generator seeded with `seed` for the given source (A1111's rng.create_generator)."""
    _check_source(source)
    if source == "NV":
        return PhiloxGenerator(seed)
    generator = torch.Generator(generator_device(source, device))
    # torch.Generator.manual_seed takes the seed modulo 2**64, like A1111's int(seed).
    generator.manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
    return generator


def draw(generator: torch.Generator | PhiloxGenerator, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """The next float32 standard-normal tensor of `shape` from `generator`, placed on `device`."""
    shape = tuple(int(size) for size in shape)
    if isinstance(generator, PhiloxGenerator):
        return torch.from_numpy(generator.randn(shape)).to(device)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def randn(seed: int, shape: Sequence[int], source: str, device: torch.device) -> torch.Tensor:
    """The first draw of a fresh generator seeded with `seed` (A1111's randn / randn_local)."""
    return draw(create_generator(seed, source, device), shape, device)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation-seed blend of two [C, H, W] noises: spherical interpolation of every (c, w) column.

    A1111 normalises along dim 1 of the per-image tensor (the height axis), so each column is
    interpolated on its own sphere; when the noises are nearly parallel it falls back to a linear
    blend whose weights are swapped relative to the spherical one (kept: it only matters when the
    two noises are almost equal, where both weightings give the same tensor).
    """
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    low_weight = (torch.sin((1.0 - val) * omega) / sin_omega).unsqueeze(1)
    high_weight = (torch.sin(val * omega) / sin_omega).unsqueeze(1)
    return low_weight * low + high_weight * high


class ImageRNG:
    """Per-image noise streams: image i draws from its own generator seeded seeds[i] (batch-size independent).

    first() is the initial latent noise; next() continues every image's own stream for the samplers'
    ancestral/stochastic noise (A1111 redirects k-diffusion's torch.randn_like there). Optional A1111
    extras: variation seeds (subseeds, subseed_strength), "resize seed from" (seed_resize_from_h/w in
    pixels) and ENSD (eta_noise_seed_delta: generators re-seeded with seed + delta after first()).
    """

    def __init__(
        self,
        shape: Sequence[int],
        seeds: Sequence[int],
        source: str,
        device: torch.device,
        *,
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from_h: int = 0,
        seed_resize_from_w: int = 0,
        eta_noise_seed_delta: int = 0,
    ) -> None:
        _check_source(source)
        self.shape: tuple[int, ...] = tuple(int(size) for size in shape)
        if len(self.shape) != 3:
            raise ValueError(f"rng: shape must be the per-image latent shape (C, H, W), got {self.shape}")
        self.seeds: tuple[int, ...] = tuple(int(seed) for seed in seeds)
        self.source = source
        self.device = torch.device(device)
        self.subseeds: tuple[int, ...] | None = None if subseeds is None else tuple(int(s) for s in subseeds)
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from_h = int(seed_resize_from_h)
        self.seed_resize_from_w = int(seed_resize_from_w)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta)
        self.generators: list[torch.Generator | PhiloxGenerator] = self._create_generators(0)
        self._first_drawn = False

    @property
    def generator_device(self) -> torch.device:
        """The device the torch generators (and A1111's Brownian-tree draws) use for this source."""
        return generator_device(self.source, self.device)

    def _create_generators(self, delta: int) -> list[torch.Generator | PhiloxGenerator]:
        return [create_generator(seed + delta, self.source, self.device) for seed in self.seeds]

    def _noise_shape(self) -> tuple[int, ...]:
        if self.seed_resize_from_h <= 0 or self.seed_resize_from_w <= 0:
            return self.shape
        return (self.shape[0], self.seed_resize_from_h // 8, self.seed_resize_from_w // 8)

    def _paste_centred(self, noise: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        """Put `noise` (drawn at the old size) in the middle of `canvas`, cropping it where it is larger."""
        _, height, width = self.shape
        _, noise_height, noise_width = noise.shape
        dx = (width - noise_width) // 2
        dy = (height - noise_height) // 2
        w = noise_width if dx >= 0 else noise_width + 2 * dx
        h = noise_height if dy >= 0 else noise_height + 2 * dy
        tx, ty = max(dx, 0), max(dy, 0)
        sx, sy = max(-dx, 0), max(-dy, 0)
        canvas[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
        return canvas

    def first(self) -> torch.Tensor:
        """[B, C, H, W] float32 initial noise; restarts every image's stream, so calling it again repeats it."""
        self.generators = self._create_generators(0)
        noise_shape = self._noise_shape()
        use_variation = self.subseeds is not None and self.subseed_strength != 0
        images: list[torch.Tensor] = []
        for index, (seed, generator) in enumerate(zip(self.seeds, self.generators, strict=True)):
            subnoise: torch.Tensor | None = None
            if use_variation:
                assert self.subseeds is not None
                subseed = self.subseeds[index] if index < len(self.subseeds) else 0
                subnoise = randn(subseed, noise_shape, self.source, self.device)
            if noise_shape != self.shape:
                # The old-size noise comes from a fresh generator; the image's own stream fills the canvas.
                noise = randn(seed, noise_shape, self.source, self.device)
            else:
                noise = draw(generator, self.shape, self.device)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise)
            if noise_shape != self.shape:
                noise = self._paste_centred(noise, draw(generator, self.shape, self.device))
            images.append(noise)
        if self.eta_noise_seed_delta:
            self.generators = self._create_generators(self.eta_noise_seed_delta)
        self._first_drawn = True
        return torch.stack(images).to(self.device)

    def next(self) -> torch.Tensor:
        """[B, C, H, W] next draw of every image's own stream (the first call before first() is first())."""
        if not self._first_drawn:
            return self.first()
        return torch.stack([draw(generator, self.shape, self.device) for generator in self.generators])
