"""Command-line arguments: the app's flags (A1111's names where they exist) and the headless txt2img command.
Parsing only; must not import torch, diffusers or gradio (argument errors must be instant)."""

from __future__ import annotations

import argparse
from pathlib import Path

from webui.app.model_download import DEFAULT_MODEL_SHA256, DEFAULT_MODEL_URL
from webui.core import samplers
from webui.core.params import EMPHASIS_MODES, OUTPUT_FORMATS, RNG_SOURCES, GenerationParams


def _add_path_flags(parser: argparse.ArgumentParser, default_data_dir: Path, on_subcommand: bool) -> None:
    # On a subcommand the defaults are suppressed, so flags given before the subcommand name survive
    # (argparse lets a subparser's defaults overwrite the main parser's values).
    def default(value: object) -> object:
        return argparse.SUPPRESS if on_subcommand else value

    parser.add_argument(
        "--data-dir", type=Path, default=default(default_data_dir),
        help=f"folder holding models/ and outputs/ (default: {default_data_dir})",
    )
    parser.add_argument(
        "--ckpt-dir", type=Path, action="append", default=default([]),
        help="an extra folder of checkpoints, searched after models/Stable-diffusion (repeatable)",
    )
    parser.add_argument(
        "--vae-dir", type=Path, action="append", default=default([]),
        help="an extra folder of VAEs, searched after models/VAE (repeatable)",
    )
    parser.add_argument(
        "--lora-dir", type=Path, action="append", default=default([]),
        help="an extra folder of LoRAs, searched after models/Lora (repeatable)",
    )
    parser.add_argument(
        "--embeddings-dir", type=Path, action="append", default=default([]),
        help="an extra folder of textual-inversion embeddings, searched after embeddings/ and models/embeddings "
        "(repeatable)",
    )
    parser.add_argument(
        "--outdir", type=Path, default=default(None),
        help="outputs folder; images go to OUTDIR/txt2img-images/YYYY-MM-DD/ (default: DATA_DIR/outputs)",
    )
    parser.add_argument(
        "--use-cpu", action="store_true", default=default(False),
        help="run on the CPU even when CUDA is available",
    )


def build_parser(default_data_dir: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m webui", description="Stable Diffusion web UI")
    _add_path_flags(parser, default_data_dir, on_subcommand=False)
    parser.add_argument("--listen", action="store_true",
                        help="serve on 0.0.0.0 so other machines can connect (default: 127.0.0.1 only)")
    parser.add_argument("--share", action="store_true",
                        help="make a public link through gradio's share tunnel (frp); a login is required")
    parser.add_argument("--share-server", default=None, metavar="HOST:PORT",
                        help="with --share: use your own frp share server instead of gradio's")
    parser.add_argument("--share-server-tls-certificate", type=Path, default=None, metavar="FILE",
                        help="with --share-server: the CA certificate (PEM) that the share server's TLS certificate "
                        "chains to; without it the tunnel to your server is not encrypted by TLS")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="with --listen or --share: do NOT require a login (anyone who can reach the server "
                        "can use it); without this flag a password is generated")
    parser.add_argument("--port", type=int, default=None,
                        help="port to serve on (default: 7860, or 7861 with --nowebui)")
    parser.add_argument("--api", action="store_true",
                        help="serve A1111's /sdapi/v1 and the /api/v1 job API beside the UI")
    parser.add_argument("--nowebui", action="store_true", help="serve only the REST API, without the UI")
    parser.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS...]",
                        help="protect the REST API with HTTP Basic authentication")
    parser.add_argument("--gradio-auth", default=None, metavar="USER:PASS[,USER:PASS...]",
                        help="protect the UI with a login")
    parser.add_argument("--gradio-auth-path", type=Path, default=None, metavar="FILE",
                        help="a file of USER:PASS entries (one per line or comma-separated)")
    parser.add_argument("--theme", choices=("light", "dark"), default=None, help="force the UI theme")
    parser.add_argument("--autolaunch", action="store_true", help="open the UI in the default browser")
    parser.add_argument("--extensions-dir", type=Path, default=None, metavar="DIR",
                        help="where extensions are installed (default: DATA_DIR/extensions; the shipped ones "
                        "in the program's extensions/ folder are always listed)")
    parser.add_argument("--styles-file", action="append", default=[], metavar="FILE",
                        help="a styles file, or a wildcard such as 'styles/*.csv' (repeatable; new styles go to the "
                        "first; default: DATA_DIR/styles.csv), as A1111's flag")
    parser.add_argument("--disable-extensions", action="store_true",
                        help="safe mode: start without loading any extension")
    parser.add_argument("--enable-insecure-extension-access", action="store_true",
                        help="allow installing, updating and removing extensions even with --listen or --share")
    parser.add_argument("--default-model-url", default=DEFAULT_MODEL_URL, metavar="URL",
                        help="where the offered default model is downloaded from (default: A1111's SD 1.5, "
                        "v1-5-pruned-emaonly.safetensors on huggingface.co)")
    parser.add_argument("--default-model-sha256", default=DEFAULT_MODEL_SHA256, metavar="HEX",
                        help="sha256 the downloaded default model must have (default: SD 1.5's)")
    parser.add_argument("--no-download-sd-model", action="store_true",
                        help="never offer to download a model when none is found (A1111's flag)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    download = commands.add_parser(
        "download-model",
        help="download the default model (SD 1.5) into the first checkpoint folder",
        description="Download a checkpoint (default: SD 1.5, 4.3 GB) into DATA_DIR/models/Stable-diffusion. "
        "Resumes an interrupted download, checks free disk space first and the sha256 before the file "
        "appears. Progress goes to stderr; the saved path is printed.",
    )
    _add_path_flags(download, default_data_dir, on_subcommand=True)
    download.add_argument("--url", dest="default_model_url", default=argparse.SUPPRESS, metavar="URL",
                          help="URL of a .safetensors file (default: --default-model-url)")
    download.add_argument("--sha256", dest="default_model_sha256", default=argparse.SUPPRESS, metavar="HEX",
                          help="its expected sha256 (default: --default-model-sha256)")

    defaults = GenerationParams()
    txt2img = commands.add_parser(
        "txt2img",
        help="generate images without the UI; prints the path of each saved image",
        description="Generate images headlessly. Prints the path of each saved image, one per line.",
    )
    _add_path_flags(txt2img, default_data_dir, on_subcommand=True)
    txt2img.add_argument(
        "--ckpt", default=None,
        help="checkpoint: a path, a file name in the model folder, a name without extension, "
        "or A1111's 10-character short hash (default: the first checkpoint found)",
    )
    txt2img.add_argument("--prompt", required=True)
    txt2img.add_argument("--negative-prompt", default=defaults.negative_prompt)
    txt2img.add_argument("--steps", type=int, default=defaults.steps)
    txt2img.add_argument("--cfg-scale", type=float, default=defaults.cfg_scale)
    txt2img.add_argument("--sampler", default=defaults.sampler, help=f"one of: {', '.join(samplers.SAMPLERS)}")
    txt2img.add_argument("--scheduler", default=defaults.scheduler, help=f"one of: {', '.join(samplers.SCHEDULES)}")
    txt2img.add_argument("--seed", type=int, default=defaults.seed, help="-1 picks a random seed")
    txt2img.add_argument("--width", type=int, default=defaults.width)
    txt2img.add_argument("--height", type=int, default=defaults.height)
    txt2img.add_argument("--clip-skip", type=int, default=defaults.clip_skip)
    txt2img.add_argument("--batch-size", type=int, default=defaults.batch_size)
    txt2img.add_argument("--batch-count", type=int, default=defaults.batch_count)
    txt2img.add_argument("--rng", dest="rng_source", default=defaults.rng_source, choices=RNG_SOURCES,
                         help="random number source, as A1111's setting (default: %(default)s)")
    txt2img.add_argument("--emphasis", default=defaults.emphasis, choices=EMPHASIS_MODES)
    txt2img.add_argument("--format", dest="output_format", default=defaults.output_format, choices=OUTPUT_FORMATS)
    return parser


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    """The txt2img arguments as GenerationParams (not yet validated)."""
    return GenerationParams(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        checkpoint=args.ckpt,
        sampler=args.sampler,
        scheduler=args.scheduler,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        width=args.width,
        height=args.height,
        clip_skip=args.clip_skip,
        batch_size=args.batch_size,
        batch_count=args.batch_count,
        rng_source=args.rng_source,
        emphasis=args.emphasis,
        output_format=args.output_format,
    )
