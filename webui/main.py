"""Composition root: command line → settings → the few long-lived objects → run the chosen command.
The only module that wires layers together; nothing else may build these objects at import time."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from webui import __version__
from webui.cli import build_parser, params_from_args
from webui.core.events import JobControl
from webui.core.params import ParamError, resolve_seed

if TYPE_CHECKING:
    from fastapi import FastAPI

    from webui.api.context import ApiContext
    from webui.app.gallery import GalleryIndex
    from webui.app.outputs import SavedImage
    from webui.app.queue import GenerationQueue, JobReporter, JobRequest
    from webui.app.runner import EngineRunner
    from webui.app.settings_store import SettingsStore
    from webui.engine.model_registry import ModelRegistry

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


def split_credentials(text: str, field: str) -> list[tuple[str, str]]:
    """ "u:p,u2:p2" (commas or new lines) → [(user, password), ...]; ParamError naming the flag otherwise."""
    credentials: list[tuple[str, str]] = []
    for entry in (part.strip() for line in text.splitlines() for part in line.split(",")):
        if not entry:
            continue
        user, separator, password = entry.partition(":")
        if not separator or not user or not password:
            raise ParamError(field, "expected USER:PASS entries separated by commas")
        credentials.append((user, password))
    return credentials


def parse_credentials(args: argparse.Namespace) -> list[tuple[str, str]]:
    """--gradio-auth "u:p,u2:p2" and --gradio-auth-path FILE (same format, also one per line)."""
    credentials = split_credentials(args.gradio_auth or "", "gradio_auth")
    if args.gradio_auth_path:
        credentials += split_credentials(args.gradio_auth_path.read_text(encoding="utf-8"), "gradio_auth_path")
    return credentials


SECRET_FLAGS = ("gradio_auth", "api_auth")


def public_flags(args: argparse.Namespace) -> dict[str, object]:
    """The parsed flags for /sdapi/v1/cmd-flags, with every credential masked."""
    flags: dict[str, object] = {}
    for name, value in vars(args).items():
        if name in SECRET_FLAGS and value:
            value = "********"
        flags[name] = str(value) if isinstance(value, Path) else value
    flags["ckpt_dir"] = [str(path) for path in args.ckpt_dir]
    return flags


class DeferredEngine:
    """The job executor, built on the first job inside the worker thread.

    Importing torch and diffusers takes seconds; deferring it lets the page answer before any model
    work, as A1111 users expect from a restart.
    """

    def __init__(self, args: argparse.Namespace, registry: ModelRegistry, settings: SettingsStore,
                 outputs_root: Callable[[], Path], on_saved: Callable[[SavedImage], None]) -> None:
        self._args = args
        self._registry = registry
        self._settings = settings
        self._outputs_root = outputs_root
        self._on_saved = on_saved
        self._runner: EngineRunner | None = None

    def _build(self) -> EngineRunner:
        from webui.app.outputs import Outputs
        from webui.app.runner import EngineRunner
        from webui.engine.devices import choose_device_policy
        from webui.engine.model_manager import ModelManager

        policy = choose_device_policy(force_cpu=self._args.use_cpu)
        logger.info("generating on %s", policy.name)

        def outputs() -> Outputs:
            return Outputs(self._outputs_root())

        return EngineRunner(
            ModelManager(self._registry, policy),
            outputs,
            lambda: self._settings.current.preview_every_n_steps,
            INFOTEXT_VERSION,
            on_saved=self._on_saved,
            image_format=lambda: self._settings.current.samples_format,
            filename_pattern=lambda: self._settings.current.filename_pattern,
        )

    def __call__(self, request: JobRequest, reporter: JobReporter, control: JobControl) -> None:
        if self._runner is None:
            reporter.message("Starting the engine")
            self._runner = self._build()
        self._runner(request, reporter, control)

    def loaded_checkpoint(self) -> tuple[str, str] | None:
        return self._runner.loaded_checkpoint() if self._runner is not None else None


def build_api_context(
    args: argparse.Namespace, registry: ModelRegistry, queue: GenerationQueue, settings: SettingsStore,
    gallery: GalleryIndex, engine: DeferredEngine, outputs_root: Callable[[], Path],
) -> ApiContext:
    from webui.api.context import ApiContext, CheckpointListing

    def list_checkpoints() -> list[CheckpointListing]:
        return [CheckpointListing(info.name, str(info.path), info.stem, registry.cached_sha256(info))
                for info in registry.scan()]

    return ApiContext(
        queue=queue, settings=settings, gallery=gallery, list_checkpoints=list_checkpoints,
        loaded_checkpoint=engine.loaded_checkpoint, outputs_root=outputs_root, cmd_flags=public_flags(args),
        version=INFOTEXT_VERSION,
    )


def mount_api(app: FastAPI, context: ApiContext, credentials: list[tuple[str, str]]) -> None:
    """A1111's /sdapi/v1 and our /api/v1 on `app`, behind HTTP Basic when there are credentials."""
    from fastapi import Depends

    from webui.api.auth import basic_auth_dependency
    from webui.api.jobs import build_jobs_router
    from webui.api.sdapi import build_sdapi_router

    dependencies = [Depends(basic_auth_dependency(credentials))] if credentials else []
    app.include_router(build_sdapi_router(context), dependencies=dependencies)
    app.include_router(build_jobs_router(context), dependencies=dependencies)


def serve_api_only(
    args: argparse.Namespace, host: str, context: ApiContext, credentials: list[tuple[str, str]],
    queue: GenerationQueue, warm_up: Callable[[], None],
) -> int:
    """--nowebui: the REST API alone on its own server (A1111's default port 7861)."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI(title="Stable Diffusion API", version=INFOTEXT_VERSION, docs_url="/docs", redoc_url=None)
    mount_api(app, context, credentials)
    port = args.port or 7861
    print(f"API on http://{host}:{port} (docs at /docs)", flush=True)
    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        queue.shutdown()
    return 0


def run_app(args: argparse.Namespace) -> int:
    """Serve the web UI; the page answers before any model is loaded."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    keep_off_the_network()
    from webui.app.gallery import GalleryIndex
    from webui.app.queue import GenerationQueue, LoadCheckpointRequest
    from webui.app.settings_store import SettingsStore
    from webui.app.token_counter import TokenCounter
    from webui.engine.model_registry import ModelRegistry

    credentials = parse_credentials(args)
    registry = ModelRegistry(checkpoint_folders(args))
    if not registry.scan():
        print(f"No checkpoint found: {registry.where_to_put_checkpoints()}. The UI starts anyway.", flush=True)
    for refused in registry.refused_files():
        print(f"Ignored {refused.name}: pickle checkpoints are not loaded (convert it to .safetensors).", flush=True)
    settings = SettingsStore(args.data_dir / "config.json")
    settings.load()

    # Fixed for this run: the server is allowed to serve files from this folder only.
    started_outdir = args.outdir or (Path(settings.current.outdir) if settings.current.outdir else None)
    fixed_outputs_root = (started_outdir or args.data_dir / "outputs").resolve()

    def outputs_root() -> Path:
        return fixed_outputs_root

    gallery = GalleryIndex(outputs_root(), cache_file=args.data_dir / "cache" / "gallery-index.json")
    engine = DeferredEngine(args, registry, settings, outputs_root, lambda saved: gallery.add(saved.path, saved.infotext))
    queue = GenerationQueue(engine)
    queue.start()
    token_counter = TokenCounter()

    def warm_up() -> None:
        # After the server answers: index past outputs, load the tokenizer and the chosen checkpoint.
        gallery.refresh()
        token_counter.warm_up()
        choices = [info.name for info in registry.scan()]
        saved = settings.current.sd_model_checkpoint
        if choices:
            queue.submit(LoadCheckpointRequest(saved if saved in choices else choices[0]))

    import gradio as gr  # noqa: F401  (imported here: it alone takes seconds)

    from webui.ui.blocks import CSS, HEAD, build_ui, theme_head
    from webui.ui.context import UiContext

    context = UiContext(
        queue=queue,
        settings=settings,
        gallery=gallery,
        token_counter=token_counter,
        list_checkpoints=lambda: [info.name for info in registry.scan()],
        loaded_checkpoint=engine.loaded_checkpoint,
        where_to_put_checkpoints=registry.where_to_put_checkpoints(),
        outputs_root=outputs_root,
    )
    api_context = build_api_context(args, registry, queue, settings, gallery, engine, outputs_root)
    # When the UI has a login, the API is never left open: it takes the same users unless --api-auth is given.
    api_credentials = split_credentials(args.api_auth or "", "api_auth") or credentials
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if args.listen and not credentials and not (args.nowebui and api_credentials):
        print(
            "\n" + "!" * 78 + "\n"
            "WARNING: --listen without --gradio-auth: anyone who can reach this machine can use the UI.\n"
            + "!" * 78 + "\n",
            file=sys.stderr,
        )
    outputs_root().mkdir(parents=True, exist_ok=True)
    if args.nowebui:
        return serve_api_only(args, host, api_context, api_credentials, queue, warm_up)
    demo = build_ui(context)
    demo.queue(default_concurrency_limit=None)
    app, _, _ = demo.launch(
        server_name=host,
        server_port=args.port or 7860,
        auth=credentials or None,
        inbrowser=args.autolaunch,
        prevent_thread_lock=True,
        allowed_paths=[str(outputs_root().resolve())],
        css=CSS,
        head=HEAD + theme_head(args.theme),
        footer_links=["gradio", "settings"],
        show_error=True,
        ssr_mode=False,
        app_kwargs={"docs_url": "/docs", "redoc_url": None} if args.api else None,
    )
    if args.api:
        mount_api(app, api_context, api_credentials)
    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("Stopping.", file=sys.stderr)
    finally:
        demo.close()
        queue.shutdown()
    return 0


def main(argv: list[str]) -> int:
    parser = build_parser(default_data_dir())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # gradio's HTTP client logs every request it makes to itself at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
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
