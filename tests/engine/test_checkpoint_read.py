"""Reading a checkpoint while its modules are built (read_checkpoint's worker thread) and hashing it meanwhile at
the lowest priority: the same weights as a plain read, errors that name their cause, a background hash that waits."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from webui.engine.checkpoint_loading import CheckpointLoadError, ModelComponents, build_components, read_checkpoint
from webui.engine.model_registry import FileHasher, ModelRegistry


def test_weights_read_while_the_modules_are_built_equal_a_plain_read(tiny_model_dir: Path) -> None:
    info = ModelRegistry([tiny_model_dir]).resolve("tiny")
    plain = read_checkpoint(info)
    built: list[tuple[ModelComponents, int]] = []

    def build_meanwhile() -> ModelComponents:
        components = build_components(plain.family, plain.config_dir)
        built.append((components, threading.get_ident()))
        return components

    overlapped = read_checkpoint(info, build_meanwhile, lambda component: torch.float32)
    assert len(built) == 1 and built[0][1] == threading.get_ident(), "built once, on the caller's thread"
    assert overlapped.components is built[0][0]
    assert set(overlapped.state_dicts) == set(plain.state_dicts)
    for component, weights in plain.state_dicts.items():
        assert set(overlapped.state_dicts[component]) == set(weights)
        for name, tensor in weights.items():
            assert overlapped.state_dicts[component][name].dtype == torch.float32
            assert torch.equal(overlapped.state_dicts[component][name], tensor.to(torch.float32)), name


def test_a_skeleton_that_cannot_be_built_reports_its_own_error(tiny_model_dir: Path) -> None:
    info = ModelRegistry([tiny_model_dir]).resolve("tiny")

    def broken_config() -> ModelComponents:
        raise CheckpointLoadError("config: unet/config.json is missing")

    # The read going on meanwhile is stopped; the user is told about the config, not about the stopped read.
    with pytest.raises(CheckpointLoadError, match="unet/config.json is missing"):
        read_checkpoint(info, broken_config)


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are a POSIX feature")
def test_background_hashing_runs_at_the_lowest_priority(tiny_model_dir: Path) -> None:
    priorities: list[int] = []

    def recording_digest(path: Path) -> str:
        priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return "0" * 64

    hasher = FileHasher(digest=recording_digest)
    info = ModelRegistry([tiny_model_dir], hasher).resolve("tiny")
    hasher.hash_in_background(info)
    deadline = time.monotonic() + 30
    while hasher.cached(info) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hasher.cached(info) == "0" * 64
    # A load starting with its file's hash gets every core; the hash takes what is left (nice 19).
    assert priorities == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19, "only the hasher's thread is lowered"
