"""The native job API under /api/v1: submit, watch, preview and cancel jobs; models; the outputs gallery and its files.
Must not import torch, webui.engine or gradio; it speaks only to webui.app and webui.core through the ApiContext."""

from __future__ import annotations

import io
import math
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from webui.api.auth import Caller, caller_of
from webui.api.checkpoints import could_be_a_hash, find_checkpoint
from webui.api.context import ApiContext, CheckpointListing
from webui.api.validation import JsonErrorRoute, Name, NonEmptyName, PromptText
from webui.app.queue import JobSnapshot, JobState, LoadCheckpointRequest, QueueClosedError, Txt2ImgRequest
from webui.core.infotext import parse_infotext
from webui.core.params import (
    EMPHASIS_MODES,
    FLOAT_LIMITS,
    INT_LIMITS,
    OUTPUT_FORMATS,
    RNG_SOURCES,
    GenerationParams,
    ParamError,
)

API_PREFIX = "/api/v1"
OUTPUT_FILE_ROUTE = f"{API_PREFIX}/outputs/file"
# The outputs folder holds images only; serving nothing else keeps caches or stray files private.
SERVABLE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
# A cancelled job stops within one sampler step; waiting this long lets DELETE report the final state.
CANCEL_WAIT_SECONDS = 5.0
DEFAULT_LOAD_TIMEOUT_SECONDS = 120.0
MAX_LOAD_TIMEOUT_SECONDS = 600.0
MAX_GALLERY_PAGE_SIZE = 200
NOT_FOUND_RESPONSE = {"description": "No such job, checkpoint or file"}
_DEFAULTS = GenerationParams()


def _int_field(name: str, default: int, description: str) -> Any:
    limit = INT_LIMITS[name]
    multiple_of = limit.multiple_of if limit.multiple_of > 1 else None
    # strict: a JSON 1.5 or "20" is a client bug worth a 422, not a silent conversion.
    return Field(default, ge=limit.low, le=limit.high, multiple_of=multiple_of, strict=True, description=description)


def _float_field(name: str, default: float, description: str) -> Any:
    limit = FLOAT_LIMITS[name]
    # Python's json accepts NaN and Infinity, which would compare false against every limit.
    return Field(default, ge=limit.low, le=limit.high, allow_inf_nan=False, strict=True, description=description)


class JobCreateRequest(BaseModel):
    """A txt2img job: GenerationParams' fields and defaults; the limits are declared so /openapi.json shows them."""

    model_config = ConfigDict(extra="forbid")

    prompt: PromptText = Field(_DEFAULTS.prompt, description="Positive prompt, A1111 syntax")
    negative_prompt: PromptText = Field(_DEFAULTS.negative_prompt, description="Negative prompt")
    checkpoint: Name | None = Field(
        _DEFAULTS.checkpoint, description="Checkpoint name, stem or short hash; null keeps the loaded model"
    )
    sampler: NonEmptyName = Field(_DEFAULTS.sampler, description="A1111 sampler name, e.g. 'Euler a'")
    scheduler: NonEmptyName = Field(_DEFAULTS.scheduler, description="A1111 schedule type, e.g. 'Karras'")
    steps: int = _int_field("steps", _DEFAULTS.steps, "Sampling steps")
    cfg_scale: float = _float_field("cfg_scale", _DEFAULTS.cfg_scale, "Classifier-free guidance scale")
    seed: int = _int_field("seed", _DEFAULTS.seed, "Seed; -1 draws a random one")
    width: int = _int_field("width", _DEFAULTS.width, "Image width in pixels")
    height: int = _int_field("height", _DEFAULTS.height, "Image height in pixels")
    clip_skip: int = _int_field("clip_skip", _DEFAULTS.clip_skip, "CLIP layers to skip")
    batch_size: int = _int_field("batch_size", _DEFAULTS.batch_size, "Images per batch")
    batch_count: int = _int_field("batch_count", _DEFAULTS.batch_count, "Batches, run one after another")
    rng_source: Literal[RNG_SOURCES] = Field(_DEFAULTS.rng_source, description="Noise source")
    emphasis: Literal[EMPHASIS_MODES] = Field(_DEFAULTS.emphasis, description="Attention emphasis mode")
    output_format: Literal[OUTPUT_FORMATS] = Field(
        _DEFAULTS.output_format, description="Requested file format (the samples_format setting decides on save)"
    )

    def to_params(self) -> GenerationParams:
        values = self.model_dump()
        # Forms and scripts send "" for "not chosen"; it means the same as null, not a checkpoint named "".
        if values["checkpoint"] is not None and not values["checkpoint"].strip():
            values["checkpoint"] = None
        return GenerationParams(**values)


class JobCreated(BaseModel):
    job_id: str
    seed: int = Field(description="The job's first seed, already drawn when -1 was asked for")


class JobImage(BaseModel):
    url: str | None = Field(description="Download URL, null if the file lies outside the outputs folder")
    infotext: str
    seed: int | None


class JobStatus(BaseModel):
    job_id: str
    kind: str = Field(description="txt2img, load_checkpoint or unload_checkpoint")
    state: JobState
    ahead: int = Field(description="Jobs that run before this one, the running one included")
    progress: float = Field(ge=0.0, le=1.0)
    step: int | None
    total_steps: int | None
    batch_index: int | None
    batch_count: int | None
    eta_seconds: float | None
    message: str
    error: str | None
    seed: int | None
    preview_url: str | None
    images: list[JobImage]


class JobCancelled(BaseModel):
    job_id: str
    state: JobState


class ModelEntry(BaseModel):
    name: str = Field(description="Path inside its model folder, as requests name it")
    title: str = Field(description="A1111's title: name plus [short hash] once the hash is known")
    stem: str
    sha256: str | None = Field(description="Known only after the file has been hashed (at its first load)")
    hash: str | None = Field(description="A1111's 10-character short hash, when known")
    loaded: bool


class LoadModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: NonEmptyName = Field(description="Name, name without extension, stem or short hash")


class LoadModelResult(BaseModel):
    loaded: str | None = Field(description="The loaded checkpoint's name; null while the load is still queued")
    hash: str | None
    job_id: str
    state: JobState


class GalleryImage(BaseModel):
    url: str | None
    day: str
    prompt: str
    model: str | None
    infotext: str | None


class GalleryPageResult(BaseModel):
    page: int
    page_count: int
    total: int
    images: list[GalleryImage]


def _validation_error(field: str, message: str) -> HTTPException:
    # Same shape as FastAPI's own 422s, so clients parse one format for type and limit errors alike.
    return HTTPException(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}],
    )


def _seed_of(infotext: str) -> int | None:
    try:
        return int(parse_infotext(infotext).fields["Seed"])
    except (KeyError, ValueError):
        return None


def _progress_fraction(snapshot: JobSnapshot) -> float:
    if snapshot.state is JobState.DONE:
        return 1.0
    if snapshot.progress is None:
        return 0.0
    fraction = snapshot.progress.fraction
    return min(max(fraction, 0.0), 1.0) if math.isfinite(fraction) else 0.0


def build_jobs_router(context: ApiContext) -> APIRouter:
    """The /api/v1 routes over the shared queue, gallery and model listing."""
    router = APIRouter(prefix=API_PREFIX, tags=["jobs"], route_class=JsonErrorRoute)

    def outputs_root() -> Path:
        return context.outputs_root().resolve()

    def file_url(path: Path) -> str | None:
        root = outputs_root()
        try:
            relative = path.relative_to(root)
        except ValueError:
            try:
                relative = path.resolve().relative_to(root)
            except (ValueError, OSError):
                return None
        return f"{OUTPUT_FILE_ROUTE}?path={quote(relative.as_posix(), safe='/')}"

    def snapshot_or_404(job_id: str, caller: Caller) -> JobSnapshot:
        """The job if this caller may see it; another user's job is as unknown as one that never existed."""
        try:
            snapshot = context.queue.snapshot(job_id)
        except KeyError:
            snapshot = None
        if snapshot is None or not caller.may_act_on(snapshot.owner):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id!r} not found")
        return snapshot

    def job_status(snapshot: JobSnapshot) -> JobStatus:
        progress = snapshot.progress
        preview_url = None
        if snapshot.preview is not None:
            # The version makes each new preview a new URL, so browsers never show a cached older one.
            preview_url = f"{API_PREFIX}/jobs/{quote(snapshot.job_id, safe='')}/preview?v={snapshot.preview_version}"
        return JobStatus(
            job_id=snapshot.job_id,
            kind=snapshot.kind,
            state=snapshot.state,
            ahead=snapshot.ahead,
            progress=_progress_fraction(snapshot),
            step=progress.step if progress else None,
            total_steps=progress.total_steps if progress else None,
            batch_index=progress.batch_index if progress else None,
            batch_count=progress.batch_count if progress else None,
            eta_seconds=snapshot.eta_seconds,
            message=snapshot.message,
            error=snapshot.error,
            seed=snapshot.first_seed,
            preview_url=preview_url,
            images=[
                JobImage(url=file_url(saved.path), infotext=saved.infotext, seed=_seed_of(saved.infotext))
                for saved in snapshot.images
            ],
        )

    # -- jobs --------------------------------------------------------------------------------------------------

    @router.post(
        "/jobs", status_code=status.HTTP_202_ACCEPTED, response_model=JobCreated,
        summary="Queue a txt2img job",
    )
    def create_job(body: JobCreateRequest, request: Request, response: Response) -> JobCreated:
        try:
            job_id = context.queue.submit(Txt2ImgRequest(body.to_params()), owner=caller_of(request).user)
        except ParamError as error:
            raise _validation_error(error.field, str(error)) from None
        except QueueClosedError as error:
            # The server is shutting down or restarting (Reload UI).
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(error)) from None
        response.headers["Location"] = f"{API_PREFIX}/jobs/{job_id}"
        seed = context.queue.snapshot(job_id).first_seed
        assert seed is not None  # the queue resolves a txt2img seed at submit
        return JobCreated(job_id=job_id, seed=seed)

    @router.get("/jobs/{job_id}", response_model=JobStatus, responses={404: NOT_FOUND_RESPONSE}, summary="A job")
    def get_job(job_id: str, request: Request) -> JobStatus:
        return job_status(snapshot_or_404(job_id, caller_of(request)))

    @router.get(
        "/jobs/{job_id}/preview",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "The latest live preview"},
            404: NOT_FOUND_RESPONSE,
        },
        summary="A running job's live preview",
    )
    def get_preview(job_id: str, request: Request) -> Response:
        snapshot = snapshot_or_404(job_id, caller_of(request))
        if snapshot.preview is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id!r} has no preview")
        buffer = io.BytesIO()
        snapshot.preview.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png", headers={"Cache-Control": "no-store"})

    @router.delete(
        "/jobs/{job_id}", response_model=JobCancelled, responses={404: NOT_FOUND_RESPONSE}, summary="Cancel a job",
    )
    def cancel_job(job_id: str, request: Request) -> JobCancelled:
        caller = caller_of(request)
        snapshot_or_404(job_id, caller)
        # False only for a job that has already finished: cancelling it again is a no-op, not an error.
        if context.queue.interrupt(job_id):
            snapshot = context.queue.wait(job_id, timeout=CANCEL_WAIT_SECONDS)
        else:
            snapshot = snapshot_or_404(job_id, caller)
        return JobCancelled(job_id=job_id, state=snapshot.state)

    # -- models ------------------------------------------------------------------------------------------------

    def find_listed_checkpoint(query: str) -> CheckpointListing | None:
        return find_checkpoint(context.list_checkpoints(), query, context.loaded_checkpoint())

    @router.get("/models", response_model=list[ModelEntry], summary="Checkpoints in the model folders")
    def list_models() -> list[ModelEntry]:
        loaded = context.loaded_checkpoint()
        entries = []
        for listing in context.list_checkpoints():
            short_hash = listing.sha256[:10] if listing.sha256 else None
            entries.append(ModelEntry(
                name=listing.name,
                title=f"{listing.name} [{short_hash}]" if short_hash else listing.name,
                stem=listing.stem,
                sha256=listing.sha256,
                hash=short_hash,
                loaded=loaded is not None and loaded[0] == listing.name,
            ))
        return entries

    @router.post(
        "/models/load",
        response_model=LoadModelResult,
        responses={
            202: {"model": LoadModelResult, "description": "Still queued or loading when the timeout passed"},
            404: NOT_FOUND_RESPONSE,
            409: {"description": "The load was cancelled"},
            422: {"description": "The checkpoint could not be loaded"},
        },
        summary="Load a checkpoint (queued behind earlier jobs) and wait for it",
    )
    def load_model(
        body: LoadModelRequest,
        request: Request,
        timeout: Annotated[
            float, Query(ge=1.0, le=MAX_LOAD_TIMEOUT_SECONDS, allow_inf_nan=False, description="Seconds to wait")
        ] = DEFAULT_LOAD_TIMEOUT_SECONDS,
    ) -> LoadModelResult | JSONResponse:
        listing = find_listed_checkpoint(body.checkpoint)
        if listing is None and not could_be_a_hash(body.checkpoint):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"checkpoint {body.checkpoint!r} not found")
        # A hash not yet computed can only be checked by hashing the files, which the worker does.
        wanted = listing.name if listing is not None else body.checkpoint.strip()
        try:
            job_id = context.queue.submit(LoadCheckpointRequest(wanted), owner=caller_of(request).user)
        except ParamError as error:
            raise _validation_error(error.field, str(error)) from None
        except QueueClosedError as error:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(error)) from None
        snapshot = context.queue.wait(job_id, timeout=timeout)
        if not snapshot.finished:
            pending = LoadModelResult(loaded=None, hash=None, job_id=job_id, state=snapshot.state)
            return JSONResponse(pending.model_dump(mode="json"), status_code=status.HTTP_202_ACCEPTED)
        if snapshot.state is JobState.INTERRUPTED:
            raise HTTPException(status.HTTP_409_CONFLICT, f"loading {wanted!r} was cancelled")
        if snapshot.state is JobState.FAILED:
            if listing is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"checkpoint {body.checkpoint!r} not found")
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, snapshot.error or f"could not load {wanted!r}")
        loaded = context.loaded_checkpoint()
        return LoadModelResult(
            loaded=loaded[0] if loaded else wanted, hash=loaded[1] if loaded else None,
            job_id=job_id, state=snapshot.state,
        )

    # -- outputs -----------------------------------------------------------------------------------------------

    @router.get("/outputs", response_model=GalleryPageResult, summary="A page of saved images, newest first")
    def list_outputs(
        page: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
        page_size: Annotated[int, Query(ge=1, le=MAX_GALLERY_PAGE_SIZE)] = 24,
        search: Annotated[str, Query(max_length=1000, description="Substring of the prompt or negative prompt")] = "",
        day: Annotated[str, Query(max_length=10, description="YYYY-MM-DD; empty for every day")] = "",
        model: Annotated[str, Query(max_length=1000, description="Model name as in the infotext; empty for all")] = "",
    ) -> GalleryPageResult:
        result = context.gallery.page(page, page_size, search, day or None, model or None)
        return GalleryPageResult(
            page=result.page,
            page_count=result.page_count,
            total=result.total,
            images=[
                GalleryImage(url=file_url(entry.path), day=entry.day, prompt=entry.prompt, model=entry.model,
                             infotext=entry.infotext)
                for entry in result.entries
            ],
        )

    @router.get(
        "/outputs/file",
        response_class=FileResponse,
        responses={
            200: {"content": {mime: {} for mime in sorted(set(SERVABLE_SUFFIXES.values()))}, "description": "An image"},
            400: {"description": "Not a relative path inside the outputs folder"},
            404: NOT_FOUND_RESPONSE,
        },
        summary="One saved image, by its path relative to the outputs folder",
    )
    def get_output_file(path: Annotated[str, Query(min_length=1, max_length=4096)]) -> FileResponse:
        # Rejected by shape first: absolute paths, drive letters, "..", NUL (which the OS would refuse anyway).
        windows = PureWindowsPath(path)
        if "\x00" in path or PurePosixPath(path).is_absolute() or windows.drive or windows.root \
                or ".." in PurePosixPath(path.replace("\\", "/")).parts:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "path must be relative to the outputs folder")
        root = outputs_root()
        media_type: str | None = None
        try:
            # resolve() follows symbolic links, so a link pointing out of the folder fails the check below.
            resolved = (root / path).resolve()
            media_type = SERVABLE_SUFFIXES.get(resolved.suffix.lower())
            servable = (
                resolved != root and resolved.is_relative_to(root) and media_type is not None and resolved.is_file()
            )
        except (OSError, RuntimeError, ValueError):
            # Over-long names, link loops and the like: nothing there that could be served.
            servable = False
        if not servable or media_type is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "file not found")
        return FileResponse(resolved, media_type=media_type)

    return router
