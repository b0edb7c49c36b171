"""Shared pytest setup: tiny SD 1.x checkpoints in a models folder, and the skip rule for @pytest.mark.gpu tests.
Must not import webui, nor torch at module level (tests that never touch a model stay fast to collect)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # A bare `pytest` (not `python -m pytest`) does not put the repo root on sys.path, and the
    # fixtures are imported as `tests.fixtures.*`.
    sys.path.insert(0, str(REPO_ROOT))

TINY_CHECKPOINT_NAME = "tiny"
SECOND_TINY_CHECKPOINT_NAME = "tiny_b"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip_without_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in gpu_items:
        item.add_marker(skip_without_cuda)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<tmp>/models/Stable-diffusion/` holding tiny.safetensors + tiny.config/ and tiny_b (seed 1) + tiny_b.config/."""
    from tests.fixtures.tiny_sd import build_tiny_sd1_checkpoint

    model_dir = tmp_path_factory.mktemp("webui_root") / "models" / "Stable-diffusion"
    model_dir.mkdir(parents=True)
    build_tiny_sd1_checkpoint(model_dir, name=TINY_CHECKPOINT_NAME, seed=0)
    build_tiny_sd1_checkpoint(model_dir, name=SECOND_TINY_CHECKPOINT_NAME, seed=1)
    return model_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model_dir: Path) -> Path:
    """Path of tiny.safetensors (seed 0, fp16, "tiny" variant) inside tiny_model_dir."""
    return tiny_model_dir / f"{TINY_CHECKPOINT_NAME}.safetensors"


@pytest.fixture(scope="session")
def tiny_sd2_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with tiny SD 2.x and SDXL files in their real single-file layouts, each with a sidecar:
    sd2_eps (random UNet: A1111's v-prediction test says eps), sd2_v (passes that test), sdxl (base)."""
    from tests.fixtures.tiny_sd import build_tiny_sd2_checkpoint, build_tiny_sdxl_checkpoint

    model_dir = tmp_path_factory.mktemp("sd2_sdxl_root") / "models" / "Stable-diffusion"
    model_dir.mkdir(parents=True)
    build_tiny_sd2_checkpoint(model_dir, "sd2_eps", seed=0)
    build_tiny_sd2_checkpoint(model_dir, "sd2_v", seed=1, v_prediction=True)
    build_tiny_sdxl_checkpoint(model_dir, "sdxl", seed=0)
    return model_dir
