"""A1111's noise rules (spec c.3): per-image generators, batch independence, stream continuation, sources.
Imports webui.engine.rng and torch/numpy only; the GPU test compares the NV source with real CUDA randn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from webui.engine.rng import (
    ImageRNG,
    PhiloxGenerator,
    UnknownRngSourceError,
    _philox4x32,
    create_generator,
    randn,
)

CPU = torch.device("cpu")
SHAPE = (4, 8, 8)


def torch_stream(seed: int, shape: tuple[int, ...], draws: int) -> list[torch.Tensor]:
    """The first `draws` tensors of a CPU torch generator seeded `seed` (A1111's CPU and CPU-device GPU source)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(draws)]


@pytest.mark.parametrize("source", ["GPU", "CPU", "NV"])
def test_batch_image_equals_single_image_of_its_seed(source: str) -> None:
    batch = ImageRNG(SHAPE, [101, 202, 303], source, CPU)
    batch_first, batch_next = batch.first(), batch.next()
    for index, seed in enumerate([101, 202, 303]):
        single = ImageRNG(SHAPE, [seed], source, CPU)
        assert torch.equal(batch_first[index], single.first()[0])
        assert torch.equal(batch_next[index], single.next()[0])


def test_image_i_uses_seeds_i_and_next_continues_its_own_stream() -> None:
    seeds = [7, 123456789, 4294967294]
    rng = ImageRNG(SHAPE, seeds, "CPU", CPU)
    first, second, third = rng.first(), rng.next(), rng.next()
    assert first.shape == (3, *SHAPE) and first.dtype == torch.float32
    for index, seed in enumerate(seeds):
        expected = torch_stream(seed, SHAPE, 3)
        assert torch.equal(first[index], expected[0])
        assert torch.equal(second[index], expected[1])
        assert torch.equal(third[index], expected[2])


def test_next_before_first_is_first_and_first_restarts_the_streams() -> None:
    rng = ImageRNG(SHAPE, [5], "CPU", CPU)
    as_next = rng.next()
    assert torch.equal(as_next[0], torch_stream(5, SHAPE, 1)[0])
    rng.next()
    again = rng.first()
    assert torch.equal(again, as_next)
    assert torch.equal(rng.next()[0], torch_stream(5, SHAPE, 2)[1])


def test_cpu_and_gpu_sources_are_identical_on_a_cpu_device() -> None:
    gpu, cpu = ImageRNG(SHAPE, [1, 2], "GPU", CPU), ImageRNG(SHAPE, [1, 2], "CPU", CPU)
    assert torch.equal(gpu.first(), cpu.first())
    assert torch.equal(gpu.next(), cpu.next())
    assert gpu.generator_device == cpu.generator_device == CPU
    assert torch.equal(randn(9, SHAPE, "GPU", CPU), randn(9, SHAPE, "CPU", CPU))


def test_create_generator_per_source() -> None:
    assert isinstance(create_generator(3, "NV", CPU), PhiloxGenerator)
    generator = create_generator(3, "CPU", CPU)
    assert isinstance(generator, torch.Generator) and generator.initial_seed() == 3
    with pytest.raises(UnknownRngSourceError):
        create_generator(3, "TPU", CPU)
    with pytest.raises(UnknownRngSourceError):
        ImageRNG(SHAPE, [1], "cuda", CPU)


def test_philox_core_matches_random123_known_answers() -> None:
    """Philox4x32-10 known-answer vectors published with Random123 (kat_vectors)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        block = np.array(counter, dtype=np.uint32).reshape(4, 1)
        out = _philox4x32(block, np.uint32(key[0]), np.uint32(key[1]))
        assert tuple(int(word) for word in out[:, 0]) == expected


def test_philox_reproduces_cuda_randn_of_seed_0() -> None:
    # torch.randn((3, 4), generator=torch.Generator("cuda").manual_seed(0), device="cuda") on NVIDIA GPUs.
    cuda_values = np.array(
        [
            [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
            [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
            [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
        ],
        dtype=np.float32,
    )
    values = PhiloxGenerator(0).randn((3, 4))
    assert values.dtype == np.float32 and values.shape == (3, 4)
    np.testing.assert_allclose(values, cuda_values, atol=1e-5, rtol=0)


def test_philox_is_deterministic_advances_its_offset_and_is_standard_normal() -> None:
    first = PhiloxGenerator(1234).randn((1_000_000,))
    generator = PhiloxGenerator(1234)
    assert np.array_equal(generator.randn((1_000_000,)), first)
    assert generator.offset == 1
    second = generator.randn((1_000_000,))
    assert not np.array_equal(first, second)
    assert np.array_equal(PhiloxGenerator(4321).randn((8,)), PhiloxGenerator(4321).randn((8,)))
    for sample in (first, second):
        assert abs(float(sample.mean())) < 0.005
        assert abs(float(sample.std()) - 1.0) < 0.005
        # Standard-normal tail mass beyond 2 sigma is 4.55 %.
        assert abs(float((np.abs(sample) > 2).mean()) - 0.0455) < 0.002
    assert abs(float(np.corrcoef(first, second)[0, 1])) < 0.005


def test_nv_image_rng_streams_are_philox_offsets() -> None:
    rng = ImageRNG(SHAPE, [42, 43], "NV", CPU)
    first, second = rng.first(), rng.next()
    for index, seed in enumerate([42, 43]):
        generator = PhiloxGenerator(seed)
        assert torch.equal(first[index], torch.from_numpy(generator.randn(SHAPE)))
        assert torch.equal(second[index], torch.from_numpy(generator.randn(SHAPE)))


def test_eta_noise_seed_delta_reseeds_the_streams_after_the_first_noise() -> None:
    rng = ImageRNG(SHAPE, [10, 20], "CPU", CPU, eta_noise_seed_delta=31337)
    first, second = rng.first(), rng.next()
    for index, seed in enumerate([10, 20]):
        assert torch.equal(first[index], torch_stream(seed, SHAPE, 1)[0])
        assert torch.equal(second[index], torch_stream(seed + 31337, SHAPE, 1)[0])


def test_variation_seed_strength_blends_towards_the_subseed_noise() -> None:
    seeds, subseeds = [10, 10], [77, 78]
    plain = ImageRNG(SHAPE, seeds, "CPU", CPU).first()
    unchanged = ImageRNG(SHAPE, seeds, "CPU", CPU, subseeds=subseeds, subseed_strength=0.0).first()
    assert torch.equal(unchanged, plain)
    full = ImageRNG(SHAPE, seeds, "CPU", CPU, subseeds=subseeds, subseed_strength=1.0).first()
    for index, subseed in enumerate(subseeds):
        torch.testing.assert_close(full[index], torch_stream(subseed, SHAPE, 1)[0], atol=1e-5, rtol=1e-5)
    half = ImageRNG(SHAPE, seeds, "CPU", CPU, subseeds=subseeds, subseed_strength=0.5).first()
    # Spherical: every (channel, column) keeps the mean of the two norms along the height axis.
    noise, subnoise = plain[0], torch_stream(77, SHAPE, 1)[0]
    cos = (noise * subnoise).sum(1) / (noise.norm(dim=1) * subnoise.norm(dim=1))
    omega = torch.acos(cos)
    expected = (torch.sin(0.5 * omega) / torch.sin(omega)).unsqueeze(1) * (noise + subnoise)
    torch.testing.assert_close(half[0], expected, atol=1e-5, rtol=1e-5)
    # The stream after the blended first noise is still the image's own seed.
    rng = ImageRNG(SHAPE, seeds, "CPU", CPU, subseeds=subseeds, subseed_strength=0.5)
    rng.first()
    assert torch.equal(rng.next()[0], torch_stream(10, SHAPE, 2)[1])


def test_seed_resize_pastes_the_old_size_noise_in_the_middle() -> None:
    same = ImageRNG(SHAPE, [3], "CPU", CPU, seed_resize_from_h=64, seed_resize_from_w=64).first()
    assert torch.equal(same, ImageRNG(SHAPE, [3], "CPU", CPU).first())

    smaller = ImageRNG(SHAPE, [3], "CPU", CPU, seed_resize_from_h=48, seed_resize_from_w=32).first()[0]
    old = torch_stream(3, (4, 6, 4), 1)[0]
    canvas = torch_stream(3, SHAPE, 1)[0]
    assert torch.equal(smaller[:, 1:7, 2:6], old)
    assert torch.equal(smaller[:, 0], canvas[:, 0])
    assert torch.equal(smaller[:, :, :2], canvas[:, :, :2])

    larger = ImageRNG(SHAPE, [3], "CPU", CPU, seed_resize_from_h=80, seed_resize_from_w=96).first()[0]
    old = torch_stream(3, (4, 10, 12), 1)[0]
    assert torch.equal(larger, old[:, 1:9, 2:10])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed", [0, 1, 123456789, 4294967294])
def test_philox_matches_cuda_torch_randn(seed: int) -> None:
    shape = (2, 4, 64, 64)
    cuda = torch.randn(shape, generator=torch.Generator("cuda").manual_seed(seed), device="cuda").cpu().numpy()
    np.testing.assert_allclose(PhiloxGenerator(seed).randn(shape), cuda, atol=1e-4, rtol=1e-4)
