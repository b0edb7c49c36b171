"""The wiring in webui.main that has behaviour of its own: "Reload UI" waits for the queue, with a real queue.
The process replacement (exec) is swapped for a recorder; everything else is the real code."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.app.test_queue import WAIT_SECONDS, StepExecutor, start_paused_job, txt2img
from webui.app.queue import GenerationQueue, JobState, QueueClosedError
from webui.main import restart_when_idle


@contextmanager
def running_queue(executor: StepExecutor) -> Iterator[GenerationQueue]:
    generation_queue = GenerationQueue(executor)
    generation_queue.start()
    try:
        yield generation_queue
    finally:
        executor.resume.set()
        generation_queue.shutdown(timeout=WAIT_SECONDS)


def test_reload_ui_while_a_job_runs_restarts_once_it_has_finished() -> None:
    executor = StepExecutor()
    replaced = threading.Event()
    released: list[str] = []
    with running_queue(executor) as queue:
        restart = restart_when_idle(queue, before_restart=lambda: released.append("frpc"), replace_process=replaced.set)
        running = start_paused_job(queue, executor)

        assert restart() == "Restarting the web UI once the current jobs have finished…"
        # A second press neither starts a second restart nor says anything different.
        assert restart() == "Restarting the web UI once the current jobs have finished…"
        assert not replaced.wait(0.3), "the process was replaced while a job was running"
        with pytest.raises(QueueClosedError, match="the web UI is restarting"):
            queue.submit(txt2img("submitted after Reload UI"))

        executor.resume.set()
        assert replaced.wait(WAIT_SECONDS)
        assert queue.snapshot(running).state is JobState.DONE
        assert released == ["frpc"]


def test_reload_ui_when_idle_restarts_at_once() -> None:
    replaced = threading.Event()
    with running_queue(StepExecutor()) as queue:
        restart = restart_when_idle(queue, replace_process=replaced.set)
        assert restart() == "Restarting the web UI…"
        assert replaced.wait(WAIT_SECONDS)
