"""A1111's /sdapi/v1 facade over the shared queue: txt2img, options, progress, interrupt/skip, model lists, png-info.
Must not import torch, webui.engine or gradio; it translates A1111's JSON to core types and talks to webui.app."""

from __future__ import annotations

import base64
import binascii
import collections
import datetime
import io
import json
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from webui.api import schemas
from webui.api.auth import Caller, caller_of
from webui.api.checkpoints import (
    checkpoint_title,
    could_be_a_hash,
    find_checkpoint,
    model_name_of,
    short_hash_of,
)
from webui.api.context import ApiContext, CheckpointListing
from webui.api.extensions import a1111_extension_list
from webui.api.validation import json_safe, validation_error_response
from webui.app.outputs import SavedImage, encode_image_with_infotext, read_infotext
from webui.app.queue import (
    TXT2IMG_KIND,
    JobSnapshot,
    JobState,
    LoadCheckpointRequest,
    QueueClosedError,
    RefreshEmbeddingsRequest,
    Txt2ImgRequest,
    UnloadCheckpointRequest,
)
from webui.core import samplers
from webui.core.infotext import generation_fields, params_from_infotext, parse_infotext
from webui.core.params import (
    AUTOMATIC_VAE,
    EMPHASIS_MODES,
    NO_VAE,
    OUTPUT_FORMATS,
    RNG_SOURCES,
    ExtensionValues,
    GenerationParams,
    ParamError,
    image_seeds,
)

logger = logging.getLogger(__name__)

PREFIX = "/sdapi/v1"
# A1111's Processed.job_timestamp / state.job_timestamp format.
JOB_TIMESTAMP_FORMAT = "%Y%m%d%H%M%S"
# A1111's state.job for API txt2img (shared.state.begin(job="scripts_txt2img")).
A1111_TXT2IMG_JOB = "scripts_txt2img"
# A1111's /progress adds this so that a job that has just started never reports 0 ("avoid dividing zero").
PROGRESS_OFFSET = 0.01
# A1111's show_progress_every_n_steps default, used when live previews are switched back on.
DEFAULT_PREVIEW_EVERY_N_STEPS = 10
# How many recent jobs keep their start stamp and interrupt/skip marks for /progress.
REMEMBERED_JOBS = 64
# A1111's read_info_from_image drops these PIL info keys from png-info's "items".
IGNORED_INFO_KEYS = frozenset({
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp",
    "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop",
})

# GenerationParams field → the request field a client wrote, for error messages.
_API_FIELD_NAMES: Mapping[str, str] = {
    "sampler": "sampler_name",
    "batch_count": "n_iter",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers",
    "rng_source": "override_settings.randn_source",
    "emphasis": "override_settings.emphasis",
    "output_format": "override_settings.samples_format",
    "checkpoint": "override_settings.sd_model_checkpoint",
}
_PARAM_FIELDS = frozenset(GenerationParams.__dataclass_fields__)
# A1111 1.10 answers an unknown sampler with 400 (404 before); the other bad values are validation errors.
_BAD_REQUEST_FIELDS = frozenset({"sampler_name", "scheduler"})
# A1111's default schedule rho and whether the schedule needs the model's own sigmas (sd_schedulers.py).
_SCHEDULE_RHO: Mapping[str, float] = {"karras": 7.0, "polyexponential": 1.0}
_SCHEDULES_NEEDING_MODEL = frozenset({"uniform", "sgm_uniform"})


# -- errors ------------------------------------------------------------------------------------------------


def a1111_error_response(
    status_code: int, detail: str, error: str = "HTTPException", headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """A1111's api_middleware error body, so clients that print `detail` or `errors` show the reason."""
    errors = f"{status_code}: {detail}" if error == "HTTPException" else detail
    content = {"error": error, "detail": detail, "body": "", "errors": errors}
    return JSONResponse(status_code=status_code, content=content, headers=dict(headers) if headers else None)


class A1111Route(APIRoute):
    """Every failure of a route becomes a JSON answer; bad input never surfaces as a 500.

    Exception handlers belong to the app, which main.py owns; a route class travels with the router.
    Request validation errors keep FastAPI's 422 body shape, as in A1111.
    """

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handle = super().get_route_handler()

        async def handle_with_json_errors(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as error:
                return validation_error_response(error)
            except StarletteHTTPException as error:
                # Starlette's base class: FastAPI raises it too, e.g. 400 for a body that is not UTF-8.
                return a1111_error_response(error.status_code, str(error.detail), headers=error.headers)
            except ParamError as error:
                return a1111_error_response(422, api_param_message(error))
            except Exception as error:  # a bug must answer JSON and leave the worker and the server running
                logger.exception("%s %s failed", request.method, request.url.path)
                return a1111_error_response(500, str(error) or type(error).__name__, error=type(error).__name__)

        return handle_with_json_errors


def api_param_message(error: ParamError) -> str:
    """The ParamError's message with the field spelled as the API request spells it."""
    return f"{_API_FIELD_NAMES.get(error.field, error.field)}: {error.reason}"


def http_error_for(error: ParamError) -> HTTPException:
    field = _API_FIELD_NAMES.get(error.field, error.field)
    status_code = 400 if field in _BAD_REQUEST_FIELDS else 422
    return HTTPException(status_code, f"{field}: {error.reason}")


def http_error_for_failed_job(error_text: str, checkpoint_field: str) -> HTTPException:
    """A failed job's message as an HTTP error: a bad parameter or checkpoint is the client's, the rest ours."""
    field = error_text.split(":", 1)[0].strip()
    if field == "checkpoint":
        return HTTPException(404, f"{checkpoint_field}: {error_text.split(':', 1)[1].strip()}")
    if field in _PARAM_FIELDS:
        return http_error_for(ParamError(field, error_text.split(":", 1)[1].strip()))
    return HTTPException(500, error_text)


# -- checkpoints ---------------------------------------------------------------------------------------------


# -- small conversions ---------------------------------------------------------------------------------------


def _integer_setting(field: str, value: object) -> int:
    # JSON clients send 2, 2.0 or "2" for a slider value; a fraction, a bool or other text is a mistake.
    if isinstance(value, bool):
        raise ParamError(field, f"must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ParamError(field, f"must be an integer, got {value!r}")


def _choice_setting(field: str, value: object, allowed: tuple[str, ...]) -> str:
    if isinstance(value, str):
        for choice in allowed:
            if value.strip().lower() == choice.lower():
                return choice
    raise ParamError(field, f"must be one of {', '.join(allowed)}, got {value!r}")


def encode_png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _normalised_format(image_format: str) -> str:
    lowered = image_format.lower().lstrip(".")
    return "jpg" if lowered == "jpeg" else lowered


def encode_saved_image(saved: SavedImage, image_format: str) -> str:
    """The saved file as plain base64 (A1111's encode_pil_to_base64: no data: prefix), infotext included.

    The file already is the requested format with the infotext embedded, so its bytes are sent as they are;
    a per-request samples_format different from the saved one is re-encoded.
    """
    data = saved.path.read_bytes()
    if _normalised_format(saved.path.suffix) != _normalised_format(image_format):
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            data = encode_image_with_infotext(image, saved.infotext, image_format)
    return base64.b64encode(data).decode("ascii")


def decode_base64_image(text: str) -> Image.Image:
    """A1111's decode_base64_to_image for inline data: base64 with or without a data: prefix."""
    stripped = text.strip()
    if stripped.startswith(("http://", "https://")):
        # Fetching URLs on a client's behalf is an SSRF risk; A1111 guards it, this server does not fetch.
        raise HTTPException(422, "image: URLs are not fetched; send the image as base64")
    if stripped.startswith("data:"):
        stripped = stripped.split(",", 1)[1] if "," in stripped else ""
    try:
        data = base64.b64decode(stripped)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "image: not valid base64") from None
    try:
        return Image.open(io.BytesIO(data))
    except Exception:  # PIL raises several types (UnidentifiedImageError, DecompressionBombError, SyntaxError...)
        raise HTTPException(422, "image: not a readable image (png, jpeg or webp expected)") from None


def _json_safe_items(info: Mapping[object, object]) -> dict[str, Any]:
    items: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(key, str) and key not in IGNORED_INFO_KEYS and key != "parameters":
            if isinstance(value, (str, int, float, bool)):
                items[key] = value
    return items


def _read_meminfo() -> dict[str, int] | None:
    try:
        text = Path("/proc/meminfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024 if parts[1:] == ["kB"] else int(parts[0])
    return values


def ram_usage() -> dict[str, int]:
    """System RAM in bytes, as {free, used, total}; free counts what can be had without swapping."""
    meminfo = _read_meminfo()
    if meminfo and "MemTotal" in meminfo:
        total = meminfo["MemTotal"]
        free = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
        return {"free": free, "used": total - free, "total": total}
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        free = page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return {"free": 0, "used": 0, "total": 0}
    return {"free": free, "used": total - free, "total": total}


def cuda_usage() -> dict[str, Any]:
    """A1111's cuda block, only when the engine in this process has already started CUDA.

    torch is looked up, never imported: this layer must not pull it in, and CUDA is not started
    just to answer a memory query.
    """
    torch_module = sys.modules.get("torch")
    cuda = getattr(torch_module, "cuda", None)
    try:
        if cuda is None or not cuda.is_available() or not cuda.is_initialized():
            return {"error": "no cuda"}
        free, total = cuda.mem_get_info()
        stats = cuda.memory_stats()
    except Exception as error:  # driver and runtime errors come in many types; the answer is "unknown"
        return {"error": str(error) or type(error).__name__}

    def current_and_peak(key: str) -> dict[str, int]:
        return {"current": int(stats.get(f"{key}.all.current", 0)), "peak": int(stats.get(f"{key}.all.peak", 0))}

    return {
        "system": {"free": int(free), "used": int(total - free), "total": int(total)},
        "active": current_and_peak("active_bytes"),
        "allocated": current_and_peak("allocated_bytes"),
        "reserved": current_and_peak("reserved_bytes"),
        "inactive": current_and_peak("inactive_split_bytes"),
        "events": {"retries": int(stats.get("num_alloc_retries", 0)), "oom": int(stats.get("num_ooms", 0))},
    }


def sampler_options(spec: samplers.SamplerSpec) -> dict[str, Any]:
    """A1111's sampler options dict: only the flags that are set, the default schedule by API name."""
    options: dict[str, Any] = {}
    if spec.default_schedule is not None:
        options["scheduler"] = samplers.SCHEDULES[spec.default_schedule].name
    if spec.second_order:
        options["second_order"] = True
    if spec.brownian_noise:
        options["brownian_noise"] = True
    if spec.discard_penultimate_sigma:
        options["discard_next_to_last_sigma"] = True
    if spec.uses_ensd:
        options["uses_ensd"] = True
    return options


# -- per-request settings ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobSettings:
    """What a txt2img request's override_settings (or the current settings) decide for that job only."""

    checkpoint: str | None
    checkpoint_listing: CheckpointListing | None
    clip_skip: int
    rng_source: str
    emphasis: str
    image_format: str
    vae: str


@dataclass(frozen=True, slots=True)
class _UnsupportedFeature:
    """A request field whose use this server cannot honour; refusing beats an image made without it."""

    field: str
    is_used: Callable[[schemas.Txt2ImgApiRequest], bool]
    message: str


_UNSUPPORTED: tuple[_UnsupportedFeature, ...] = (
    _UnsupportedFeature("enable_hr", lambda r: r.enable_hr, "hires fix is not supported by this server"),
    _UnsupportedFeature(
        "restore_faces", lambda r: bool(r.restore_faces), "face restoration is not available (no face restorers)"
    ),
    _UnsupportedFeature("tiling", lambda r: bool(r.tiling), "tiling is not supported by this server"),
    _UnsupportedFeature(
        "subseed_strength", lambda r: r.subseed_strength != 0, "variation seeds are not supported by this server"
    ),
    _UnsupportedFeature(
        "seed_resize_from_w",
        lambda r: r.seed_resize_from_w > 0 and r.seed_resize_from_h > 0,
        "resizing seeds from another size is not supported by this server",
    ),
    _UnsupportedFeature(
        "refiner_checkpoint",
        lambda r: bool(r.refiner_checkpoint) and r.refiner_checkpoint not in ("None", ""),
        "refiner checkpoints are not supported by this server",
    ),
)


class SdapiRoutes:
    """The handlers of /sdapi/v1 with the little state A1111's globals kept (interrupt marks, job stamps)."""

    def __init__(self, context: ApiContext) -> None:
        self.context = context
        self._lock = threading.Lock()
        # job id → A1111 job_timestamp; a job first seen running (e.g. from the UI) gets the time it was seen.
        self._job_timestamps: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._interrupted: collections.OrderedDict[str, None] = collections.OrderedDict()
        # job id → batch index at the time of the skip: A1111's "skipped" lasts for that batch only.
        self._skipped: collections.OrderedDict[str, int] = collections.OrderedDict()
        # The last preview encoded for /progress: polling clients ask far more often than it changes.
        self._preview_cache: tuple[str, int, str] | None = None

    # -- bookkeeping -------------------------------------------------------------------------------------------

    def _remember(self, table: collections.OrderedDict[str, Any], job_id: str, value: Any) -> None:
        with self._lock:
            table[job_id] = value
            table.move_to_end(job_id)
            while len(table) > REMEMBERED_JOBS:
                table.popitem(last=False)

    def _job_timestamp(self, job_id: str) -> str:
        with self._lock:
            stamp = self._job_timestamps.get(job_id)
        if stamp is None:
            stamp = datetime.datetime.now().strftime(JOB_TIMESTAMP_FORMAT)
            self._remember(self._job_timestamps, job_id, stamp)
        return stamp

    # -- checkpoints -------------------------------------------------------------------------------------------

    def selected_checkpoint(self, listings: list[CheckpointListing]) -> CheckpointListing | None:
        """The model plain requests use: the saved choice if it still exists, else the first (as at start-up)."""
        saved = self.context.settings.current.sd_model_checkpoint
        for listing in listings:
            if listing.name == saved:
                return listing
        return listings[0] if listings else None

    def resolve_checkpoint(self, query: object, field: str) -> tuple[str, CheckpointListing | None]:
        """(name for the engine, listing if known); 404 naming `field` when no checkpoint matches."""
        if not isinstance(query, str) or not query.strip():
            raise HTTPException(422, f"{field}: must be a checkpoint title or name, got {query!r}")
        listings = self.context.list_checkpoints()
        listing = find_checkpoint(listings, query, self.context.loaded_checkpoint())
        if listing is not None:
            return listing.name, listing
        if could_be_a_hash(query):
            # A hash of a file never hashed in this process: the engine hashes and decides (404 if no match).
            return query.strip().lower(), None
        available = ", ".join(checkpoint_title(item, None) for item in listings) or "none"
        raise HTTPException(404, f"{field}: no checkpoint matches {query!r} (available: {available})")

    def run_checkpoint_job(self, request: LoadCheckpointRequest | UnloadCheckpointRequest,
                           caller: Caller) -> JobSnapshot:
        snapshot = self.context.queue.wait(self._submit(request, caller))
        if snapshot.state is JobState.FAILED:
            raise http_error_for_failed_job(snapshot.error or "loading failed", "sd_model_checkpoint")
        return snapshot

    def _submit(self, request: Txt2ImgRequest | LoadCheckpointRequest | UnloadCheckpointRequest
                | RefreshEmbeddingsRequest, caller: Caller) -> str:
        try:
            return self.context.queue.submit(request, owner=caller.user)
        except ParamError as error:
            raise http_error_for(error) from None
        except QueueClosedError as error:
            # The queue refuses new work while the server shuts down or restarts (Reload UI).
            raise HTTPException(503, str(error)) from None

    # -- txt2img -----------------------------------------------------------------------------------------------

    def apply_infotext(self, request: schemas.Txt2ImgApiRequest) -> schemas.Txt2ImgApiRequest:
        """A1111 1.8+: fields the request did not set are taken from `infotext`, overrides included."""
        if not request.infotext or not request.infotext.strip():
            return request
        try:
            parsed = parse_infotext(request.infotext)
            values = params_from_infotext(parsed)
        except ParamError as error:
            raise HTTPException(422, f"infotext: {error}") from None
        explicit = request.model_fields_set
        direct = {
            "prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "sampler": "sampler_name",
            "scheduler": "scheduler", "cfg_scale": "cfg_scale", "seed": "seed", "width": "width", "height": "height",
        }
        updates: dict[str, Any] = {
            api_name: values[param_name]
            for param_name, api_name in direct.items()
            if param_name in values and api_name not in explicit
        }
        from_infotext: dict[str, Any] = {}
        for param_name, setting in (("clip_skip", "CLIP_stop_at_last_layers"), ("rng_source", "randn_source"),
                                    ("emphasis", "emphasis")):
            if param_name in values:
                from_infotext[setting] = values[param_name]
        # A1111 switches models only to one it has; an infotext from elsewhere keeps the current model.
        loaded = self.context.loaded_checkpoint()
        listings = self.context.list_checkpoints()
        for key in ("Model hash", "Model"):
            wanted = parsed.fields.get(key)
            listing = find_checkpoint(listings, wanted, loaded) if wanted else None
            if listing is not None:
                from_infotext["sd_model_checkpoint"] = listing.name
                break
        # Like the checkpoint: an infotext's VAE is used only when this server has that file.
        if parsed.fields.get("VAE") in self.vae_choices():
            from_infotext["sd_vae"] = parsed.fields["VAE"]
        updates["override_settings"] = {**from_infotext, **(request.override_settings or {})}
        return request.model_copy(update=updates)

    def job_settings(self, request: schemas.Txt2ImgApiRequest) -> JobSettings:
        overrides = request.override_settings or {}
        current = self.context.settings.current
        if "sd_model_checkpoint" in overrides and overrides["sd_model_checkpoint"] not in (None, ""):
            checkpoint, listing = self.resolve_checkpoint(
                overrides["sd_model_checkpoint"], "override_settings.sd_model_checkpoint"
            )
        else:
            # Named explicitly, so a model loaded for another request's override is never reused by accident.
            listing = self.selected_checkpoint(self.context.list_checkpoints())
            checkpoint = listing.name if listing is not None else None
        clip_skip = _integer_setting(
            "override_settings.CLIP_stop_at_last_layers",
            overrides.get("CLIP_stop_at_last_layers", current.ui_defaults.get("clip_skip", 1)),
        )
        rng_source = "GPU"
        if "randn_source" in overrides:
            rng_source = _choice_setting("override_settings.randn_source", overrides["randn_source"], RNG_SOURCES)
        emphasis = "Original"
        if "emphasis" in overrides:
            emphasis = _choice_setting("override_settings.emphasis", overrides["emphasis"], EMPHASIS_MODES)
        image_format = current.samples_format
        if "samples_format" in overrides:
            image_format = _choice_setting(
                "override_settings.samples_format", overrides["samples_format"], (*OUTPUT_FORMATS, "jpeg")
            )
            image_format = _normalised_format(image_format)
        vae_choices = tuple(self.vae_choices())
        vae = current.sd_vae if current.sd_vae in vae_choices else AUTOMATIC_VAE
        if "sd_vae" in overrides:
            vae = _choice_setting("override_settings.sd_vae", overrides["sd_vae"], vae_choices)
        return JobSettings(checkpoint, listing, clip_skip, rng_source, emphasis, image_format, vae)

    def vae_choices(self) -> list[str]:
        """A1111's sd_vae values: Automatic, None, then each VAE file's name."""
        return [AUTOMATIC_VAE, NO_VAE, *(name for name, _ in self.context.list_vae_files())]

    def check_supported(self, request: schemas.Txt2ImgApiRequest) -> None:
        for feature in _UNSUPPORTED:
            if feature.is_used(request):
                raise HTTPException(422, f"{feature.field}: {feature.message}")
        if request.script_name:
            # A1111 answers 422 "Script '...' not found"; this server has no scripts.
            raise HTTPException(422, f"script_name: script {request.script_name!r} not found")

    def extension_values(self, request: schemas.Txt2ImgApiRequest) -> ExtensionValues:
        """alwayson_scripts mapped onto the enabled extensions' controls (args in order, or named)."""
        if not request.alwayson_scripts:
            return ()
        if self.context.extensions is None:
            name = next(iter(request.alwayson_scripts))
            raise HTTPException(422, f"alwayson_scripts: always on script {name!r} not found")
        try:
            return self.context.extensions.values_from_alwayson(request.alwayson_scripts)
        except ParamError as error:
            raise HTTPException(422, f"{error.field}: {error.reason}") from None

    def generation_params(self, request: schemas.Txt2ImgApiRequest, settings: JobSettings) -> GenerationParams:
        sampler_name = request.sampler_name or request.sampler_index
        scheduler = request.scheduler or samplers.DEFAULT_SCHEDULE
        try:
            sampler, schedule = samplers.split_sampler_and_schedule(sampler_name, scheduler)
        except samplers.UnknownSamplerError as error:
            field = "sampler_name" if error.field == "sampler" else error.field
            raise HTTPException(400, f"{field}: {error.reason}") from None
        prompt, negative_prompt = self.styled_prompts(request)
        return GenerationParams(
            prompt=prompt,
            negative_prompt=negative_prompt,
            checkpoint=settings.checkpoint,
            sampler=sampler.name,
            scheduler=schedule.label,
            steps=request.steps,
            cfg_scale=request.cfg_scale,
            seed=request.seed,
            width=request.width,
            height=request.height,
            clip_skip=settings.clip_skip,
            batch_size=request.batch_size,
            batch_count=request.n_iter,
            rng_source=settings.rng_source,
            emphasis=settings.emphasis,
            output_format=settings.image_format,
            vae=settings.vae,
            extensions=self.extension_values(request),
        )

    def styled_prompts(self, request: schemas.Txt2ImgApiRequest) -> tuple[str, str]:
        """The prompts with the request's `styles` applied in order (A1111 does it before anything reads the
        prompts); unknown names are ignored, as in A1111."""
        if not request.styles or self.context.styles is None:
            return request.prompt, request.negative_prompt
        return self.context.styles.apply(request.prompt, request.negative_prompt, request.styles)

    def refresh_embeddings(self, caller: Caller) -> None:
        """A1111 reloads under the queue lock: here a job, so the model's worker thread does it between jobs."""
        snapshot = self.context.queue.wait(self._submit(RefreshEmbeddingsRequest(), caller))
        if snapshot.state is JobState.FAILED:
            raise HTTPException(500, f"refresh-embeddings: {snapshot.error or 'failed'}")

    def txt2img(self, request: schemas.Txt2ImgApiRequest, caller: Caller) -> dict[str, Any]:
        request = self.apply_infotext(request)
        self.check_supported(request)
        settings = self.job_settings(request)
        params = self.generation_params(request, settings)
        timestamp = datetime.datetime.now().strftime(JOB_TIMESTAMP_FORMAT)
        job_id = self._submit(Txt2ImgRequest(params, save=request.save_images), caller)
        self._remember(self._job_timestamps, job_id, timestamp)
        snapshot = self.context.queue.wait(job_id)
        try:
            if snapshot.state is JobState.FAILED:
                raise http_error_for_failed_job(
                    snapshot.error or "generation failed", "override_settings.sd_model_checkpoint"
                )
            images = (
                [encode_saved_image(saved, settings.image_format) for saved in snapshot.images]
                if request.send_images else []
            )
        finally:
            if not request.save_images:
                # A1111's API saves nothing unless asked; the runner wrote these to a scratch folder for us.
                for saved in snapshot.images:
                    saved.path.unlink(missing_ok=True)
        info = self.processed_info(request, params, settings, snapshot, timestamp)
        return {
            "images": images,
            "parameters": json_safe(request.model_dump()),
            "info": json.dumps(info),
        }

    def processed_info(
        self,
        request: schemas.Txt2ImgApiRequest,
        params: GenerationParams,
        settings: JobSettings,
        snapshot: JobSnapshot,
        timestamp: str,
    ) -> dict[str, Any]:
        """A1111's Processed.js() keys, from the job and the infotexts actually written."""
        first_seed = snapshot.first_seed if snapshot.first_seed is not None else params.seed
        seeds = image_seeds(first_seed, params.image_count)
        subseed = request.subseed if request.subseed != -1 else first_seed
        infotexts = [saved.infotext for saved in snapshot.images]
        model_name: str | None = settings.checkpoint_listing.stem if settings.checkpoint_listing else None
        model_hash: str | None = (
            short_hash_of(settings.checkpoint_listing, self.context.loaded_checkpoint())
            if settings.checkpoint_listing else None
        )
        if infotexts:
            written = parse_infotext(infotexts[0]).fields
            model_name = written.get("Model", model_name)
            model_hash = written.get("Model hash", model_hash)
            vae_name, vae_hash = written.get("VAE"), written.get("VAE hash")
        else:
            vae_name = vae_hash = None
        sampler, _schedule = params.sampler_and_schedule()
        extra = {
            key: value
            for key, value in generation_fields(params, first_seed, None, None, "").items()
            if key in ("Schedule type", "Emphasis") and value is not None
        }
        return {
            # A1111's Processed keeps p.prompt (before styles) here and the styled prompts in all_prompts.
            "prompt": request.prompt,
            "all_prompts": [params.prompt] * len(seeds),
            "negative_prompt": request.negative_prompt,
            "all_negative_prompts": [params.negative_prompt] * len(seeds),
            "seed": first_seed,
            "all_seeds": seeds,
            "subseed": subseed,
            "all_subseeds": [subseed + index for index in range(len(seeds))],
            "subseed_strength": request.subseed_strength,
            "width": params.width,
            "height": params.height,
            "sampler_name": sampler.name,
            "cfg_scale": params.cfg_scale,
            "steps": params.steps,
            "batch_size": params.batch_size,
            "restore_faces": bool(request.restore_faces),
            "face_restoration_model": None,
            "sd_model_name": model_name,
            "sd_model_hash": model_hash,
            "sd_vae_name": vae_name,
            "sd_vae_hash": vae_hash,
            "seed_resize_from_w": request.seed_resize_from_w,
            "seed_resize_from_h": request.seed_resize_from_h,
            "denoising_strength": request.denoising_strength,
            "extra_generation_params": extra,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": list(request.styles or []),
            "job_timestamp": timestamp,
            "clip_skip": params.clip_skip,
            "is_using_inpainting_conditioning": False,
            "version": self.context.version,
            # A1111 shows these under the gallery (Processed.comments); its js() leaves them out, a script can use them.
            "comments": "\n".join(snapshot.warnings),
        }

    # -- options -----------------------------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        """A1111's option keys this server has, then its own settings under their config.json names."""
        current = self.context.settings.current
        loaded = self.context.loaded_checkpoint()
        selected = self.selected_checkpoint(self.context.list_checkpoints())
        preview_every = current.preview_every_n_steps
        return {
            "sd_model_checkpoint": checkpoint_title(selected, loaded) if selected is not None else None,
            "sd_checkpoint_hash": (selected.sha256 if selected is not None else None) or "",
            "sd_vae": current.sd_vae,
            "CLIP_stop_at_last_layers": current.ui_defaults.get("clip_skip", 1),
            "samples_format": current.samples_format,
            "samples_filename_pattern": current.filename_pattern,
            "outdir_samples": current.outdir,
            # A1111's -1 ("only at the end of a batch") is the nearest to our 0 (no live previews).
            "show_progress_every_n_steps": preview_every if preview_every > 0 else -1,
            "live_previews_enable": preview_every > 0,
            "outdir": current.outdir,
            "filename_pattern": current.filename_pattern,
            "preview_every_n_steps": preview_every,
            "max_prompt_chunks": current.max_prompt_chunks,
            "ui_defaults": dict(current.ui_defaults),
        }

    def set_options(self, body: Mapping[str, Any], caller: Caller) -> None:
        """Apply what changed compared with GET /options; A1111 clients post the whole dict back."""
        current = self.options()
        changed = {key: value for key, value in body.items() if key in current and current[key] != value}
        checkpoint: tuple[str, CheckpointListing | None] | None = None
        if "sd_model_checkpoint" in changed:
            # Checked before anything is written, so an unknown model changes nothing.
            checkpoint = self.resolve_checkpoint(changed.pop("sd_model_checkpoint"), "sd_model_checkpoint")
        updates: dict[str, object] = {}
        # settings key → the key the client posted, to name it in errors.
        posted_as: dict[str, str] = {}
        ui_defaults: dict[str, object] = {}
        for key, value in changed.items():
            if key in ("outdir", "outdir_samples"):
                # Like A1111's restrict_api options: where files are written is not for API clients to change.
                logger.warning("POST /sdapi/v1/options: %s is not changed through the API", key)
            elif key == "CLIP_stop_at_last_layers":
                ui_defaults["clip_skip"] = value
                posted_as["ui_defaults.clip_skip"] = key
            elif key == "ui_defaults" and isinstance(value, Mapping):
                ui_defaults.update(value)
            elif key in ("samples_format", "ui_defaults"):
                updates[key] = value
            elif key in ("samples_filename_pattern", "filename_pattern"):
                updates["filename_pattern"] = value
                posted_as["filename_pattern"] = key
            elif key == "show_progress_every_n_steps":
                updates["preview_every_n_steps"] = self._preview_steps_from_a1111(value)
                posted_as["preview_every_n_steps"] = key
            elif key in ("preview_every_n_steps", "max_prompt_chunks"):
                updates[key] = value
            elif key == "sd_vae":
                updates[key] = _choice_setting("sd_vae", value, tuple(self.vae_choices()))
            elif key == "live_previews_enable" and "show_progress_every_n_steps" not in changed:
                if value is False:
                    updates["preview_every_n_steps"] = 0
                elif value is True and current["preview_every_n_steps"] == 0:
                    updates["preview_every_n_steps"] = DEFAULT_PREVIEW_EVERY_N_STEPS
                posted_as["preview_every_n_steps"] = key
            # Other keys (sd_checkpoint_hash) are read-only here and ignored, as A1111 ignores unknown ones.
        if ui_defaults:
            updates["ui_defaults"] = ui_defaults
        if updates:
            try:
                self.context.settings.update(updates)
            except ParamError as error:
                field = posted_as.get(error.field, error.field)
                raise HTTPException(422, f"{field}: {error.reason}") from None
        if checkpoint is not None:
            name, listing = checkpoint
            self.run_checkpoint_job(LoadCheckpointRequest(name), caller)
            loaded = self.context.loaded_checkpoint()
            # A bare hash is saved as the name of the model it loaded, so the choice survives a restart.
            saved_name = listing.name if listing is not None else (loaded[0] if loaded is not None else name)
            self.context.settings.update({"sd_model_checkpoint": saved_name})

    @staticmethod
    def _preview_steps_from_a1111(value: object) -> object:
        # A1111: -1 = only at the end of a batch (nearest here: no live previews), 0 = on every poll.
        if isinstance(value, int) and not isinstance(value, bool):
            if value == -1:
                return 0
            if value == 0:
                return 1
        return value

    # -- progress ----------------------------------------------------------------------------------------------

    def progress(self, skip_current_image: bool, caller: Caller) -> schemas.ProgressResponse:
        """A1111's state of the caller's current job; another user's job is never shown (idle instead)."""
        running = self.context.queue.current_job(caller.jobs_of)
        if running is None:
            return schemas.ProgressResponse(progress=0, eta_relative=0, state=schemas.ProgressState())
        if running.state is JobState.QUEUED:
            # Waiting behind other jobs: A1111 has no queue, so its idle state with our queue line.
            return schemas.ProgressResponse(progress=0, eta_relative=0, state=schemas.ProgressState(),
                                            textinfo=running.message, current_task=running.job_id)
        progress = running.progress
        job_count = progress.batch_count if progress is not None else 1
        job_no = progress.batch_index if progress is not None else 0
        step = progress.step if progress is not None else 0
        steps = progress.total_steps if progress is not None else 0
        fraction = PROGRESS_OFFSET + job_no / max(job_count, 1)
        if steps > 0:
            fraction += step / steps / max(job_count, 1)
        with self._lock:
            interrupted = running.job_id in self._interrupted
            skipped = self._skipped.get(running.job_id) == job_no
        state = schemas.ProgressState(
            skipped=skipped,
            interrupted=interrupted,
            job=A1111_TXT2IMG_JOB if running.kind == TXT2IMG_KIND else running.kind,
            job_count=job_count,
            job_timestamp=self._job_timestamp(running.job_id),
            job_no=job_no,
            sampling_step=step,
            sampling_steps=steps,
        )
        current_image = None if skip_current_image else self._preview_base64(running)
        return schemas.ProgressResponse(
            progress=min(fraction, 1.0),
            eta_relative=running.eta_seconds if running.eta_seconds is not None else 0.0,
            state=state,
            current_image=current_image,
            textinfo=running.message,
            current_task=running.job_id,
        )

    def _preview_base64(self, running: JobSnapshot) -> str | None:
        if running.preview is None:
            return None
        with self._lock:
            cached = self._preview_cache
        if cached is not None and cached[:2] == (running.job_id, running.preview_version):
            return cached[2]
        encoded = encode_png_base64(running.preview)
        with self._lock:
            self._preview_cache = (running.job_id, running.preview_version, encoded)
        return encoded

    def interrupt(self, caller: Caller) -> None:
        """A1111's no-argument interrupt: the caller's current job (anyone's for the admin or without a login)."""
        current = self.context.queue.current_job(caller.jobs_of)
        if current is not None and self.context.queue.interrupt(current.job_id):
            self._remember(self._interrupted, current.job_id, None)

    def skip(self, caller: Caller) -> None:
        running = self.context.queue.current_job(caller.jobs_of)
        if running is not None and self.context.queue.skip(running.job_id):
            batch_index = running.progress.batch_index if running.progress is not None else 0
            self._remember(self._skipped, running.job_id, batch_index)

    # -- lists -------------------------------------------------------------------------------------------------

    def sd_models(self) -> list[schemas.SdModelItem]:
        loaded = self.context.loaded_checkpoint()
        return [
            schemas.SdModelItem(
                title=checkpoint_title(listing, loaded),
                model_name=model_name_of(listing),
                hash=short_hash_of(listing, loaded),
                sha256=listing.sha256,
                filename=listing.filename,
                config=None,
            )
            for listing in self.context.list_checkpoints()
        ]

    def reload_checkpoint(self, caller: Caller) -> None:
        selected = self.selected_checkpoint(self.context.list_checkpoints())
        if selected is None:
            raise HTTPException(404, "sd_model_checkpoint: no checkpoint found in the model folders")
        self.run_checkpoint_job(LoadCheckpointRequest(selected.name), caller)

    def png_info(self, request: schemas.PngInfoRequest) -> dict[str, Any]:
        if not request.image.strip():
            return {"info": "", "items": {}, "parameters": {}}
        with decode_base64_image(request.image) as image:
            infotext = read_infotext(image) or ""
            items = _json_safe_items(image.info)
        parsed = parse_infotext(infotext)
        parameters: dict[str, Any] = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt}
        parameters.update(parsed.fields)
        return {"info": infotext, "items": items, "parameters": parameters}


def build_sdapi_router(context: ApiContext) -> APIRouter:
    """The /sdapi/v1 routes over `context`; main.py adds authentication when it includes the router."""
    routes = SdapiRoutes(context)
    router = APIRouter(prefix=PREFIX, tags=["sdapi"], route_class=A1111Route)

    # Long-running handlers are plain functions (FastAPI runs them in its thread pool); quick ones that
    # clients poll during a job are async, so they answer even while every pool thread waits on a job.

    @router.post("/txt2img", response_model=schemas.TextToImageResponse)
    def txt2img(request: schemas.Txt2ImgApiRequest, http: Request) -> dict[str, Any]:
        return routes.txt2img(request, caller_of(http))

    @router.get("/progress", response_model=schemas.ProgressResponse)
    async def progress(http: Request, skip_current_image: bool = Query(False)) -> schemas.ProgressResponse:  # noqa: B008
        return routes.progress(skip_current_image, caller_of(http))

    @router.post("/interrupt")
    async def interrupt(http: Request) -> dict[str, Any]:
        routes.interrupt(caller_of(http))
        return {}

    @router.post("/skip")
    async def skip(http: Request) -> dict[str, Any]:
        routes.skip(caller_of(http))
        return {}

    @router.get("/options")
    def get_options() -> dict[str, Any]:
        return routes.options()

    @router.post("/options")
    def set_options(http: Request, body: dict[str, Any] = Body(...)) -> None:  # noqa: B008
        routes.set_options(body, caller_of(http))

    @router.get("/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        return dict(context.cmd_flags)

    @router.get("/sd-models", response_model=list[schemas.SdModelItem])
    def sd_models() -> list[schemas.SdModelItem]:
        return routes.sd_models()

    @router.get("/samplers", response_model=list[schemas.SamplerItem])
    def sampler_list() -> list[schemas.SamplerItem]:
        return [
            schemas.SamplerItem(name=spec.name, aliases=list(spec.aliases), options=sampler_options(spec))
            for spec in samplers.SAMPLERS.values()
        ]

    @router.get("/schedulers", response_model=list[schemas.SchedulerItem])
    def scheduler_list() -> list[schemas.SchedulerItem]:
        return [
            schemas.SchedulerItem(
                name=spec.name,
                label=spec.label,
                aliases=list(spec.aliases) or None,
                default_rho=_SCHEDULE_RHO.get(spec.name, -1.0),
                need_inner_model=spec.name in _SCHEDULES_NEEDING_MODEL,
            )
            for spec in samplers.SCHEDULES.values()
        ]

    # Lists of things this server does not have; A1111 clients read them at start-up and expect lists.
    @router.get("/sd-vae", response_model=list[schemas.VaeItem])
    def sd_vae() -> list[schemas.VaeItem]:
        return [schemas.VaeItem(model_name=name, filename=path) for name, path in context.list_vae_files()]

    for empty_list_path in ("/upscalers", "/latent-upscale-modes", "/face-restorers",
                            "/realesrgan-models", "/hypernetworks"):
        router.add_api_route(empty_list_path, _empty_list, methods=["GET"], name=empty_list_path.strip("/"))

    @router.get("/embeddings", response_model=schemas.EmbeddingsResponse)
    def embeddings() -> schemas.EmbeddingsResponse:
        listing = context.list_embeddings()

        def items(entries: Mapping[str, Any]) -> dict[str, schemas.EmbeddingItem]:
            return {name: schemas.EmbeddingItem(step=entry.step, sd_checkpoint=entry.sd_checkpoint,
                                                sd_checkpoint_name=entry.sd_checkpoint_name, shape=entry.shape,
                                                vectors=entry.vectors)
                    for name, entry in entries.items()}

        return schemas.EmbeddingsResponse(loaded=items(listing.loaded), skipped=items(listing.skipped))

    @router.post("/refresh-embeddings")
    def refresh_embeddings(http: Request) -> None:
        routes.refresh_embeddings(caller_of(http))

    @router.get("/loras", response_model=list[schemas.LoraItem])
    def loras() -> list[schemas.LoraItem]:
        return [schemas.LoraItem(name=item.name, alias=item.alias, path=item.path, metadata=dict(item.metadata))
                for item in context.list_loras()]

    @router.post("/refresh-loras")
    def refresh_loras() -> None:
        context.refresh_loras()

    @router.get("/prompt-styles", response_model=list[schemas.PromptStyleItem])
    def prompt_styles() -> list[schemas.PromptStyleItem]:
        if context.styles is None:
            return []
        return [schemas.PromptStyleItem(name=style.name, prompt=style.prompt, negative_prompt=style.negative_prompt)
                for style in context.styles.styles()]

    @router.get("/scripts", response_model=schemas.ScriptsList)
    def scripts() -> schemas.ScriptsList:
        titles = [entry["name"] for entry in context.extensions.script_info()] if context.extensions else []
        return schemas.ScriptsList(txt2img=titles, img2img=[])

    @router.get("/script-info")
    def script_info() -> list[dict[str, Any]]:
        return context.extensions.script_info() if context.extensions else []

    @router.get("/extensions")
    def extensions() -> list[dict[str, Any]]:
        return a1111_extension_list(context.extensions) if context.extensions else []

    @router.get("/memory")
    def memory() -> dict[str, Any]:
        return {"ram": ram_usage(), "cuda": cuda_usage()}

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        # The listing is read from the model folders on every call; reading it once here is the refresh.
        context.list_checkpoints()

    for nothing_to_refresh in ("/refresh-vae",):
        router.add_api_route(nothing_to_refresh, _nothing, methods=["POST"], name=nothing_to_refresh.strip("/"))

    @router.post("/reload-checkpoint")
    def reload_checkpoint(http: Request) -> dict[str, Any]:
        routes.reload_checkpoint(caller_of(http))
        return {}

    @router.post("/unload-checkpoint")
    def unload_checkpoint(http: Request) -> dict[str, Any]:
        routes.run_checkpoint_job(UnloadCheckpointRequest(), caller_of(http))
        return {}

    @router.post("/png-info", response_model=schemas.PngInfoResponse)
    def png_info(request: schemas.PngInfoRequest) -> dict[str, Any]:
        return routes.png_info(request)

    return router


def _empty_list() -> list[Any]:
    return []


def _nothing() -> None:
    return None
