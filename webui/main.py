"""Composition root: command line → settings → the few long-lived objects → run the chosen command.
The only module that wires layers together; nothing else may build these objects at import time."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from webui import __version__
from webui.cli import build_parser, params_from_args
from webui.core.params import ParamError, resolve_seed

logger = logging.getLogger("webui")

MODELS_SUBDIR = Path("models") / "Stable-diffusion"
INFOTEXT_VERSION = f"webui-{__version__}"


def default_data_dir() -> Path:
    """The checkout root when running from a clone (A1111 keeps data beside the code), else the cwd."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "launch.py").is_file() else Path.cwd()


def keep_off_the_network() -> None:
    """Models load from local files only: tell huggingface_hub before it is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def checkpoint_folders(args: argparse.Namespace) -> list[Path]:
    return [args.data_dir / MODELS_SUBDIR, *args.ckpt_dir]


def run_txt2img(args: argparse.Namespace) -> int:
    params = params_from_args(args).validated()
    keep_off_the_network()
    from webui.app.outputs import Outputs
    from webui.engine.devices import choose_device_policy
    from webui.engine.generate import generate
    from webui.engine.model_manager import ModelManager
    from webui.engine.model_registry import ModelRegistry

    registry = ModelRegistry(checkpoint_folders(args))
    policy = choose_device_policy(force_cpu=args.use_cpu)
    manager = ModelManager(registry, policy)
    model = manager.ensure(params.checkpoint, allow_outside_paths=True)
    seed = resolve_seed(params.seed)
    logger.info("model %s [%s] on %s, seed %d", model.info.stem, model.short_hash, policy.name, seed)
    outputs = Outputs(args.outdir or args.data_dir / "outputs")
    for batch in generate(model, params, seed, INFOTEXT_VERSION):
        for generated in batch:
            saved = outputs.save(generated.image, generated.infotext, generated.seed, params.output_format)
            print(saved.path, flush=True)
    return 0


def run_app(args: argparse.Namespace) -> int:
    """Until the web UI lands: report what is there and how to generate, never crash on no models."""
    from webui.engine.model_registry import ModelRegistry

    registry = ModelRegistry(checkpoint_folders(args))
    models = registry.scan()
    print(f"webui {__version__}")
    if models:
        print("Checkpoints found:")
        for info in models:
            print(f"  {info.name}")
    else:
        print(f"No checkpoint found: {registry.where_to_put_checkpoints()}.")
        print("Any SD 1.x single-file checkpoint works, e.g. v1-5-pruned-emaonly.safetensors.")
    for refused in registry.refused_files():
        print(f"Ignored {refused.name}: pickle checkpoints are not loaded (convert it to .safetensors).")
    print("The web UI is not part of this version yet. Generate from the command line:")
    print('  .venv/bin/python -m webui txt2img --prompt "a photo of a cat" --steps 20')
    return 0


def main(argv: list[str]) -> int:
    parser = build_parser(default_data_dir())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command == "txt2img":
            return run_txt2img(args)
        return run_app(args)
    except ParamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (LookupError, ValueError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
