"""Benchmark: a rank-32 kohya LoRA over every kohya target, applied, switched and used in txt2img jobs by our patch
layer, against diffusers' load_lora_weights + fuse_lora (peft) on the same modules. Never a test; no gradio/webui.app.

Each kind runs in a fresh child process per round (a full-size model and its merged copies, or diffusers' peft
layers, never share a process); the files are read once before each child (page cache warm for both), and the
table shows each number's median over the rounds (--rounds, default 3). The LoRA is kohya sd-scripts' LoCon at
rank 32 (alpha 16, conv_dim 32): every Linear/Conv2d of the UNet's transformers, resnets and down/upsamplers and of
the text encoders' attention and MLP, applied at 0.8. "first use" reads and parses the file; "parsed" has it in
RAM (ours: the job cache of parsed files; diffusers: its state dict, read before the clock). The jobs (ours only):
a txt2img job whose LoRA set equals the previous job's against a plain job after a plain one; the overhead the
LoRA adds to such a job (tags resolved, patches built, the same set found in place) is also timed on its own.
Usage: python bench/lora.py [--workdir DIR] [--sdxl] [--device cpu|cuda] [--rounds N] [--steps N] [--size PX]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
RANK = 32
ALPHA = 16.0
MULTIPLIER = 0.8
PROMPT = "a photo of an astronaut riding a horse on mars"
# One module of each kind, compared between ours and diffusers after the same LoRA is applied by both.
SAMPLE_MODULES = (
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.up_blocks.1.resnets.0.conv1",
    "text_encoder.encoder.layers.3.mlp.fc1",
    "text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj",
)


def available_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))


def warm_free_memory(byte_count: int) -> None:
    """Write and free memory just before the clocks start, as bench/swap.py does: a merge allocates GBs of new
    pages, and on a VM that hands freed pages back to its host their first touch costs ~3x; this evens that out."""
    import torch

    if byte_count:
        torch.ones(min(byte_count, int(available_bytes() * 0.5)), dtype=torch.uint8)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(device: str, action: Callable[[], object]) -> float:
    sync(device)
    started = time.perf_counter()
    action()
    sync(device)
    return time.perf_counter() - started


def load_model(args: dict):  # noqa: ANN201 - engine type imported lazily
    from webui.engine.devices import choose_device_policy
    from webui.engine.model_manager import ModelManager
    from webui.engine.model_registry import ModelRegistry

    checkpoint = Path(args["checkpoint"])
    policy = choose_device_policy(force_cpu=args["device"] == "cpu")
    return ModelManager(ModelRegistry([checkpoint.parent]), policy).ensure(checkpoint.name)


def save_samples(model, path: str) -> None:  # noqa: ANN001
    import torch

    modules = model.named_modules()
    torch.save({name: modules[name].weight.detach().float().cpu().clone() for name in SAMPLE_MODULES
                if name in modules}, path)


def lora_tag(path: str) -> str:
    return f"<lora:{Path(path).stem}:{MULTIPLIER}>"


# ---- child measurements (run with: python bench/lora.py --child KIND ARGS_JSON) ---------------------------


def child_ours(args: dict) -> dict:
    import torch

    from webui.core.extra_networks import parse_extra_networks
    from webui.core.params import GenerationParams
    from webui.engine.generate import generate
    from webui.engine.networks.activation import ExtraNetworks
    from webui.engine.networks.registry import LoraRegistry
    from webui.engine.patches import patched

    device = args["device"]
    model = load_model(args)
    networks = ExtraNetworks(LoraRegistry([Path(args["lora_a"]).parent]))
    networks.loras.scan()  # as the app does at start-up
    originals = {name: module.weight for name, module in model.named_modules().items()
                 if isinstance(getattr(module, "weight", None), torch.nn.Parameter)}

    def apply(prompt: str) -> tuple[float, float]:
        """(tags → patches: resolve, read + parse or cache hit, hash, routing; the merge or restore)."""
        _, calls = parse_extra_networks(prompt)
        sync(device)
        started = time.perf_counter()
        job = networks.for_job(calls, model.family, model.named_modules())
        resolved = time.perf_counter()
        with patched(model, job.patches) as failures:
            sync(device)
            merged = time.perf_counter()
        if failures or job.warnings:
            raise RuntimeError(f"LoRA not applied: {failures or job.warnings}")
        return resolved - started, merged - resolved

    tag_a, tag_b = lora_tag(args["lora_a"]), lora_tag(args["lora_b"])
    warm_free_memory(args["warm_bytes"])
    result: dict[str, float] = {}
    for step, prompt in (("first", tag_a), ("restore", ""), ("parsed", tag_a), ("switch_first", tag_b),
                         ("switch_parsed", tag_a)):
        parse_s, merge_s = apply(f"{PROMPT} {prompt}")
        result[f"{step}_s"], result[f"{step}_parse_s"], result[f"{step}_merge_s"] = parse_s + merge_s, parse_s, merge_s
        if step == "restore":
            restored = all(module.weight is originals[name] for name, module in model.named_modules().items()
                           if name in originals)
    result["restored_exactly"] = float(restored)
    result["patched_bytes"] = float(sum(
        original.numel() * original.element_size() for (_, attribute), (_, original) in
        model.patch_state.originals.items() if original is not None and attribute == "weight"
    ))
    result["modules_patched"] = float(len(model.patch_state.originals))
    save_samples(model, args["samples_ours"])

    # The LoRA's cost in a job whose set is the one in place: tags resolved, patches built, same keys found.
    overheads = []
    for _ in range(20):
        parse_s, merge_s = apply(f"{PROMPT} {tag_a}")
        overheads.append(parse_s + merge_s)
    result["same_set_overhead_s"] = statistics.median(overheads)

    params = GenerationParams(prompt=PROMPT, negative_prompt="blurry", sampler="Euler", steps=args["steps"],
                              width=args["size"], height=args["size"])

    def job(prompt: str) -> float:
        return timed(device, lambda: [None for _ in generate(model, params.replace(prompt=prompt), 1, "bench",
                                                              networks=networks)])

    job(PROMPT)  # warm-up (first calls allocate); then blocks of jobs, each block's first one untimed: it merges
    plain: list[float] = []   # or restores, so the timed ones are jobs whose set equals the previous job's
    same_set: list[float] = []
    for _ in range(args["job_blocks"]):
        for prompt, times in ((f"{PROMPT} {tag_a}", same_set), (PROMPT, plain)):
            job(prompt)
            times.extend(job(prompt) for _ in range(args["jobs_per_block"]))
    result["plain_job_s"] = statistics.median(plain)
    result["same_set_job_s"] = statistics.median(same_set)
    return result


def _pipeline(model):  # noqa: ANN001, ANN202 - diffusers type
    """diffusers' pipeline over our loaded modules (its LoRA loader patches these very modules)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from webui.engine.checkpoint_loading import read_component_config
    from webui.engine.clip_tokenizer import TOKENIZER_DIR

    scheduler = EulerDiscreteScheduler.from_config(read_component_config(model.config_dir, "scheduler"))
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)
    if model.text_encoder_2 is not None:
        return StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=model.unet, scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=tokenizer, unet=model.unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def child_diffusers(args: dict) -> dict:
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import load_file

    device = args["device"]
    diffusers_logging.set_verbosity_error()
    model = load_model(args)
    pipeline = _pipeline(model)
    modules = model.named_modules()
    before = {name: modules[name].weight.detach().clone() for name in SAMPLE_MODULES if name in modules}
    parsed_a = load_file(args["lora_a"], device="cpu")  # "parsed": the file's tensors in RAM before the clock

    def load(source: str | dict) -> float:
        # A copy: diffusers' kohya conversion pops the keys of the dict it is given.
        return timed(device, lambda: pipeline.load_lora_weights(
            dict(source) if isinstance(source, dict) else source, adapter_name="bench"
        ))

    def fuse() -> float:
        return timed(device, lambda: pipeline.fuse_lora(lora_scale=MULTIPLIER))

    def restore() -> float:
        return timed(device, lambda: (pipeline.unfuse_lora(), pipeline.unload_lora_weights()))

    warm_free_memory(args["warm_bytes"])
    result: dict[str, float] = {}
    for step, source in (("first", args["lora_a"]), ("restore", None), ("parsed", parsed_a),
                         ("switch_first", args["lora_b"]), ("switch_parsed", parsed_a)):
        restore_s = restore() if step in ("restore", "switch_first", "switch_parsed") else 0.0
        load_s = load(source) if source is not None else 0.0
        fuse_s = fuse() if source is not None else 0.0
        result[f"{step}_s"] = restore_s + load_s + fuse_s
        result[f"{step}_parse_s"] = load_s
        result[f"{step}_merge_s"] = restore_s + fuse_s
        if step == "restore":
            modules = model.named_modules()
            result["restore_max_error"] = max(
                float((modules[name].weight.detach() - weight).abs().max()) for name, weight in before.items()
            )
    import torch

    samples = {}  # peft wraps each patched layer: its base_layer holds the fused weight
    for name, module in model.named_modules().items():
        bare = name.replace(".base_layer", "")
        if bare in SAMPLE_MODULES and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            samples[bare] = module.weight.detach().float().cpu().clone()
    torch.save(samples, args["samples_diffusers"])
    result["modules_patched"] = float(sum(name.endswith(".base_layer") for name in model.named_modules()))
    return result


CHILDREN = {"ours": child_ours, "diffusers": child_diffusers}


def warm_page_cache(*paths: Path) -> None:
    for path in paths:
        with open(path, "rb") as file:
            while file.read(64 * 1024 * 1024):
                pass


def run_child(kind: str, args: dict, needs_bytes: int) -> dict:
    if available_bytes() < needs_bytes:
        return {"error": f"skipped: needs ~{needs_bytes / GIB:.0f} GB of RAM, {available_bytes() / GIB:.0f} GB free"}
    warm_page_cache(Path(args["checkpoint"]), Path(args["lora_a"]), Path(args["lora_b"]))
    completed = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(args)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if completed.returncode != 0:
        return {"error": (completed.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---- parent: build files, run the children, print the tables ---------------------------------------------


def _sdxl_unet_names(unet) -> dict[str, str]:  # noqa: ANN001
    """diffusers UNet module path → its LDM (sgm) path, the names kohya's SDXL UNet gives its modules."""
    from tests.fixtures.ldm_layout import UNET_PREFIX, unet_to_ldm

    class ParameterNames:
        """The UNet as unet_to_ldm walks it, whose state dict holds each tensor's own name."""

        def __getattr__(self, name: str) -> object:
            return getattr(unet, name)

        def state_dict(self) -> dict[str, str]:
            return {name: name for name in unet.state_dict()}

    names: dict[str, str] = {}
    for ldm_key, diffusers_key in unet_to_ldm(ParameterNames()).items():  # type: ignore[arg-type]
        if diffusers_key.endswith(".weight"):
            names[diffusers_key.removesuffix(".weight")] = ldm_key.removeprefix(UNET_PREFIX).removesuffix(".weight")
    return names


def build_files(workdir: Path, sdxl: bool) -> dict[str, dict]:
    """Per family: the checkpoint, two LoRA files (seeds 1, 2), and the skeleton's sizes for the RAM checks."""
    sys.path.insert(0, str(ROOT))
    from tests.fixtures import network_files, tiny_sd
    from webui.engine.checkpoint_loading import build_components
    from webui.engine.families import SD1, SDXL

    families = {"SD 1.5": (SD1, tiny_sd.build_full_size_sd15_checkpoint, "sd15", "sd_v1")}
    if sdxl:
        families["SDXL"] = (SDXL, tiny_sd.build_full_size_sdxl_checkpoint, "sdxl", "sdxl_base_v1-0")
    files: dict[str, dict] = {}
    for label, (family, builder, folder, base_version) in families.items():
        directory = workdir / folder
        directory.mkdir(parents=True, exist_ok=True)
        checkpoint = directory / f"random-{folder}.safetensors"
        if not checkpoint.is_file():
            print(f"building {checkpoint.name} ({label}, random weights) ...", file=sys.stderr, flush=True)
            builder(checkpoint)
        skeleton = build_components(family, family.config_dir)  # no memory for weights
        roots = {prefix.rstrip("_"): getattr(skeleton, component) for prefix, component in family.lora_prefixes.items()}
        targets = network_files.kohya_lora_targets(
            roots, unet_names=_sdxl_unet_names(skeleton.unet) if family is SDXL else None
        )
        loras = []
        for seed, name in ((1, "style-a"), (2, "style-b")):
            path = workdir / f"{folder}-lora" / f"{name}.safetensors"
            if not path.is_file():
                network_files.write_kohya_lora(path, targets, rank=RANK, alpha=ALPHA, seed=seed,
                                               metadata={"ss_base_model_version": base_version, "ss_network_dim": RANK})
            loras.append(path)
        model_bytes = sum(p.numel() * 4 for m in skeleton.modules().values() for p in m.parameters())
        patched_bytes = sum(4 * math.prod(shape) for shape in targets.values())
        files[label] = {"checkpoint": checkpoint, "loras": loras, "modules": len(targets),
                        "model_bytes": model_bytes, "patched_bytes": patched_bytes}
    return files


def median_of(results: list[dict]) -> dict:
    """Each number's median over the rounds that measured it; the last error if none did."""
    measured = [result for result in results if "error" not in result]
    if not measured:
        return results[-1] if results else {"error": "not run"}
    keys = {key for result in measured for key in result}
    return {key: statistics.median(result[key] for result in measured if key in result) for key in keys}


def sample_difference(ours_path: Path, theirs_path: Path) -> str:
    import torch

    if not ours_path.is_file() or not theirs_path.is_file():
        return "-"
    ours, theirs = torch.load(ours_path), torch.load(theirs_path)
    shared = sorted(set(ours) & set(theirs))
    if not shared:
        return "no module in common"
    worst = max(float((ours[name] - theirs[name]).abs().max()) for name in shared)
    return f"{worst:.1e} over {len(shared)} modules"


ROWS = (
    ("apply, first use (read + parse + merge)", "first_s"),
    ("  of which read + parse (ours: tags → patches; diffusers: load_lora_weights)", "first_parse_s"),
    ("  of which merge (ours: patched; diffusers: fuse_lora)", "first_merge_s"),
    ("apply, file parsed (merge only)", "parsed_s"),
    ("  of which merge", "parsed_merge_s"),
    ("restore the originals (ours: unpatch; diffusers: unfuse_lora + unload_lora_weights)", "restore_s"),
    ("switch to the other LoRA, first use", "switch_first_s"),
    ("switch back to a parsed LoRA", "switch_parsed_s"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "webui-bench-lora")
    parser.add_argument("--sdxl", action="store_true", help="also full-size SDXL (ours needs ~28 GB RAM on the CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measurement; medians are shown")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of the txt2img jobs")
    parser.add_argument("--size", type=int, default=256, help="width and height of the txt2img jobs")
    parser.add_argument("--jobs-per-block", type=int, default=2, help="timed jobs per block of same-set jobs")
    parser.add_argument("--job-blocks", type=int, default=1, help="blocks of LoRA jobs, then plain jobs, per round")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARGS"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        kind, raw = options.child
        sys.path.insert(0, str(ROOT))
        print(json.dumps(CHILDREN[kind](json.loads(raw))))
        return 0

    files = build_files(options.workdir, options.sdxl)
    load_before = os.getloadavg()
    results: dict[str, dict[str, list[dict]]] = {}
    differences: dict[str, str] = {}
    for family, built in files.items():
        args = {
            "checkpoint": str(built["checkpoint"]), "lora_a": str(built["loras"][0]), "lora_b": str(built["loras"][1]),
            "device": options.device, "steps": options.steps, "size": options.size,
            "jobs_per_block": options.jobs_per_block, "job_blocks": options.job_blocks,
            "warm_bytes": built["patched_bytes"] if options.device == "cpu" else 0,
            "samples_ours": str(options.workdir / f"{family}-samples-ours.pt".replace(" ", "")),
            "samples_diffusers": str(options.workdir / f"{family}-samples-diffusers.pt".replace(" ", "")),
        }
        cpu_model = built["model_bytes"] if options.device == "cpu" else 0
        lora_bytes = sum(path.stat().st_size for path in built["loras"]) * 2  # fp16 file, float32 factors
        needs = {"ours": cpu_model + built["patched_bytes"] + lora_bytes + 2 * GIB,
                 "diffusers": cpu_model + lora_bytes + 2 * GIB}
        results[family] = {"ours": [], "diffusers": []}
        for number in range(options.rounds):
            for kind in ("ours", "diffusers"):
                print(f"{family}: round {number + 1} of {options.rounds}, {kind} ...", file=sys.stderr, flush=True)
                results[family][kind].append(run_child(kind, args, needs[kind]))
        differences[family] = sample_difference(Path(args["samples_ours"]), Path(args["samples_diffusers"]))

    print(
        f"\ndevice: {options.device}; {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before and "
        f"{os.getloadavg()[0]:.2f} after; kohya LoCon rank {RANK}, alpha {ALPHA:g}, fp16 file, applied at "
        f"{MULTIPLIER}; files read from the page cache; medians of {options.rounds} rounds (fresh processes)\n"
    )
    header = ("family", "measurement", "ours s", "diffusers s", "ours/diffusers")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for family, kinds in results.items():
        ours, theirs = median_of(kinds["ours"]), median_of(kinds["diffusers"])
        for label, key in ROWS:
            mine = f"{ours[key]:.3f}" if key in ours else f"failed: {ours.get('error')}"
            other = f"{theirs[key]:.3f}" if key in theirs else f"failed: {theirs.get('error')}"
            ratio = f"{ours[key] / theirs[key]:.2f}x" if key in ours and theirs.get(key) else "-"
            print(" | ".join((family, label, mine, other, ratio)))
        exact = ("yes (the original tensors themselves)" if ours.get("restored_exactly") == 1.0 else "NO")
        drift = f"max abs change {theirs['restore_max_error']:.1e}" if "restore_max_error" in theirs else "-"
        print(" | ".join((family, "weights after restoring exactly the checkpoint's", exact, drift, "-")))
        print(" | ".join((family, "modules patched", *(f"{int(side['modules_patched'])}" if "modules_patched" in side
                                                      else "-" for side in (ours, theirs)), "-")))
        print(" | ".join((family, "merged weights, ours vs diffusers (max abs difference)", differences[family],
                          "", "-")))

    print(f"\ntxt2img jobs (ours): {options.size}x{options.size}, {options.steps} steps, Euler, CFG 7, batch 1; "
          f"per round {options.job_blocks} blocks of {options.jobs_per_block} timed jobs each kind, each block "
          "after an untimed job that applies or restores the set\n")
    header = ("family", "modules", "patched GB", "plain job s", "same-set LoRA job s", "difference",
              "LoRA overhead per job ms", "overhead / plain job")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for family, kinds in results.items():
        ours = median_of(kinds["ours"])
        if "plain_job_s" not in ours:
            print(f"{family} | ours failed: {ours.get('error')}")
            continue
        built = files[family]
        print(" | ".join((
            family, str(built["modules"]), f"{built['patched_bytes'] / GIB:.2f}", f"{ours['plain_job_s']:.2f}",
            f"{ours['same_set_job_s']:.2f}", f"{ours['same_set_job_s'] / ours['plain_job_s'] - 1:+.1%}",
            f"{ours['same_set_overhead_s'] * 1000:.1f}", f"{ours['same_set_overhead_s'] / ours['plain_job_s']:.2%}",
        )))
    print("\nevery round (the tables show medians):")
    for family, kinds in results.items():
        for kind, rounds in kinds.items():
            for key in ("first_s", "switch_first_s", "plain_job_s", "same_set_job_s"):
                values = [result.get(key) for result in rounds]
                if any(value is not None for value in values):
                    shown = ", ".join("failed" if value is None else f"{value:.2f}" for value in values)
                    print(f"  {family} {kind} {key}: {shown}")
            errors = {result["error"] for result in rounds if "error" in result}
            for error in errors:
                print(f"  {family} {kind}: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
