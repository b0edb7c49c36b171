"""GenerationQueue with a small real executor that steps, sleeps and honours JobControl like the sampler does.
Checks FIFO order, per-job interrupt / skip, failures, progress streaming and ETA; no model is loaded."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from webui.app.outputs import SavedImage
from webui.app.queue import (
    GenerationQueue,
    JobReporter,
    JobRequest,
    JobSnapshot,
    JobState,
    LoadCheckpointRequest,
    QueueClosedError,
    Txt2ImgRequest,
    format_duration,
)
from webui.core.events import JobControl, Progress
from webui.core.params import RANDOM_SEED_BOUND, GenerationParams, ParamError

REPO_ROOT = Path(__file__).resolve().parents[2]
STEP_SECONDS = 0.005
WAIT_SECONDS = 10.0


@dataclass
class StepExecutor:
    """Runs `steps` steps per batch, checking interrupt/skip before each one as the real sampler does.

    Prompts steer it: "fail:<text>" raises RuntimeError(text), "fail-empty" raises ValueError(),
    "pause" waits at batch 0 step 1 until the test sets `resume` (after `paused` is set).
    """

    paused: threading.Event = field(default_factory=threading.Event)
    resume: threading.Event = field(default_factory=threading.Event)
    started: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    steps_done: list[tuple[str, int, int]] = field(default_factory=list)
    finished_batches: list[tuple[str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: JobRequest, reporter: JobReporter, control: JobControl) -> None:
        if isinstance(request, LoadCheckpointRequest):
            reporter.message(f"Loading checkpoint {request.checkpoint}")
            return
        params = request.params
        with self.lock:
            self.started.append(params.prompt)
            self.seeds.append(params.seed)
        if params.prompt.startswith("fail:"):
            raise RuntimeError(params.prompt.removeprefix("fail:"))
        if params.prompt == "fail-empty":
            raise ValueError()
        for batch in range(params.batch_count):
            if control.interrupted:
                return
            control.clear_skip()
            completed = True
            for step in range(params.steps):
                if params.prompt == "pause" and batch == 0 and step == 1:
                    self.paused.set()
                    assert self.resume.wait(WAIT_SECONDS)
                if control.interrupted or control.skipped:
                    completed = False
                    break
                time.sleep(STEP_SECONDS)
                with self.lock:
                    self.steps_done.append((params.prompt, batch, step))
                reporter.progress(Progress(step + 1, params.steps, batch, params.batch_count))
            if completed:
                with self.lock:
                    self.finished_batches.append((params.prompt, batch))

    def step_count(self, prompt: str) -> int:
        with self.lock:
            return sum(1 for done in self.steps_done if done[0] == prompt)


def txt2img(prompt: str, steps: int = 3, batch_count: int = 1, seed: int = 1) -> Txt2ImgRequest:
    return Txt2ImgRequest(GenerationParams(prompt=prompt, steps=steps, batch_count=batch_count, seed=seed))


@pytest.fixture
def executor() -> StepExecutor:
    return StepExecutor()


@pytest.fixture
def queue(executor: StepExecutor) -> Iterator[GenerationQueue]:
    generation_queue = GenerationQueue(executor)
    generation_queue.start()
    yield generation_queue
    executor.resume.set()
    generation_queue.shutdown(timeout=WAIT_SECONDS)


def wait_until(queue: GenerationQueue, job_id: str, condition: Callable[[JobSnapshot], bool]) -> JobSnapshot:
    """Follow the job through wait_for_change until `condition(snapshot)` holds."""
    deadline = time.monotonic() + WAIT_SECONDS
    snapshot = queue.snapshot(job_id)
    while not condition(snapshot):
        assert time.monotonic() < deadline, f"condition never held; last snapshot {snapshot}"
        snapshot = queue.wait_for_change(job_id, snapshot.version, timeout=deadline - time.monotonic())
    return snapshot


def start_paused_job(queue: GenerationQueue, executor: StepExecutor, owner: str | None = None) -> str:
    job_id = queue.submit(txt2img("pause", steps=5), owner=owner)
    assert executor.paused.wait(WAIT_SECONDS)
    return job_id


def test_jobs_run_in_submission_order_and_ahead_counts_the_jobs_before(
    queue: GenerationQueue, executor: StepExecutor
) -> None:
    running = start_paused_job(queue, executor)
    second = queue.submit(txt2img("second"))
    third = queue.submit(txt2img("third"))

    assert queue.snapshot(running).state is JobState.RUNNING
    assert queue.snapshot(running).ahead == 0
    assert [queue.snapshot(job).ahead for job in (second, third)] == [1, 2]
    assert queue.snapshot(third).message == "In queue: 2 ahead"
    assert queue.queued_count() == 2

    executor.resume.set()
    finals = [queue.wait(job, timeout=WAIT_SECONDS) for job in (running, second, third)]
    assert [snapshot.state for snapshot in finals] == [JobState.DONE] * 3
    assert [snapshot.message for snapshot in finals] == ["Done"] * 3
    assert executor.started == ["pause", "second", "third"]
    assert queue.queued_count() == 0


def test_jobs_submitted_before_start_wait_in_order(executor: StepExecutor) -> None:
    generation_queue = GenerationQueue(executor)
    try:
        jobs = [generation_queue.submit(txt2img(name)) for name in ("a", "b", "c")]
        assert [generation_queue.snapshot(job).ahead for job in jobs] == [0, 1, 2]
        assert all(generation_queue.snapshot(job).state is JobState.QUEUED for job in jobs)
        generation_queue.start()
        assert generation_queue.wait(jobs[-1], timeout=WAIT_SECONDS).state is JobState.DONE
        assert executor.started == ["a", "b", "c"]
    finally:
        generation_queue.shutdown(timeout=WAIT_SECONDS)


def test_random_seed_is_resolved_at_submit(queue: GenerationQueue, executor: StepExecutor) -> None:
    random_job = queue.submit(txt2img("random", seed=-1))
    fixed_job = queue.submit(txt2img("fixed", seed=42))

    random_seed = queue.snapshot(random_job).first_seed
    assert random_seed is not None and 0 <= random_seed < RANDOM_SEED_BOUND
    assert queue.snapshot(fixed_job).first_seed == 42
    queue.wait(fixed_job, timeout=WAIT_SECONDS)
    # The executor never sees -1: it gets the seed the submitter was shown.
    assert executor.seeds == [random_seed, 42]


def test_bad_params_raise_at_submit_and_queue_nothing(queue: GenerationQueue) -> None:
    with pytest.raises(ParamError, match="steps"):
        queue.submit(Txt2ImgRequest(GenerationParams(steps=0)))
    with pytest.raises(ParamError, match="checkpoint"):
        queue.submit(LoadCheckpointRequest("  "))
    assert queue.queued_count() == 0


def test_interrupting_a_running_job_stops_it_within_a_step_and_spares_other_users(
    queue: GenerationQueue, executor: StepExecutor
) -> None:
    alice = queue.submit(txt2img("alice", steps=150, batch_count=3), owner="alice")
    bob = queue.submit(txt2img("bob", steps=4, batch_count=2), owner="bob")
    wait_until(queue, alice, lambda snapshot: snapshot.progress is not None and snapshot.progress.step >= 3)

    assert queue.interrupt(alice)
    steps_at_interrupt = executor.step_count("alice")
    alice_final = queue.wait(alice, timeout=WAIT_SECONDS)

    # The step in flight when the flag was set may still finish; no further step starts.
    assert executor.step_count("alice") - steps_at_interrupt <= 1
    assert steps_at_interrupt < 150
    assert alice_final.state is JobState.INTERRUPTED
    assert alice_final.message == "Interrupted"
    assert alice_final.owner == "alice"
    bob_final = queue.wait(bob, timeout=WAIT_SECONDS)
    assert bob_final.state is JobState.DONE
    assert executor.finished_batches.count(("bob", 0)) == 1
    assert executor.finished_batches.count(("bob", 1)) == 1
    assert not queue.interrupt(alice)  # already finished


def test_interrupting_a_queued_job_removes_it(queue: GenerationQueue, executor: StepExecutor) -> None:
    running = start_paused_job(queue, executor)
    dropped = queue.submit(txt2img("dropped"))
    last = queue.submit(txt2img("last"))
    seen_version = queue.snapshot(last).version

    assert queue.interrupt(dropped)
    dropped_snapshot = queue.snapshot(dropped)
    assert dropped_snapshot.state is JobState.INTERRUPTED and dropped_snapshot.finished
    # The job behind moves up, and its watchers are told.
    moved_up = queue.wait_for_change(last, seen_version, timeout=WAIT_SECONDS)
    assert moved_up.ahead == 1
    assert queue.queued_count() == 1
    assert queue.snapshot(running).state is JobState.RUNNING

    executor.resume.set()
    assert queue.wait(last, timeout=WAIT_SECONDS).state is JobState.DONE
    assert executor.started == ["pause", "last"]
    assert not queue.interrupt(dropped)
    assert not queue.interrupt("no-such-job")


def test_skip_abandons_only_the_current_batch(queue: GenerationQueue, executor: StepExecutor) -> None:
    job = queue.submit(txt2img("pause", steps=5, batch_count=3))
    waiting = queue.submit(txt2img("waiting"))
    assert executor.paused.wait(WAIT_SECONDS)

    assert not queue.skip(waiting)  # a queued job has no batch to skip
    assert queue.skip(job)
    executor.resume.set()
    final = queue.wait(job, timeout=WAIT_SECONDS)

    assert final.state is JobState.DONE
    assert [batch for prompt, batch in executor.finished_batches if prompt == "pause"] == [1, 2]
    assert queue.wait(waiting, timeout=WAIT_SECONDS).state is JobState.DONE
    assert ("waiting", 0) in executor.finished_batches
    assert not queue.skip(job)


def test_a_failing_job_reports_a_readable_error_and_the_next_job_runs(queue: GenerationQueue) -> None:
    failing = queue.submit(txt2img("fail:the model exploded"))
    empty_error = queue.submit(txt2img("fail-empty"))
    after = queue.submit(txt2img("after"))

    failed = queue.wait(failing, timeout=WAIT_SECONDS)
    assert failed.state is JobState.FAILED
    assert failed.error == "the model exploded"
    assert failed.message == "the model exploded"
    assert queue.wait(empty_error, timeout=WAIT_SECONDS).error == "ValueError"
    assert queue.wait(after, timeout=WAIT_SECONDS).state is JobState.DONE


def test_wait_for_change_streams_every_progress_update(queue: GenerationQueue) -> None:
    job = queue.submit(txt2img("stream", steps=6, batch_count=2))
    seen: list[tuple[int, int]] = []
    versions: list[int] = []
    snapshot = queue.snapshot(job)
    while not snapshot.finished:
        snapshot = queue.wait_for_change(job, snapshot.version, timeout=WAIT_SECONDS)
        versions.append(snapshot.version)
        if snapshot.progress is not None and (snapshot.progress.batch_index, snapshot.progress.step) not in seen:
            seen.append((snapshot.progress.batch_index, snapshot.progress.step))

    assert versions == sorted(set(versions)), "each wake-up must bring a newer version"
    # Every report bumps the version, but a slow watcher may see several at once: require many, in order.
    assert len(seen) >= 4
    assert seen == sorted(seen)
    assert seen[-1] == (1, 6)
    assert snapshot.state is JobState.DONE


def test_wait_for_change_times_out_without_a_change(queue: GenerationQueue, executor: StepExecutor) -> None:
    running = start_paused_job(queue, executor)
    snapshot = queue.snapshot(running)
    started = time.monotonic()
    again = queue.wait_for_change(running, snapshot.version, timeout=0.2)
    assert time.monotonic() - started >= 0.19
    assert again.version == snapshot.version
    assert not queue.wait(running, timeout=0.05).finished
    with pytest.raises(KeyError):
        queue.wait_for_change("no-such-job", 0, timeout=0.1)


def test_eta_appears_once_progress_starts(queue: GenerationQueue, executor: StepExecutor) -> None:
    running = start_paused_job(queue, executor)
    queued = queue.submit(txt2img("queued"))
    queued_snapshot = queue.snapshot(queued)
    assert queued_snapshot.eta_seconds is None and queued_snapshot.progress is None

    snapshot = queue.snapshot(running)
    assert snapshot.progress == Progress(1, 5, 0, 1)
    assert snapshot.eta_seconds is not None and snapshot.eta_seconds >= 0
    assert snapshot.message.startswith("Batch 1 of 1 · step 1/5 · ETA ")
    assert queue.interrupt(running)
    assert queue.snapshot(running).message == "Interrupting"
    executor.resume.set()
    assert queue.wait(running, timeout=WAIT_SECONDS).state is JobState.INTERRUPTED


def test_reporter_updates_previews_images_and_messages(tmp_path: Path) -> None:
    saved = SavedImage(path=tmp_path / "00000-1.png", infotext="a cat")
    pictures = [Image.new("RGB", (8, 8), color) for color in ("red", "blue")]

    def report_everything(request: JobRequest, reporter: JobReporter, control: JobControl) -> None:
        reporter.message("Warming up")
        for picture in pictures:
            reporter.preview(picture)
        reporter.image(saved)

    generation_queue = GenerationQueue(report_everything)
    generation_queue.start()
    try:
        final = generation_queue.wait(generation_queue.submit(txt2img("x")), timeout=WAIT_SECONDS)
        assert final.preview is pictures[-1]
        assert final.preview_version == 2
        assert final.images == (saved,)
        assert final.message == "Done"

        loaded = generation_queue.wait(generation_queue.submit(LoadCheckpointRequest("tiny")), timeout=WAIT_SECONDS)
        assert loaded.kind == "load_checkpoint" and loaded.first_seed is None
        # A checkpoint load keeps its own last line, which names the model.
        assert loaded.message == "Warming up"
    finally:
        generation_queue.shutdown(timeout=WAIT_SECONDS)


def test_oldest_finished_jobs_are_forgotten(executor: StepExecutor) -> None:
    generation_queue = GenerationQueue(executor, keep_finished=2)
    generation_queue.start()
    try:
        jobs = [generation_queue.submit(txt2img(name, steps=1)) for name in ("a", "b", "c")]
        generation_queue.wait(jobs[-1], timeout=WAIT_SECONDS)
        with pytest.raises(KeyError):
            generation_queue.snapshot(jobs[0])
        assert generation_queue.snapshot(jobs[1]).state is JobState.DONE
    finally:
        generation_queue.shutdown(timeout=WAIT_SECONDS)


def test_shutdown_interrupts_running_and_drops_queued_jobs(executor: StepExecutor) -> None:
    generation_queue = GenerationQueue(executor)
    generation_queue.start()
    running = start_paused_job(generation_queue, executor)
    queued = generation_queue.submit(txt2img("queued"))
    # The paused job resumes only after shutdown has raised its interrupt flag.
    resumer = threading.Timer(0.2, executor.resume.set)
    resumer.start()
    generation_queue.shutdown(timeout=WAIT_SECONDS)
    resumer.join()

    assert generation_queue.snapshot(running).state is JobState.INTERRUPTED
    assert generation_queue.snapshot(queued).state is JobState.INTERRUPTED
    assert "queued" not in executor.started
    with pytest.raises(RuntimeError):
        generation_queue.submit(txt2img("late"))


def test_close_when_idle_refuses_new_jobs_and_lets_queued_and_running_ones_finish(
    queue: GenerationQueue, executor: StepExecutor
) -> None:
    running = start_paused_job(queue, executor)
    queued = queue.submit(txt2img("queued"))
    # Closed at once, but not idle: the paused job is still running and the other one waits behind it.
    assert queue.close_when_idle("the web UI is restarting", timeout=0.05) is False
    with pytest.raises(QueueClosedError, match="^no new jobs: the web UI is restarting$"):
        queue.submit(txt2img("late"))

    executor.resume.set()
    assert queue.close_when_idle("the web UI is restarting", timeout=WAIT_SECONDS) is True
    assert queue.snapshot(running).state is JobState.DONE
    assert queue.snapshot(queued).state is JobState.DONE
    assert "late" not in executor.started


def test_format_duration_reads_like_a1111() -> None:
    assert [format_duration(seconds) for seconds in (4.6, 65, 3723)] == ["0:05", "1:05", "1:02:03"]


def test_importing_the_queue_does_not_import_torch() -> None:
    code = "import sys, webui.app.queue; sys.exit(1 if 'torch' in sys.modules or 'diffusers' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr or "webui.app.queue imported torch or diffusers"
