"""The generation queue: one worker thread runs jobs FIFO, per-job progress snapshots, interrupt / skip, job ids.
Must not import gradio, fastapi, torch, diffusers or webui.engine (the server starts before any model work)."""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from PIL import Image

from webui.app.outputs import SavedImage
from webui.core.events import JobControl, Progress
from webui.core.params import AUTOMATIC_VAE, GenerationParams, ParamError, resolve_seed

logger = logging.getLogger(__name__)

TXT2IMG_KIND = "txt2img"
LOAD_CHECKPOINT_KIND = "load_checkpoint"
UNLOAD_CHECKPOINT_KIND = "unload_checkpoint"
REFRESH_EMBEDDINGS_KIND = "refresh_embeddings"
WORKER_THREAD_NAME = "generation-worker"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


FINISHED_STATES = frozenset({JobState.DONE, JobState.INTERRUPTED, JobState.FAILED})


@dataclass(frozen=True, slots=True)
class Txt2ImgRequest:
    """Generate images; the params are validated and the seed resolved when the job is submitted."""

    params: GenerationParams
    # False: the images go to a scratch folder instead of the outputs folder and the gallery (A1111's API
    # save_images=false); whoever submitted the job reads them and deletes the files.
    save: bool = True


@dataclass(frozen=True, slots=True)
class LoadCheckpointRequest:
    """Make `checkpoint` (a name inside the model folders, or its short hash) the loaded model."""

    checkpoint: str
    vae: str = AUTOMATIC_VAE


@dataclass(frozen=True, slots=True)
class UnloadCheckpointRequest:
    """Drop the loaded model and free its memory (A1111's unload-checkpoint); the next job loads again."""


@dataclass(frozen=True, slots=True)
class RefreshEmbeddingsRequest:
    """Rescan the embeddings folders now and fit them to the loaded model (A1111's refresh-embeddings, which runs
    under the queue lock): a job, so it runs on the worker thread, between generations, beside the model."""


JobRequest = Txt2ImgRequest | LoadCheckpointRequest | UnloadCheckpointRequest | RefreshEmbeddingsRequest


@dataclass(frozen=True, slots=True)
class JobSnapshot:
    """Everything a front end shows about one job, at one moment; `version` grows with every change."""

    job_id: str
    kind: str
    state: JobState
    owner: str | None
    # Jobs that will run before this one starts, the running job included; 0 once this one runs.
    ahead: int
    progress: Progress | None
    # A1111's estimate, elapsed / fraction - elapsed; None until the first step has been reported.
    eta_seconds: float | None
    preview: Image.Image | None
    preview_version: int
    images: tuple[SavedImage, ...]
    first_seed: int | None
    message: str
    error: str | None
    version: int
    # A1111's comments: warnings of a job that ran anyway (a LoRA not found or not fitting the model).
    warnings: tuple[str, ...] = ()

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


def format_duration(seconds: float) -> str:
    """0:05, 12:34 or 1:02:03, the way A1111's progress bar shows an ETA."""
    total = max(0, round(seconds))
    hours, remainder = divmod(total, 3600)
    minutes, secs = divmod(remainder, 60)
    if hours:
        return f"{hours}:{minutes:02}:{secs:02}"
    return f"{minutes}:{secs:02}"


@dataclass(slots=True, eq=False)
class _Job:
    """The mutable record behind a JobSnapshot; only touched while holding the queue's lock."""

    job_id: str
    request: JobRequest
    kind: str
    owner: str | None
    first_seed: int | None
    control: JobControl = field(default_factory=JobControl)
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    progress: Progress | None = None
    preview: Image.Image | None = None
    preview_version: int = 0
    images: list[SavedImage] = field(default_factory=list)
    # The executor's latest status line; a progress update replaces it on screen.
    status_line: str | None = None
    final_message: str | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    version: int = 0

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


class JobReporter:
    """What the executor tells the queue about its job; thread-safe, ignored once the job has finished."""

    def __init__(self, queue: GenerationQueue, job: _Job) -> None:
        self._queue = queue
        self._job = job

    def progress(self, progress: Progress) -> None:
        def apply(job: _Job) -> None:
            job.progress = progress
            job.status_line = None

        self._queue._update(self._job, apply)

    def preview(self, image: Image.Image) -> None:
        def apply(job: _Job) -> None:
            job.preview = image
            job.preview_version += 1

        self._queue._update(self._job, apply)

    def image(self, saved: SavedImage) -> None:
        self._queue._update(self._job, lambda job: job.images.append(saved))

    def message(self, text: str) -> None:
        def apply(job: _Job) -> None:
            job.status_line = text

        self._queue._update(self._job, apply)

    def warning(self, text: str) -> None:
        """Something the user should know about a job that still runs (A1111's comments, e.g. "Lora not found: x");
        shown with the job's result."""

        def apply(job: _Job) -> None:
            job.warnings.append(text)

        self._queue._update(self._job, apply)


JobExecutor = Callable[[JobRequest, JobReporter, JobControl], None]
# Checks a job needs beyond its own fields (the prompt-length limit, which needs the tokenizer); ParamError refuses.
RequestCheck = Callable[[JobRequest], None]


def _error_text(error: BaseException) -> str:
    return str(error) or type(error).__name__


class QueueClosedError(RuntimeError):
    """The queue takes no new jobs: the server is shutting down or restarting."""


class GenerationQueue:
    """FIFO jobs run one at a time by a single daemon worker thread, the only thread that runs `executor`.

    UI and API share one queue; interrupt and skip act on one job id only, so users never stop each
    other's work. Finished jobs stay readable until `keep_finished` newer ones have finished. `check_request`
    runs on every job at submit, so a refused job is never queued.
    """

    def __init__(self, executor: JobExecutor, keep_finished: int = 200,
                 check_request: RequestCheck | None = None) -> None:
        self._executor = executor
        self._check_request = check_request
        self._keep_finished = max(0, keep_finished)
        # One lock and one condition for everything: updates are tiny, and every waiter re-checks its job.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._jobs: dict[str, _Job] = {}
        self._pending: collections.deque[_Job] = collections.deque()
        self._finished_order: collections.deque[str] = collections.deque()
        self._running: _Job | None = None
        self._stopping = False
        # Set by close_when_idle: why new jobs are refused while the queued and running ones finish.
        self._closed_reason: str | None = None
        self._worker: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (once); jobs submitted before this wait for it."""
        with self._lock:
            if self._worker is not None:
                return
            self._stopping = False
            self._worker = threading.Thread(target=self._work, name=WORKER_THREAD_NAME, daemon=True)
            self._worker.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, drop the queued ones (INTERRUPTED), interrupt the running one and wait for the worker."""
        with self._changed:
            self._stopping = True
            while self._pending:
                self._finish_locked(self._pending.popleft(), JobState.INTERRUPTED)
            if self._running is not None:
                self._running.control.interrupt()
            worker = self._worker
            self._changed.notify_all()
        if worker is not None:
            worker.join(timeout)

    def close_when_idle(self, reason: str, timeout: float | None = None) -> bool:
        """Refuse new jobs from now on (QueueClosedError saying `reason`) and block until the queued and the
        running jobs have finished; True when the queue is idle, False when `timeout` passed first."""
        with self._changed:
            self._closed_reason = reason
            return self._changed.wait_for(lambda: self._running is None and not self._pending, timeout)

    # -- submitting and reading ------------------------------------------------------------------------------

    def submit(self, request: JobRequest, owner: str | None = None) -> str:
        """Queue a job and return its id; raises ParamError for bad parameters before anything is queued."""
        first_seed: int | None = None
        if isinstance(request, Txt2ImgRequest):
            params = request.params.validated()
            # Resolved here so the caller can show the seed at once and the job is reproducible from its record.
            first_seed = resolve_seed(params.seed)
            request = Txt2ImgRequest(params.replace(seed=first_seed), save=request.save)
            kind = TXT2IMG_KIND
        elif isinstance(request, LoadCheckpointRequest):
            if not isinstance(request.checkpoint, str) or not request.checkpoint.strip():
                raise ParamError("checkpoint", "no checkpoint name given")
            kind = LOAD_CHECKPOINT_KIND
        elif isinstance(request, UnloadCheckpointRequest):
            kind = UNLOAD_CHECKPOINT_KIND
        elif isinstance(request, RefreshEmbeddingsRequest):
            kind = REFRESH_EMBEDDINGS_KIND
        else:
            raise TypeError(f"submit: unsupported request type {type(request).__name__}")
        if self._check_request is not None:
            self._check_request(request)
        job = _Job(job_id=uuid.uuid4().hex, request=request, kind=kind, owner=owner, first_seed=first_seed)
        with self._changed:
            if self._stopping:
                raise QueueClosedError("the generation queue is shut down")
            if self._closed_reason is not None:
                raise QueueClosedError(f"no new jobs: {self._closed_reason}")
            self._jobs[job.job_id] = job
            self._pending.append(job)
            self._changed.notify_all()
        return job.job_id

    def snapshot(self, job_id: str) -> JobSnapshot:
        """The job as it is now; KeyError for an unknown (or long-forgotten) id."""
        with self._lock:
            return self._snapshot_locked(self._job_locked(job_id))

    def wait(self, job_id: str, timeout: float | None = None) -> JobSnapshot:
        """Block until the job has finished or `timeout` seconds passed; returns its snapshot either way."""
        with self._changed:
            job = self._job_locked(job_id)
            # Holding the record (not the id) keeps this working if the job is dropped from the history meanwhile.
            self._changed.wait_for(lambda: job.finished, timeout)
            return self._snapshot_locked(job)

    def wait_for_change(self, job_id: str, after_version: int, timeout: float) -> JobSnapshot:
        """Block until the job's version exceeds `after_version` or `timeout` passed.

        Returns at once when the job has already finished, since nothing will change any more.
        """
        with self._changed:
            job = self._job_locked(job_id)
            self._changed.wait_for(lambda: job.version > after_version or job.finished, timeout)
            return self._snapshot_locked(job)

    def running_snapshot(self) -> JobSnapshot | None:
        """The job the worker is running now, if any (A1111's /progress reports this one)."""
        with self._lock:
            return self._snapshot_locked(self._running) if self._running is not None else None

    def current_job(self, owner: str | None) -> JobSnapshot | None:
        """`owner`'s job that A1111's no-argument routes (progress, interrupt, skip) act on: the running one if it
        is theirs, else their next queued one. `owner` None means anyone's: the running job."""
        with self._lock:
            if self._running is not None and (owner is None or self._running.owner == owner):
                return self._snapshot_locked(self._running)
            if owner is None:
                return None
            for job in self._pending:
                if job.owner == owner:
                    return self._snapshot_locked(job)
            return None

    def queued_count(self) -> int:
        """Jobs waiting to run (not counting the running one)."""
        with self._lock:
            return len(self._pending)

    # -- interrupt and skip ----------------------------------------------------------------------------------

    def interrupt(self, job_id: str) -> bool:
        """Stop a running job within a sampler step, or drop a queued one; False if finished or unknown."""
        with self._changed:
            job = self._jobs.get(job_id)
            if job is None or job.finished:
                return False
            if job.state is JobState.QUEUED:
                self._pending.remove(job)
                self._finish_locked(job, JobState.INTERRUPTED)
                self._bump_queued_locked()
            else:
                job.control.interrupt()
                self._bump_locked(job)
            self._changed.notify_all()
            return True

    def skip(self, job_id: str) -> bool:
        """Abandon the running job's current batch (the next batch goes on); False unless the job is running."""
        with self._changed:
            job = self._jobs.get(job_id)
            if job is None or job.state is not JobState.RUNNING:
                return False
            job.control.skip()
            return True

    # -- worker ----------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._pending) or self._stopping)
                if self._stopping:
                    return
                job = self._pending.popleft()
                job.state = JobState.RUNNING
                job.started_at = time.monotonic()
                self._running = job
                self._bump_locked(job)
                self._bump_queued_locked()
                self._changed.notify_all()
            self._run(job)

    def _run(self, job: _Job) -> None:
        error: str | None = None
        try:
            self._executor(job.request, JobReporter(self, job), job.control)
        except Exception as raised:  # any failure ends this job only; the worker must live on for the others
            error = _error_text(raised)
            if isinstance(raised, (ValueError, LookupError)):
                # Bad input (parameters, checkpoint names): the message says it all, a traceback would be noise.
                logger.warning("job %s (%s) failed: %s", job.job_id, job.kind, error)
            else:
                logger.exception("job %s (%s) failed", job.job_id, job.kind)
        with self._changed:
            self._running = None
            if error is not None:
                job.error = error
                self._finish_locked(job, JobState.FAILED)
            elif job.control.interrupted:
                self._finish_locked(job, JobState.INTERRUPTED)
            else:
                # A checkpoint load's own last line ("Loaded tiny [hash]") says more than "Done".
                if job.kind == LOAD_CHECKPOINT_KIND and job.status_line:
                    job.final_message = job.status_line
                if job.warnings:
                    job.final_message = "Done. " + " ".join(f"{warning}." for warning in job.warnings)
                self._finish_locked(job, JobState.DONE)
            self._changed.notify_all()

    # -- helpers (all called with the lock held) -------------------------------------------------------------

    def _update(self, job: _Job, apply: Callable[[_Job], None]) -> None:
        with self._changed:
            if job.finished:
                return
            apply(job)
            self._bump_locked(job)
            self._changed.notify_all()

    def _job_locked(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def _bump_locked(self, job: _Job) -> None:
        job.version += 1

    def _bump_queued_locked(self) -> None:
        # Every queued job's `ahead` may have changed: wake their watchers too.
        for queued in self._pending:
            queued.version += 1

    def _finish_locked(self, job: _Job, state: JobState) -> None:
        job.state = state
        self._bump_locked(job)
        self._finished_order.append(job.job_id)
        while len(self._finished_order) > self._keep_finished:
            self._jobs.pop(self._finished_order.popleft(), None)

    def _message_locked(self, job: _Job, ahead: int, eta_seconds: float | None) -> str:
        if job.state is JobState.QUEUED:
            return f"In queue: {ahead} ahead"
        if job.state is JobState.DONE:
            return job.final_message or "Done"
        if job.state is JobState.INTERRUPTED:
            return "Interrupted"
        if job.state is JobState.FAILED:
            return job.error or "Failed"
        if job.control.interrupted:
            return "Interrupting"
        if job.status_line is not None or job.progress is None:
            return job.status_line or "Starting"
        progress = job.progress
        line = (
            f"Batch {progress.batch_index + 1} of {progress.batch_count}"
            f" · step {progress.step}/{progress.total_steps}"
        )
        if eta_seconds is not None:
            line += f" · ETA {format_duration(eta_seconds)}"
        return line

    def _snapshot_locked(self, job: _Job) -> JobSnapshot:
        ahead = 0
        if job.state is JobState.QUEUED:
            # The running job is ahead of every queued one.
            ahead = self._pending.index(job) + (1 if self._running is not None else 0)
        eta_seconds: float | None = None
        if job.state is JobState.RUNNING and job.progress is not None and job.started_at is not None:
            fraction = job.progress.fraction
            if fraction > 0:
                # A1111's estimate: the whole job takes elapsed / fraction; what is left is the ETA.
                elapsed = time.monotonic() - job.started_at
                eta_seconds = max(0.0, elapsed / fraction - elapsed)
        return JobSnapshot(
            job_id=job.job_id,
            kind=job.kind,
            state=job.state,
            owner=job.owner,
            ahead=ahead,
            progress=job.progress,
            eta_seconds=eta_seconds,
            preview=job.preview,
            preview_version=job.preview_version,
            images=tuple(job.images),
            first_seed=job.first_seed,
            message=self._message_locked(job, ahead, eta_seconds),
            warnings=tuple(job.warnings),
            error=job.error,
            version=job.version,
        )
