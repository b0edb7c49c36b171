"""EngineRunner behind a real GenerationQueue: tiny SD 1.x checkpoints, real sampling, real files in tmp_path.
Checks saving during the job, live previews, interrupt, and checkpoint loads that fail cleanly."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from webui.app.outputs import Outputs, SavedImage, read_infotext
from webui.app.queue import GenerationQueue, JobSnapshot, JobState, LoadCheckpointRequest, Txt2ImgRequest
from webui.app.runner import EngineRunner
from webui.core.infotext import parse_infotext
from webui.core.params import GenerationParams
from webui.engine.devices import choose_device_policy
from webui.engine.model_manager import ModelManager
from webui.engine.model_registry import ModelRegistry
from webui.engine.vae import cheap_preview

VERSION = "webui-test"
WAIT_SECONDS = 60.0
SMALL = dict(width=64, height=64, steps=4, sampler="Euler a", seed=1234)


@dataclass
class Harness:
    """A queue running the real EngineRunner, with the knobs a test may turn while it runs."""

    queue: GenerationQueue
    runner: EngineRunner
    manager: ModelManager
    outputs_root: Path
    preview_every: list[int] = field(default_factory=lambda: [0])
    image_format: list[str] = field(default_factory=lambda: ["png"])
    saved: list[SavedImage] = field(default_factory=list)
    on_saved_hook: list[Callable[[SavedImage], None]] = field(default_factory=list)

    def run(self, **changes: object) -> JobSnapshot:
        params = GenerationParams(**{"prompt": "a photo of a cat", **SMALL, **changes})
        return self.queue.wait(self.queue.submit(Txt2ImgRequest(params)), timeout=WAIT_SECONDS)


@pytest.fixture
def harness(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Harness]:
    manager = ModelManager(ModelRegistry([tiny_model_dir]), choose_device_policy(force_cpu=True))
    outputs = Outputs(tmp_path / "outputs")
    holder: list[Harness] = []

    def on_saved(saved: SavedImage) -> None:
        holder[0].saved.append(saved)
        for hook in holder[0].on_saved_hook:
            hook(saved)

    runner = EngineRunner(
        manager,
        outputs=lambda: outputs,
        preview_every_n_steps=lambda: holder[0].preview_every[0],
        version=VERSION,
        on_saved=on_saved,
        image_format=lambda: holder[0].image_format[0],
    )
    queue = GenerationQueue(runner)
    holder.append(Harness(queue, runner, manager, tmp_path / "outputs"))
    queue.start()
    yield holder[0]
    queue.shutdown(timeout=WAIT_SECONDS)


def test_txt2img_saves_every_image_with_its_infotext(harness: Harness) -> None:
    final = harness.run(batch_size=2, batch_count=2)

    assert final.state is JobState.DONE, final.message
    assert final.first_seed == 1234
    assert len(final.images) == 4
    assert [saved.path for saved in final.images] == [saved.path for saved in harness.saved]
    for index, saved in enumerate(final.images):
        assert saved.path.is_file() and saved.path.is_relative_to(harness.outputs_root)
        assert saved.path.name.endswith(f"-{1234 + index}.png")
        written = read_infotext(saved.path)
        assert written == saved.infotext
        assert parse_infotext(written).fields["Seed"] == str(1234 + index)
    assert harness.runner.loaded_checkpoint() == ("tiny.safetensors", harness.manager.current.short_hash)


def test_first_batch_is_on_disk_before_the_second_batch_finishes(harness: Harness) -> None:
    first_saved = threading.Event()
    release = threading.Event()

    def hold_after_first_image(saved: SavedImage) -> None:
        if not first_saved.is_set():
            first_saved.set()
            # Keep the worker here so the test can look at the job between the two batches.
            assert release.wait(WAIT_SECONDS)

    harness.on_saved_hook.append(hold_after_first_image)
    params = GenerationParams(prompt="a cat", **{**SMALL, "batch_count": 2})
    job = harness.queue.submit(Txt2ImgRequest(params))
    try:
        assert first_saved.wait(WAIT_SECONDS)
        during = harness.queue.snapshot(job)
        assert during.state is JobState.RUNNING
        assert len(during.images) == 1
        assert during.images[0].path.is_file()
        assert read_infotext(during.images[0].path) == during.images[0].infotext
        assert during.progress is not None and during.progress.batch_index == 0
    finally:
        release.set()
    final = harness.queue.wait(job, timeout=WAIT_SECONDS)
    assert final.state is JobState.DONE and len(final.images) == 2


def test_previews_appear_every_n_steps(harness: Harness) -> None:
    harness.preview_every[0] = 2
    job = harness.queue.submit(Txt2ImgRequest(GenerationParams(prompt="a cat", **{**SMALL, "steps": 6})))
    preview_steps: list[int] = []
    snapshot = harness.queue.snapshot(job)
    while not snapshot.finished:
        last_preview_version = snapshot.preview_version
        snapshot = harness.queue.wait_for_change(job, snapshot.version, timeout=WAIT_SECONDS)
        if snapshot.preview_version != last_preview_version and snapshot.progress is not None:
            preview_steps.append(snapshot.progress.step)

    assert snapshot.state is JobState.DONE, snapshot.message
    # Steps 2, 4 and 6 of 6; the watcher may see some of them late but never more than three.
    assert snapshot.preview_version == 3
    assert all(step % 2 == 0 for step in preview_steps)
    assert snapshot.preview is not None
    assert snapshot.preview.size == (64, 64) and snapshot.preview.mode == "RGB"


def test_no_previews_when_the_interval_is_zero(harness: Harness) -> None:
    harness.preview_every[0] = 0
    final = harness.run()
    assert final.state is JobState.DONE
    assert final.preview is None and final.preview_version == 0


def test_settings_read_through_callables_apply_to_the_next_job(harness: Harness) -> None:
    harness.image_format[0] = "jpg"
    jpg = harness.run()
    harness.image_format[0] = "webp"
    webp = harness.run()
    assert jpg.images[0].path.suffix == ".jpg" and webp.images[0].path.suffix == ".webp"
    assert read_infotext(webp.images[0].path) == webp.images[0].infotext


def test_interrupt_stops_real_sampling_within_a_step(harness: Harness) -> None:
    job = harness.queue.submit(
        Txt2ImgRequest(GenerationParams(prompt="a cat", **{**SMALL, "steps": 150, "batch_count": 5}))
    )
    snapshot = harness.queue.snapshot(job)
    while snapshot.progress is None or snapshot.progress.step < 3:
        assert not snapshot.finished, snapshot.message
        snapshot = harness.queue.wait_for_change(job, snapshot.version, timeout=WAIT_SECONDS)

    assert harness.queue.interrupt(job)
    step_at_interrupt = harness.queue.snapshot(job).progress
    final = harness.queue.wait(job, timeout=WAIT_SECONDS)

    assert final.state is JobState.INTERRUPTED
    assert step_at_interrupt is not None and final.progress is not None
    assert final.progress.batch_index == 0
    assert final.progress.step - step_at_interrupt.step <= 1
    # As A1111: the running batch's picture so far is saved (with its infotext); the later batches never start.
    assert len(final.images) == 1
    assert sorted(harness.outputs_root.rglob("*.png")) == [final.images[0].path]
    assert read_infotext(final.images[0].path) == final.images[0].infotext


def test_load_checkpoint_job_swaps_the_model_and_a_bad_name_fails_cleanly(harness: Harness, tmp_path: Path) -> None:
    loaded = harness.queue.wait(harness.queue.submit(LoadCheckpointRequest("tiny_b")), timeout=WAIT_SECONDS)
    assert loaded.state is JobState.DONE, loaded.message
    # The hash is computed in the background after the load: the message has it only if it was ready by then.
    deadline = time.monotonic() + WAIT_SECONDS
    while (harness.runner.loaded_checkpoint() or ("", None))[1] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    name, short_hash = harness.runner.loaded_checkpoint() or ("", None)
    assert name == "tiny_b.safetensors" and short_hash is not None and len(short_hash) == 10
    assert loaded.message in (f"Loaded tiny_b [{short_hash}]", "Loaded tiny_b")

    missing = harness.queue.wait(harness.queue.submit(LoadCheckpointRequest("no_such_model")), timeout=WAIT_SECONDS)
    assert missing.state is JobState.FAILED
    assert missing.error is not None and "no_such_model" in missing.error

    # A real checkpoint outside the model folders is refused: names from requests stay inside them.
    # It carries its config sidecar, so only the folder rule can stop it.
    model_dir = harness.manager.current.info.path.parent
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(model_dir / "tiny.safetensors", outside)
    shutil.copytree(model_dir / "tiny.config", tmp_path / "outside.config")
    refused = harness.queue.wait(harness.queue.submit(LoadCheckpointRequest(str(outside))), timeout=WAIT_SECONDS)
    assert refused.state is JobState.FAILED
    assert refused.error is not None and "no checkpoint matches" in refused.error

    assert harness.runner.loaded_checkpoint() == ("tiny_b.safetensors", short_hash)
    after = harness.run()
    assert after.state is JobState.DONE
    assert parse_infotext(after.images[0].infotext).fields["Model"] == "tiny_b"


def test_txt2img_loads_the_checkpoint_its_params_name(harness: Harness) -> None:
    first = harness.run()
    other = harness.run(checkpoint="tiny_b")
    assert parse_infotext(first.images[0].infotext).fields["Model"] == "tiny"
    assert parse_infotext(other.images[0].infotext).fields["Model"] == "tiny_b"
    assert harness.runner.loaded_checkpoint()[0] == "tiny_b.safetensors"  # type: ignore[index]


def test_a_generation_error_fails_the_job_and_the_queue_goes_on(harness: Harness) -> None:
    too_deep = harness.run(clip_skip=12)  # the tiny text encoder has only 2 layers
    assert too_deep.state is JobState.FAILED
    assert too_deep.error is not None and too_deep.error.startswith("clip_skip:")
    assert harness.run().state is JobState.DONE


def test_cheap_preview_maps_latent_channels_to_rgb() -> None:
    latents = torch.zeros(2, 4, 2, 3)
    latents[0, 0] = 1.0  # channel 0 only: RGB = (1 + [0.298, 0.207, 0.208]) / 2
    latents[1] = 5.0  # the second image of the batch must not matter
    preview = cheap_preview(latents)
    assert preview.size == (24, 16) and preview.mode == "RGB"
    expected = [int(255 * (1 + coefficient) / 2) for coefficient in (0.298, 0.207, 0.208)]
    assert np.asarray(preview)[0, 0].tolist() == expected
    assert np.asarray(preview)[15, 23].tolist() == expected

    # Every colour's coefficient column sums to a positive number (0.143, 0.411, 0.172): ±10 saturates.
    assert np.asarray(cheap_preview(torch.full((1, 4, 1, 1), 10.0)))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(cheap_preview(torch.full((1, 4, 1, 1), -10.0)))[0, 0].tolist() == [0, 0, 0]
