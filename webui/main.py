"""Composition root: command line → settings → the few long-lived objects → run the chosen command.
The only module that wires layers together; nothing else may build these objects at import time."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from webui import __version__
from webui.cli import build_parser, params_from_args
from webui.core.events import JobControl
from webui.core.params import ParamError, resolve_seed

if TYPE_CHECKING:
    from fastapi import FastAPI

    from webui.api.context import ApiContext
    from webui.app.extensions import ExtensionHost
    from webui.app.gallery import GalleryIndex
    from webui.app.model_download import BackgroundDownload, DownloadSpec
    from webui.app.model_folders import ModelFolders
    from webui.app.network_cards import NetworkCards
    from webui.app.outputs import SavedImage
    from webui.app.queue import GenerationQueue, JobReporter, JobRequest
    from webui.app.runner import EngineRunner
    from webui.app.settings_store import SettingsStore
    from webui.app.token_counter import TokenCounter
    from webui.core.styles import StyleDatabase
    from webui.engine.model_registry import ModelRegistry, VaeRegistry
    from webui.engine.networks.registry import LoraRegistry
    from webui.engine.networks.textual_inversion import Embedding, EmbeddingDatabase
    from webui.security import GateConfig
    from webui.share import ShareTunnel
    from webui.ui.context import UiContext

logger = logging.getLogger("webui")

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


def model_folders(args: argparse.Namespace) -> ModelFolders:
    """A1111's folders under --data-dir, then the --ckpt-dir/--vae-dir/--lora-dir/--embeddings-dir folders."""
    from webui.app.model_folders import find_model_folders

    return find_model_folders(args.data_dir, args.ckpt_dir, args.vae_dir, args.lora_dir, args.embeddings_dir)


def build_registries(args: argparse.Namespace) -> tuple[ModelRegistry, VaeRegistry]:
    """Checkpoints and VAE files, sharing one hash cache file so each file is hashed once across restarts."""
    from webui.engine.model_registry import FileHasher, ModelRegistry, VaeRegistry

    folders = model_folders(args)
    hasher = FileHasher(args.data_dir / "cache" / "model-hashes.json")
    return ModelRegistry(folders.checkpoints, hasher), VaeRegistry(folders.vae, hasher)


def build_lora_registry(args: argparse.Namespace) -> LoraRegistry:
    """The LoRA/LyCORIS files; their addnet hashes are kept in their own cache file across restarts."""
    from webui.engine.model_registry import FileHasher
    from webui.engine.networks.registry import LoraRegistry, addnet_hash

    hasher = FileHasher(args.data_dir / "cache" / "lora-hashes.json", digest=addnet_hash)
    return LoraRegistry(model_folders(args).lora, hasher)


def build_style_database(args: argparse.Namespace) -> StyleDatabase:
    """styles.csv: the --styles-file files (wildcards allowed), else DATA_DIR/styles.csv, as A1111."""
    from webui.core.styles import StyleDatabase

    return StyleDatabase([Path(path) for path in args.styles_file] or [args.data_dir / "styles.csv"])


def default_model_spec(args: argparse.Namespace) -> DownloadSpec:
    from webui.app.model_download import download_spec

    return download_spec(args.default_model_url, args.default_model_sha256,
                         url_field="default_model_url", sha256_field="default_model_sha256")


def download_in_terminal(spec: DownloadSpec, folder: Path) -> Path:
    """Download with a progress bar on stderr; Ctrl+C stops it and keeps the .part for the next attempt."""
    from webui.app.model_download import TextProgressBar, download_model

    print(f"Downloading {spec.url}\n  into {folder / spec.file_name}", file=sys.stderr, flush=True)
    bar = TextProgressBar(sys.stderr)
    try:
        return download_model(spec, folder, progress=bar)
    finally:
        bar.finish()


def run_download_model(args: argparse.Namespace) -> int:
    from webui.app.model_download import download_spec

    # Named after the subcommand's own flags (--url, --sha256), which override --default-model-*.
    spec = download_spec(args.default_model_url, args.default_model_sha256, url_field="url", sha256_field="sha256")
    folder = model_folders(args).checkpoints[0]
    if (folder / spec.file_name).exists():
        print(f"{folder / spec.file_name} is already there.", file=sys.stderr)
        print(folder / spec.file_name, flush=True)
        return 0
    try:
        path = download_in_terminal(spec, folder)
    except KeyboardInterrupt:
        print("Download stopped; run the same command again to resume it.", file=sys.stderr)
        return 130
    print(f"Verified sha256 {spec.sha256}.", file=sys.stderr)
    print(path, flush=True)
    return 0


def offer_default_model(spec: DownloadSpec, folder: Path) -> None:
    """No checkpoint at start-up: ask on a terminal; otherwise say how to download one."""
    if not sys.stdin.isatty():
        print(f"To download {spec.title}: python -m webui download-model (or the Download button in the UI).",
              flush=True)
        return
    try:
        answer = input(f"Download {spec.title} into {folder}? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        return
    from webui.app.model_download import DownloadError

    try:
        download_in_terminal(spec, folder)
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        print("Download stopped; the UI offers to resume it.", file=sys.stderr)


def run_txt2img(args: argparse.Namespace) -> int:
    params = params_from_args(args).validated()
    keep_off_the_network()
    from webui.app.outputs import Outputs
    from webui.engine.devices import choose_device_policy
    from webui.engine.generate import generate
    from webui.engine.model_manager import ModelManager

    registry, vae_registry = build_registries(args)
    policy = choose_device_policy(force_cpu=args.use_cpu)
    manager = ModelManager(registry, policy, vae_registry)
    model = manager.ensure(params.checkpoint, allow_outside_paths=True, vae=params.vae)
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
    for name in ("ckpt_dir", "vae_dir", "lora_dir", "embeddings_dir"):
        flags[name] = [str(path) for path in getattr(args, name)]
    return flags


class DeferredEngine:
    """The job executor, built on the first job inside the worker thread.

    Importing torch and diffusers takes seconds; deferring it lets the page answer before any model
    work, as A1111 users expect from a restart.
    """

    def __init__(self, args: argparse.Namespace, registry: ModelRegistry, vae_registry: VaeRegistry,
                 settings: SettingsStore,
                 outputs_root: Callable[[], Path], on_saved: Callable[[SavedImage], None],
                 extensions: ExtensionHost | None = None, loras: LoraRegistry | None = None) -> None:
        self._args = args
        self._loras = loras
        self._extensions = extensions
        self._registry = registry
        self._vae_registry = vae_registry
        self._settings = settings
        self._outputs_root = outputs_root
        self._on_saved = on_saved
        self._runner: EngineRunner | None = None

    def _build(self) -> EngineRunner:
        from webui.app.outputs import Outputs
        from webui.app.runner import EngineRunner
        from webui.engine.devices import choose_device_policy
        from webui.engine.model_manager import ModelManager
        from webui.engine.networks.textual_inversion import EmbeddingDatabase

        policy = choose_device_policy(force_cpu=self._args.use_cpu)
        logger.info("generating on %s", policy.name)

        def outputs() -> Outputs:
            return Outputs(self._outputs_root())

        return EngineRunner(
            ModelManager(
                self._registry, policy, self._vae_registry,
                ram_cache_size=lambda: self._settings.current.sd_checkpoint_cache,
                models_on_device=lambda: self._settings.current.sd_checkpoints_limit,
            ),
            outputs,
            lambda: self._settings.current.preview_every_n_steps,
            INFOTEXT_VERSION,
            on_saved=self._on_saved,
            image_format=lambda: self._settings.current.samples_format,
            filename_pattern=lambda: self._settings.current.filename_pattern,
            hooks=self._extensions,
            # Built here, not at start-up: the module imports torch.
            embeddings=EmbeddingDatabase(model_folders(self._args).embeddings),
            loras=self._loras,
        )

    def __call__(self, request: JobRequest, reporter: JobReporter, control: JobControl) -> None:
        if self._runner is None:
            reporter.message("Starting the engine")
            self._runner = self._build()
        self._runner(request, reporter, control)

    def loaded_checkpoint(self) -> tuple[str, str | None] | None:
        return self._runner.loaded_checkpoint() if self._runner is not None else None

    def embeddings(self) -> EmbeddingDatabase | None:
        """The runner's embeddings (read from any thread: each refresh swaps its tables in whole); None before the
        first job built the engine."""
        return self._runner.embeddings if self._runner is not None else None


def build_api_context(
    args: argparse.Namespace, registry: ModelRegistry, vae_registry: VaeRegistry, queue: GenerationQueue,
    settings: SettingsStore, gallery: GalleryIndex, engine: DeferredEngine, outputs_root: Callable[[], Path],
    extensions: ExtensionHost | None = None, loras: LoraRegistry | None = None, styles: StyleDatabase | None = None,
) -> ApiContext:
    from webui.api.context import (
        ApiContext,
        CheckpointListing,
        EmbeddingListing,
        EmbeddingsListing,
        LoraListing,
    )

    def list_checkpoints() -> list[CheckpointListing]:
        return [CheckpointListing(info.name, str(info.path), info.stem, registry.cached_sha256(info))
                for info in registry.scan()]

    def list_loras() -> list[LoraListing]:
        files = loras.files() if loras is not None else []
        return [LoraListing(file.name, file.alias, str(file.path), file.metadata) for file in files]

    def refresh_loras() -> None:
        if loras is not None:
            loras.refresh()

    def list_embeddings() -> EmbeddingsListing:
        database = engine.embeddings()
        if database is None:
            return EmbeddingsListing({}, {})

        def listed(entries: Mapping[str, Embedding]) -> dict[str, EmbeddingListing]:
            return {name: EmbeddingListing(item.step, item.sd_checkpoint, item.sd_checkpoint_name, item.shape,
                                           item.vectors) for name, item in entries.items()}

        return EmbeddingsListing(listed(database.loaded), listed(database.skipped))

    return ApiContext(
        queue=queue, settings=settings, gallery=gallery, list_checkpoints=list_checkpoints,
        loaded_checkpoint=engine.loaded_checkpoint, outputs_root=outputs_root, cmd_flags=public_flags(args),
        version=INFOTEXT_VERSION,
        extensions=extensions,
        list_vae_files=lambda: [(info.name, str(info.path)) for info in vae_registry.scan()],
        list_loras=list_loras, refresh_loras=refresh_loras, list_embeddings=list_embeddings, styles=styles,
    )


# The shipped extensions (wildcards, cfg_rescale) live beside the package, in the checkout's extensions/ folder.
SHIPPED_EXTENSIONS_DIR = Path(__file__).resolve().parent.parent / "extensions"
# uvicorn's FORWARDED_ALLOW_IPS entry that matches no peer (an empty literal), so it never rewrites the client.
TRUST_NO_FORWARDING_PROXY = ""
# Long enough for the "Restarting" answer to reach the browser before the process is replaced.
RESTART_DELAY_S = 1.0


def is_exposed(args: argparse.Namespace) -> bool:
    """--listen or --share: reachable from other machines, so a login is required and extension changes are off."""
    return bool(args.listen or args.share)


def build_extension_host(args: argparse.Namespace) -> ExtensionHost:
    """The extension host, with the enabled extensions loaded (none with --disable-extensions)."""
    from webui.app.extensions import ExtensionHost

    exposed = is_exposed(args)
    host = ExtensionHost(
        user_dir=args.extensions_dir or args.data_dir / "extensions",
        builtin_dir=SHIPPED_EXTENSIONS_DIR,
        state_file=args.data_dir / "extensions.json",
        data_dir=args.data_dir,
        safe_mode=args.disable_extensions,
        changes_allowed=not exposed or args.enable_insecure_extension_access,
        webui_version=__version__,
    )
    host.start()
    if args.disable_extensions:
        print("Safe mode (--disable-extensions): no extension is loaded.", flush=True)
    return host


def replace_this_process() -> None:
    """Exec the same command line: the same port and flags, with every module (and extension) imported afresh."""
    logger.info("Reload UI: restarting %s", " ".join(sys.orig_argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def restart_when_idle(
    queue: GenerationQueue,
    before_restart: Callable[[], None] | None = None,
    replace_process: Callable[[], None] = replace_this_process,
) -> Callable[[], str]:
    """The UI's "Reload UI": the process replaces itself, which re-imports the enabled extensions and rebuilds
    the page. New jobs are refused from the press on; queued and running ones (a generation, the first model
    load) finish first, so no one's work is lost. `before_restart` releases what exec would orphan (the share
    tunnel's frpc)."""
    restarting = threading.Event()

    def wait_then_replace() -> None:
        queue.close_when_idle("the web UI is restarting")
        time.sleep(RESTART_DELAY_S)
        if before_restart is not None:
            before_restart()
        replace_process()

    def restart() -> str:
        busy = queue.running_snapshot() is not None or queue.queued_count() > 0
        if not restarting.is_set():
            restarting.set()
            threading.Thread(target=wait_then_replace, name="restart", daemon=True).start()
        if busy:
            return "Restarting the web UI once the current jobs have finished…"
        return "Restarting the web UI…"

    return restart


def mount_extension_routes(app: FastAPI, host: ExtensionHost, credentials: list[tuple[str, str]]) -> None:
    """The boot id the page polls across a restart, and the REST routes extensions add (behind the API's auth)."""
    from fastapi import Depends

    from webui.api.auth import basic_auth_dependency
    from webui.api.extensions import RESERVED_ROUTE_PREFIXES, boot_id_route
    from webui.api.validation import JsonErrorRoute

    app.add_api_route("/internal/boot-id", boot_id_route(), methods=["GET"], include_in_schema=False)
    dependencies = [Depends(basic_auth_dependency(credentials))] if credentials else []

    def add_route(path: str, endpoint: Callable[..., object], methods: list[str]) -> None:
        if not path.startswith("/") or path.startswith(RESERVED_ROUTE_PREFIXES):
            raise ValueError(f"route {path!r} must start with '/' and not with {', '.join(RESERVED_ROUTE_PREFIXES)}")
        # JSON errors for an extension's routes too: bad input is a 422, a bug in the extension a JSON 500.
        app.router.add_api_route(path, endpoint, methods=methods, dependencies=dependencies,
                                 route_class_override=JsonErrorRoute)

    host.app_started(add_route)


def mount_api(app: FastAPI, context: ApiContext, credentials: list[tuple[str, str]]) -> None:
    """A1111's /sdapi/v1 and our /api/v1 on `app`, behind HTTP Basic when there are credentials."""
    from fastapi import Depends

    from webui.api.auth import basic_auth_dependency
    from webui.api.jobs import build_jobs_router
    from webui.api.sdapi import build_sdapi_router

    dependencies = [Depends(basic_auth_dependency(credentials))] if credentials else []
    app.include_router(build_sdapi_router(context), dependencies=dependencies)
    app.include_router(build_jobs_router(context), dependencies=dependencies)
    if context.extensions is not None:
        from webui.api.extensions import build_extensions_router

        app.include_router(build_extensions_router(context.extensions), dependencies=dependencies)


def serve_api_only(
    args: argparse.Namespace, host: str, context: ApiContext, credentials: list[tuple[str, str]],
    queue: GenerationQueue, warm_up: Callable[[], None], gate: GateConfig, share_tunnel: ShareTunnel | None = None,
) -> int:
    """--nowebui: the REST API alone on its own server (A1111's default port 7861)."""
    import uvicorn
    from fastapi import FastAPI
    from starlette.middleware import Middleware

    from webui.security import AccessGate

    app = FastAPI(title="Stable Diffusion API", version=INFOTEXT_VERSION, docs_url="/docs", redoc_url=None,
                  middleware=[Middleware(AccessGate, config=gate)])
    mount_api(app, context, credentials)
    if context.extensions is not None:
        mount_extension_routes(app, context.extensions, credentials)
    port = args.port or 7861
    print(f"API on http://{host}:{port} (docs at /docs)", flush=True)
    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning",
                    forwarded_allow_ips=os.environ["FORWARDED_ALLOW_IPS"])
    finally:
        if share_tunnel is not None:
            share_tunnel.close()
        queue.shutdown()
    return 0


def open_share_link(args: argparse.Namespace, port: int) -> ShareTunnel | None:
    """--share: our frpc's public link, or a message naming why there is none (the local UI starts anyway)."""
    from webui.share import ShareError, open_share_tunnel

    print("Opening the share link...", flush=True)
    try:
        tunnel = open_share_tunnel(port, args.share_server, args.share_server_tls_certificate, args.data_dir / "cache")
    except ShareError as error:
        print(error.user_message(f"http://127.0.0.1:{port}"), file=sys.stderr, flush=True)
        return None
    print(f"Share link: {tunnel.url}", flush=True)
    return tunnel


def prompt_length_check(token_counter: TokenCounter, settings: SettingsStore) -> Callable[[JobRequest], None]:
    """The queue's check on every txt2img job: prompts within the Settings tab's chunk limit."""
    from webui.app.queue import Txt2ImgRequest

    def check(request: JobRequest) -> None:
        if isinstance(request, Txt2ImgRequest):
            token_counter.check_prompt_length(request.params, settings.current.max_prompt_chunks)

    return check


def build_network_cards(args: argparse.Namespace, registry: ModelRegistry, loras: LoraRegistry,
                        styles: StyleDatabase, engine: DeferredEngine) -> NetworkCards:
    """The extra-networks cards: checkpoints, LoRA files, embedding files (marked when the engine skipped them for
    the loaded model) and styles."""
    from webui.app.network_cards import NetworkCards

    def embedding_misfits() -> Mapping[str, str]:
        database = engine.embeddings()
        return database.skip_notes if database is not None else {}

    return NetworkCards(registry, loras, model_folders(args).embeddings, styles, engine.loaded_checkpoint,
                        embedding_misfits=embedding_misfits)


def mount_preview_route(app: FastAPI, context: UiContext) -> None:
    """The cards' preview pictures, behind the UI's login like every page route (the access gate sees to it)."""
    from webui.ui.extra_networks import PREVIEW_ROUTE, preview_endpoint

    if context.network_cards is not None:
        app.add_api_route(f"{PREVIEW_ROUTE}/{{kind}}/{{root}}/{{path:path}}", preview_endpoint(context.network_cards),
                          methods=["GET"], include_in_schema=False)


def build_model_download(spec: DownloadSpec, folder: Path, queue: GenerationQueue) -> BackgroundDownload:
    """The UI's "Download" button: the default model into the first checkpoint folder, then queued for loading."""
    from webui.app.model_download import BackgroundDownload
    from webui.app.queue import LoadCheckpointRequest

    def load(path: Path) -> None:
        queue.submit(LoadCheckpointRequest(path.name))

    return BackgroundDownload(spec, folder, on_done=load)


def run_app(args: argparse.Namespace) -> int:
    """Serve the web UI; the page answers before any model is loaded."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # uvicorn (which gradio starts) otherwise takes any loopback peer's X-Forwarded-For as the client's address, so
    # a local process could name any client and escape the login lockout. The access gate trusts the header from
    # our share tunnel's own connections only. Set it yourself when a reverse proxy of yours sits in front.
    os.environ.setdefault("FORWARDED_ALLOW_IPS", TRUST_NO_FORWARDING_PROXY)
    keep_off_the_network()
    from webui.app.gallery import GalleryIndex
    from webui.app.queue import GenerationQueue, LoadCheckpointRequest
    from webui.app.settings_store import SettingsStore
    from webui.app.token_counter import TokenCounter

    credentials = parse_credentials(args)
    default_model = None if args.no_download_sd_model else default_model_spec(args)
    registry, vae_registry = build_registries(args)
    download_folder = registry.folders[0]
    if not registry.scan():
        print(f"No checkpoint found: {registry.where_to_put_checkpoints()}. The UI starts anyway.", flush=True)
        if default_model is not None:
            offer_default_model(default_model, download_folder)
    for refused in registry.refused_files():
        print(f"Ignored {refused.name}: pickle checkpoints are not loaded (convert it to .safetensors).", flush=True)
    settings = SettingsStore(args.data_dir / "config.json")
    settings.load()
    extensions = build_extension_host(args)
    lora_registry = build_lora_registry(args)
    styles = build_style_database(args)

    # Fixed for this run: the server is allowed to serve files from this folder only.
    started_outdir = args.outdir or (Path(settings.current.outdir) if settings.current.outdir else None)
    fixed_outputs_root = (started_outdir or args.data_dir / "outputs").resolve()

    def outputs_root() -> Path:
        return fixed_outputs_root

    gallery = GalleryIndex(outputs_root(), cache_file=args.data_dir / "cache" / "gallery-index.json")
    engine = DeferredEngine(args, registry, vae_registry, settings, outputs_root,
                            lambda saved: gallery.add(saved.path, saved.infotext), extensions, lora_registry)
    token_counter = TokenCounter(lambda: embeddings.lookup if (embeddings := engine.embeddings()) else None)
    queue = GenerationQueue(engine, check_request=prompt_length_check(token_counter, settings))
    queue.start()
    model_download = build_model_download(default_model, download_folder, queue) if default_model else None

    def warm_up() -> None:
        # After the server answers: index past outputs, load the tokenizer and the chosen checkpoint.
        gallery.refresh()
        token_counter.warm_up()
        choices = [info.name for info in registry.scan()]
        saved = settings.current.sd_model_checkpoint
        if choices:
            queue.submit(LoadCheckpointRequest(saved if saved in choices else choices[0], settings.current.sd_vae))

    import gradio as gr  # noqa: F401  (imported here: it alone takes seconds)

    from webui.security import API_PREFIXES, AccessGate, GateConfig, access_notice, plan_access
    from webui.ui.blocks import CSS, HEAD, build_ui, theme_head
    from webui.ui.context import UiContext

    # --listen/--share without --gradio-auth: a generated password guards the UI, the API and every other route.
    exposed = is_exposed(args)
    access = plan_access(exposed, credentials, split_credentials(args.api_auth or "", "api_auth"),
                         args.insecure_no_auth, serves_ui=not args.nowebui)
    credentials, api_credentials = list(access.ui_credentials), list(access.api_credentials)
    notice = access_notice(access, " and ".join(flag for flag, on in (("--listen", args.listen),
                                                                       ("--share", args.share)) if on))
    if notice:
        print(notice, file=sys.stderr if access.open_to_anyone else sys.stdout, flush=True)
    port = args.port or (7861 if args.nowebui else 7860)
    share_tunnel = open_share_link(args, port) if args.share else None
    gate = GateConfig(exposed=exposed, ui_credentials=access.ui_credentials, api_credentials=access.api_credentials,
                      api_prefixes=("/",) if args.nowebui else API_PREFIXES,
                      is_tunnel_peer=share_tunnel.owns_connection if share_tunnel is not None else None,
                      pictures_only_under=(str(outputs_root()),))

    context = UiContext(
        queue=queue,
        settings=settings,
        gallery=gallery,
        token_counter=token_counter,
        list_checkpoints=lambda: [info.name for info in registry.scan()],
        loaded_checkpoint=engine.loaded_checkpoint,
        where_to_put_checkpoints=registry.where_to_put_checkpoints(),
        outputs_root=outputs_root,
        list_vaes=vae_registry.choices,
        model_download=model_download,
        extensions=extensions,
        restart=restart_when_idle(queue, share_tunnel.close if share_tunnel is not None else None),
        styles=styles,
        network_cards=build_network_cards(args, registry, lora_registry, styles, engine),
    )
    api_context = build_api_context(args, registry, vae_registry, queue, settings, gallery, engine, outputs_root,
                                    extensions, loras=lora_registry, styles=styles)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    outputs_root().mkdir(parents=True, exist_ok=True)
    if args.nowebui:
        return serve_api_only(args, host, api_context, api_credentials, queue, warm_up, gate, share_tunnel)
    demo = build_ui(context)
    demo.queue(default_concurrency_limit=None)
    if share_tunnel is not None:
        # Our frpc already holds the link: gradio then skips its own tunnel and serves its share page.
        demo.share_url = share_tunnel.url
    from starlette.middleware import Middleware

    app_kwargs: dict[str, object] = {"middleware": [Middleware(AccessGate, config=gate)]}
    if args.api:
        app_kwargs.update(docs_url="/docs", redoc_url=None)
    try:
        app, _, _ = demo.launch(
            server_name=host,
            server_port=port,
            share=share_tunnel is not None,
            auth=credentials or None,
            inbrowser=args.autolaunch,
            prevent_thread_lock=True,
            allowed_paths=[str(outputs_root().resolve())],
            css=CSS,
            head=HEAD + theme_head(args.theme),
            footer_links=["gradio", "settings"],
            show_error=True,
            ssr_mode=False,
            app_kwargs=app_kwargs,
        )
        if args.api:
            mount_api(app, api_context, api_credentials)
        mount_extension_routes(app, extensions, api_credentials)
        mount_preview_route(app, context)
        threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("Stopping.", file=sys.stderr)
    finally:
        if share_tunnel is not None:
            share_tunnel.close()
        demo.close()
        queue.shutdown()
    return 0


def main(argv: list[str]) -> int:
    parser = build_parser(default_data_dir())
    args = parser.parse_args(argv)
    if getattr(args, "share_server", None):
        args.share = True  # naming a share server asks for a share link
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # gradio's HTTP client logs every request it makes to itself at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.command == "txt2img":
            return run_txt2img(args)
        if args.command == "download-model":
            return run_download_model(args)
        return run_app(args)
    except ParamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (LookupError, ValueError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
