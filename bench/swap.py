"""Benchmark: checkpoint cold load, swap-back from the RAM cache and peak RAM, against reading the file and
against diffusers' from_single_file on the same full-size random-weight checkpoints. Never used as a test.

Each measurement runs in a fresh child process; peak RSS is VmHWM, reset just before the load starts.
Usage: python bench/swap.py [--workdir DIR] [--sdxl] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start the peak-RSS count (VmHWM) afresh: ru_maxrss would carry the parent's peak across fork and exec."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ---- child measurements (run with: python bench/swap.py --child KIND ARGS_JSON) ---------------------------


def child_read_file(args: dict) -> dict:
    started = time.perf_counter()
    with open(args["a"], "rb") as file:
        while file.read(64 * 1024 * 1024):
            pass
    return {"seconds": time.perf_counter() - started}


def _manager(args: dict):  # noqa: ANN202 - engine type imported lazily
    import torch  # noqa: F401

    from webui.engine.devices import choose_device_policy
    from webui.engine.model_manager import ModelManager
    from webui.engine.model_registry import ModelRegistry

    policy = choose_device_policy(force_cpu=args["device"] == "cpu")
    return ModelManager(ModelRegistry([Path(args["a"]).parent]), policy)


def child_ours(args: dict) -> dict:
    import torch

    manager = _manager(args)
    # Imported before the clock starts, as the diffusers measurement imports its pipeline first: a running
    # app has these imported before its first load.
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from diffusers.loaders import single_file_utils  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    baseline = rss_bytes()
    reset_peak_rss()
    started = time.perf_counter()
    model = manager.ensure(Path(args["a"]).name)
    if model.policy.device.type == "cuda":
        torch.cuda.synchronize()
    cold = time.perf_counter() - started
    peak_during_load = peak_rss_bytes() - baseline
    model_bytes = sum(
        t.numel() * t.element_size() for m in model.components.modules().values() for t in m.state_dict().values()
    )
    result = {"cold_s": cold, "peak_load_bytes": peak_during_load, "model_bytes": model_bytes}
    if args.get("b"):
        started = time.perf_counter()
        manager.ensure(Path(args["b"]).name)
        result["cold_b_s"] = time.perf_counter() - started
        started = time.perf_counter()
        manager.ensure(Path(args["a"]).name)
        if model.policy.device.type == "cuda":
            torch.cuda.synchronize()
        result["swap_back_s"] = time.perf_counter() - started
        result["rss_two_models_bytes"] = rss_bytes() - baseline
    return result


def child_diffusers(args: dict) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from webui.engine.families import detect_family, read_safetensors_header

    path = Path(args["a"])
    family = detect_family(path, read_safetensors_header(path))
    pipeline_class = StableDiffusionXLPipeline if family.key == "sdxl" else StableDiffusionPipeline
    dtype = torch.float16 if args["device"] == "cuda" else torch.float32
    baseline = rss_bytes()
    reset_peak_rss()
    started = time.perf_counter()
    extra = {} if family.key == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipeline = pipeline_class.from_single_file(
        str(path), config=str(family.config_dir), local_files_only=True, torch_dtype=dtype, **extra
    )
    pipeline.to(args["device"])
    if args["device"] == "cuda":
        torch.cuda.synchronize()
    return {"cold_s": time.perf_counter() - started, "peak_load_bytes": peak_rss_bytes() - baseline}


CHILDREN = {"read": child_read_file, "ours": child_ours, "diffusers": child_diffusers}


def run_child(kind: str, args: dict) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(args)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if completed.returncode != 0:
        return {"error": (completed.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---- parent: build files, run the children, print the table ----------------------------------------------


def build_files(workdir: Path, sdxl: bool) -> dict[str, list[Path]]:
    sys.path.insert(0, str(ROOT))
    from tests.fixtures import tiny_sd

    files: dict[str, list[Path]] = {}
    models = workdir / "sd15"
    models.mkdir(parents=True, exist_ok=True)
    pair = [models / "random-a.safetensors", models / "random-b.safetensors"]
    for seed, path in enumerate(pair):
        if not path.is_file():
            print(f"building {path.name} (full-size SD 1.5, random weights) ...", file=sys.stderr, flush=True)
            tiny_sd.build_full_size_sd15_checkpoint(path, seed=seed)
    files["SD 1.5"] = pair
    if sdxl:
        builder = getattr(tiny_sd, "build_full_size_sdxl_checkpoint", None)
        if builder is None:
            print("SDXL: no full-size SDXL builder in tests/fixtures/tiny_sd.py; skipped", file=sys.stderr)
        else:
            # One file only: two SDXL models in fp32 (2 x 10.4 GB) do not fit a 24 GB machine, so no swap-back.
            path = workdir / "sdxl" / "random-xl-a.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.is_file():
                print(f"building {path.name} (full-size SDXL, random weights) ...", file=sys.stderr, flush=True)
                builder(path)
            files["SDXL"] = [path]
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "webui-bench-swap")
    parser.add_argument("--sdxl", action="store_true", help="also build and measure full-size SDXL (needs ~30 GB RAM)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARGS"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        kind, raw = options.child
        sys.path.insert(0, str(ROOT))
        print(json.dumps(CHILDREN[kind](json.loads(raw))))
        return 0

    files = build_files(options.workdir, options.sdxl)
    rows = []
    for family, paths in files.items():
        file_a = paths[0]
        args = {"a": str(file_a), "b": str(paths[1]) if len(paths) > 1 else None, "device": options.device}
        run_child("read", args)  # warm the page cache for both readers alike
        read = run_child("read", args)
        ours = run_child("ours", args)
        theirs = run_child("diffusers", {**args, "b": None})
        rows.append((family, file_a.stat().st_size, read, ours, theirs))

    print(f"\ndevice: {options.device}; files are fp16 single-file checkpoints, read from the page cache\n")
    header = ("family", "file GB", "read file s", "ours cold s", "cold/read", "diffusers cold s",
              "swap-back s", "ours peak load GB", "model GB", "peak/model", "diffusers peak GB")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for family, size, read, ours, theirs in rows:
        if "error" in ours:
            print(f"{family} | ours failed: {ours['error']}")
            continue
        read_s = read.get("seconds", float("nan"))
        print(" | ".join((
            family,
            f"{size / GIB:.2f}",
            f"{read_s:.2f}",
            f"{ours['cold_s']:.2f}",
            f"{ours['cold_s'] / read_s:.2f}x",
            f"{theirs['cold_s']:.2f}" if "cold_s" in theirs else f"failed: {theirs.get('error')}",
            f"{ours['swap_back_s']:.3f}" if "swap_back_s" in ours else "-",
            f"{ours['peak_load_bytes'] / GIB:.2f}",
            f"{ours['model_bytes'] / GIB:.2f}",
            f"{ours['peak_load_bytes'] / ours['model_bytes']:.2f}x",
            f"{theirs['peak_load_bytes'] / GIB:.2f}" if "peak_load_bytes" in theirs else "-",
        )))
    return 0


if __name__ == "__main__":
    sys.exit(main())
