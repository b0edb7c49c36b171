"""Benchmark: checkpoint cold load, swap-back from the RAM cache and peak RAM, against reading the file and
against diffusers' from_single_file on the same full-size random-weight checkpoints. Never used as a test.

Each measurement runs in a fresh child process; peak RSS is VmHWM, reset just before the load starts. The
file is read once right before each child (page cache warm for every reader alike), the kinds take turns
round after round, and the table shows each number's median over the rounds (--rounds, default 3).
"touch model s" is the floor for any loader: allocating the loaded model's bytes and writing them once.
Before its clock starts each child writes and frees 4x the file's size (see warm_free_memory; --cold-memory
skips that), so that no child's page faults depend on what ran before it.
Usage: python bench/swap.py [--workdir DIR] [--sdxl] [--device cpu|cuda] [--rounds N] [--cold-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def warm_free_memory(args: dict) -> None:
    """Write and free `warm_bytes` of memory just before the clock starts, so that every child's new pages are
    ones its kernel has just freed. On a VM that hands freed memory back to its host (free page reporting,
    virtio-balloon), a page the host took back costs a host fault on its next touch (measured about 3x a
    plain fault here), and which child gets such pages would otherwise depend on what ran before it."""
    if args.get("warm_bytes"):
        import torch

        torch.ones(args["warm_bytes"], dtype=torch.uint8)  # written on every core, freed at once


def child_read_file(args: dict) -> dict:
    """The baseline: every byte of the file read into memory (64 MiB blocks, each a new buffer)."""
    warm_free_memory(args)
    started = time.perf_counter()
    with open(args["a"], "rb") as file:
        while file.read(64 * 1024 * 1024):
            pass
    return {"seconds": time.perf_counter() - started}


def child_touch(args: dict) -> dict:
    """The loaded model's bytes allocated and written once (page faults on every core, as a loader's copies)."""
    import torch

    warm_free_memory(args)
    started = time.perf_counter()
    torch.empty(args["model_bytes"], dtype=torch.uint8).fill_(1)
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

    warm_free_memory(args)
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
    warm_free_memory(args)
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


CHILDREN = {"read": child_read_file, "ours": child_ours, "diffusers": child_diffusers, "touch": child_touch}


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as file:
        while file.read(64 * 1024 * 1024):
            pass


def run_child(kind: str, args: dict) -> dict:
    # The kernel may have dropped some of the file's cached pages since the last child (memory reclaim):
    # each reader starts with the whole file in the page cache, none pays for the disk.
    warm_page_cache(Path(args["a"]))
    completed = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(args)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if completed.returncode != 0:
        return {"error": (completed.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---- parent: build files, run the children, print the table ----------------------------------------------


def warm_bytes_for(path: Path) -> int:
    """Enough for the largest load measured (diffusers: the fp16 file and the fp32 model), within free RAM."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    return min(4 * path.stat().st_size, int(available * 0.6))


def median_of(results: list[dict]) -> dict:
    """Each number's median over the rounds that measured it; the last error if none did."""
    measured = [result for result in results if "error" not in result]
    if not measured:
        return results[-1] if results else {"error": "not run"}
    keys = {key for result in measured for key in result}
    return {key: statistics.median(result[key] for result in measured if key in result) for key in keys}


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
    parser.add_argument(
        "--cold-memory", action="store_true", help="skip writing and freeing memory before each child's clock starts"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measurement; medians are shown")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARGS"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        kind, raw = options.child
        sys.path.insert(0, str(ROOT))
        print(json.dumps(CHILDREN[kind](json.loads(raw))))
        return 0

    files = build_files(options.workdir, options.sdxl)
    load_before = os.getloadavg()
    rows = []
    spread: dict[str, dict[str, list[float | None]]] = {}
    for family, paths in files.items():
        file_a = paths[0]
        args = {
            "a": str(file_a),
            "b": str(paths[1]) if len(paths) > 1 else None,
            "device": options.device,
            "warm_bytes": 0 if options.cold_memory else warm_bytes_for(file_a),
        }
        rounds: dict[str, list[dict]] = {"read": [], "ours": [], "diffusers": [], "touch": []}
        for number in range(options.rounds):
            print(f"{family}: round {number + 1} of {options.rounds} ...", file=sys.stderr, flush=True)
            rounds["read"].append(run_child("read", args))
            rounds["ours"].append(run_child("ours", args))
            rounds["diffusers"].append(run_child("diffusers", {**args, "b": None}))
            model_bytes = rounds["ours"][-1].get("model_bytes")
            if model_bytes:
                rounds["touch"].append(run_child("touch", {**args, "model_bytes": model_bytes}))
        read, ours, theirs, touch = (median_of(rounds[kind]) for kind in ("read", "ours", "diffusers", "touch"))
        rows.append((family, file_a.stat().st_size, read, ours, theirs, touch))
        spread[family] = {
            "read file s": [result.get("seconds") for result in rounds["read"]],
            "ours cold s": [result.get("cold_s") for result in rounds["ours"]],
            "diffusers cold s": [result.get("cold_s") for result in rounds["diffusers"]],
            "touch model s": [result.get("seconds") for result in rounds["touch"]],
        }

    print(
        f"\ndevice: {options.device}; {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before and "
        f"{os.getloadavg()[0]:.2f} after; files are fp16 single-file checkpoints, read from the page cache; "
        f"medians of {options.rounds} rounds; "
        + ("memory not warmed" if options.cold_memory else "each child wrote and freed 4x the file's size first")
        + "\n"
    )
    header = ("family", "file GB", "read file s", "ours cold s", "ours/read", "diffusers cold s", "diffusers/read",
              "touch model s", "swap-back s", "ours peak load GB", "model GB", "peak/model", "diffusers peak GB")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for family, size, read, ours, theirs, touch in rows:
        if "cold_s" not in ours:
            print(f"{family} | ours failed: {ours.get('error')}")
            continue
        read_s = read.get("seconds", float("nan"))
        print(" | ".join((
            family,
            f"{size / GIB:.2f}",
            f"{read_s:.2f}",
            f"{ours['cold_s']:.2f}",
            f"{ours['cold_s'] / read_s:.2f}x",
            f"{theirs['cold_s']:.2f}" if "cold_s" in theirs else f"failed: {theirs.get('error')}",
            f"{theirs['cold_s'] / read_s:.2f}x" if "cold_s" in theirs else "-",
            f"{touch['seconds']:.2f}" if "seconds" in touch else "-",
            f"{ours['swap_back_s']:.3f}" if "swap_back_s" in ours else "-",
            f"{ours['peak_load_bytes'] / GIB:.2f}",
            f"{ours['model_bytes'] / GIB:.2f}",
            f"{ours['peak_load_bytes'] / ours['model_bytes']:.2f}x",
            f"{theirs['peak_load_bytes'] / GIB:.2f}" if "peak_load_bytes" in theirs else "-",
        )))
    print("\nevery round (the table shows medians):")
    for family, columns in spread.items():
        for column, values in columns.items():
            shown = ", ".join("failed" if value is None else f"{value:.2f}" for value in values)
            print(f"  {family} {column}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
