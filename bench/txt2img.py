"""Benchmark: our txt2img engine against diffusers' StableDiffusionPipeline on the same checkpoint.
Prints time per step and per image for both, from one process; never used as a test."""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from webui.core.events import Progress  # noqa: E402
from webui.core.params import GenerationParams  # noqa: E402
from webui.engine.checkpoint_loading import read_component_config  # noqa: E402
from webui.engine.devices import choose_device_policy  # noqa: E402
from webui.engine.generate import generate  # noqa: E402
from webui.engine.model_manager import LoadedModel, ModelManager  # noqa: E402
from webui.engine.model_registry import ModelRegistry  # noqa: E402


def build_checkpoint(kind: str, directory: Path) -> Path:
    from tests.fixtures.tiny_sd import build_full_size_sd15_checkpoint, build_tiny_sd1_checkpoint

    if kind == "full":
        return build_full_size_sd15_checkpoint(directory / "random-sd15.safetensors")
    return build_tiny_sd1_checkpoint(directory, name=f"random-{kind}", variant=kind)


def diffusers_pipeline(model: LoadedModel):  # noqa: ANN201 - diffusers type
    """diffusers' own pipeline over the very same modules, with Euler (the same math as our "Euler")."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from webui.engine.clip_tokenizer import TOKENIZER_DIR

    scheduler = EulerDiscreteScheduler.from_config(read_component_config(model.config_dir, "scheduler"))
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)
    pipeline = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=tokenizer, unet=model.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(model: LoadedModel, params: GenerationParams) -> tuple[float, list[float]]:
    stamps: list[float] = []

    def on_progress(_: Progress) -> None:
        sync(model.policy.device)
        stamps.append(time.perf_counter())

    sync(model.policy.device)
    started = time.perf_counter()
    for _ in generate(model, params, 1, "bench", on_progress=on_progress):
        pass
    sync(model.policy.device)
    return time.perf_counter() - started, [b - a for a, b in itertools.pairwise(stamps)]


def time_diffusers(pipeline, model: LoadedModel, params: GenerationParams) -> tuple[float, list[float]]:  # noqa: ANN001
    stamps: list[float] = []
    device = model.policy.device

    def on_step_end(pipe, step, timestep, callback_kwargs):  # noqa: ANN001, ANN202
        sync(device)
        stamps.append(time.perf_counter())
        return callback_kwargs

    sync(device)
    started = time.perf_counter()
    pipeline(
        params.prompt, negative_prompt=params.negative_prompt, num_inference_steps=params.steps,
        guidance_scale=params.cfg_scale, width=params.width, height=params.height,
        num_images_per_prompt=params.batch_size, generator=torch.Generator(device).manual_seed(1),
        callback_on_step_end=on_step_end,
    )
    sync(device)
    return time.perf_counter() - started, [b - a for a, b in itertools.pairwise(stamps)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", type=Path, help="a real SD 1.x .safetensors (default: build a random one)")
    parser.add_argument("--model", choices=("tiny", "mini", "full"), default="mini",
                        help="random checkpoint to build when --ckpt is not given (full = 2 GB SD1.5)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--use-cpu", action="store_true")
    args = parser.parse_args()

    policy = choose_device_policy(force_cpu=args.use_cpu)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.ckpt or build_checkpoint(args.model, Path(scratch))
        model = ModelManager(ModelRegistry([checkpoint.parent]), policy).ensure(str(checkpoint), True)
        params = GenerationParams(
            prompt="a photo of an astronaut riding a horse on mars", negative_prompt="blurry",
            sampler="Euler", steps=args.steps, width=args.size, height=args.size, batch_size=args.batch_size,
        )
        pipeline = diffusers_pipeline(model)
        results: dict[str, list[tuple[float, list[float]]]] = {"webui": [], "diffusers": []}
        time_ours(model, params.replace(steps=2))  # warm-up: first calls allocate and autotune
        time_diffusers(pipeline, model, params.replace(steps=2))
        for _ in range(args.repeats):  # interleaved so machine noise hits both alike
            results["webui"].append(time_ours(model, params))
            results["diffusers"].append(time_diffusers(pipeline, model, params))

    print(f"device: {policy.name}; checkpoint: {checkpoint.name}; {args.size}x{args.size}, "
          f"{args.steps} steps, batch {args.batch_size}, Euler, CFG 7; {args.repeats} runs, medians")
    print(f"{'engine':<10} {'s/step':>10} {'s/image':>10} {'it/s':>8}")
    rows = {}
    for engine, runs in results.items():
        per_step = statistics.median(step for _, steps in runs for step in steps)
        per_image = statistics.median(total for total, _ in runs) / args.batch_size
        rows[engine] = (per_step, per_image)
        print(f"{engine:<10} {per_step:>10.4f} {per_image:>10.3f} {1 / per_step:>8.2f}")
    step_overhead = rows["webui"][0] / rows["diffusers"][0] - 1
    image_overhead = rows["webui"][1] / rows["diffusers"][1] - 1
    print(f"overhead of webui vs diffusers: {step_overhead:+.1%} per step, {image_overhead:+.1%} per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
