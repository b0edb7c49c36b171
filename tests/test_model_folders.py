"""Model folders from the command line: A1111's names under --data-dir, and --ckpt-dir/--vae-dir/--lora-dir/
--embeddings-dir pointing at an existing A1111 install (a fake one in tmp, with real safetensors files)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from webui.app.model_folders import find_model_folders
from webui.cli import build_parser
from webui.engine.model_registry import ModelRegistry
from webui.main import model_folders, public_flags


@pytest.fixture()
def a1111(tmp_path: Path) -> Path:
    """An A1111 install's data layout: one checkpoint, VAE, LoRA and embedding, each a real safetensors file."""
    root = tmp_path / "stable-diffusion-webui"
    files = {
        "models/Stable-diffusion/sd15/realistic.safetensors": "model.diffusion_model.out.2.bias",
        "models/VAE/vae-ft-mse.safetensors": "decoder.conv_out.bias",
        "models/Lora/detail.safetensors": "lora_unet_down.alpha",
        "embeddings/bad-hands.safetensors": "emb_params",
    }
    for relative, key in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({key: np.zeros(4, dtype=np.float32)}, str(path))
    return root


def parse(*argv: str) -> argparse.Namespace:
    return build_parser(Path("/nonexistent-default")).parse_args(list(argv))


def test_data_dir_pointing_at_an_a1111_install_finds_its_models(a1111: Path) -> None:
    folders = model_folders(parse("--data-dir", str(a1111)))
    assert folders.checkpoints == [a1111 / "models" / "Stable-diffusion"]
    assert folders.vae == [a1111 / "models" / "VAE"]
    assert folders.lora == [a1111 / "models" / "Lora", a1111 / "models" / "LyCORIS"]
    assert folders.embeddings == [a1111 / "embeddings", a1111 / "models" / "embeddings"]
    names = [info.name for info in ModelRegistry(folders.checkpoints).scan()]
    assert names == ["sd15/realistic.safetensors"]


@pytest.mark.parametrize("flags_after_subcommand", [False, True])
def test_dir_flags_add_the_a1111_folders_after_our_own(a1111: Path, tmp_path: Path, flags_after_subcommand: bool) -> None:
    ours = tmp_path / "ours"
    flags = [
        "--data-dir", str(ours),
        "--ckpt-dir", str(a1111 / "models" / "Stable-diffusion"),
        "--vae-dir", str(a1111 / "models" / "VAE"),
        "--lora-dir", str(a1111 / "models" / "Lora"),
        "--embeddings-dir", str(a1111 / "embeddings"),
    ]
    argv = ["txt2img", "--prompt", "x", *flags] if flags_after_subcommand else [*flags, "txt2img", "--prompt", "x"]
    folders = model_folders(parse(*argv))
    assert folders.checkpoints == [ours / "models" / "Stable-diffusion", a1111 / "models" / "Stable-diffusion"]
    assert folders.vae == [ours / "models" / "VAE", a1111 / "models" / "VAE"]
    assert folders.lora == [ours / "models" / "Lora", ours / "models" / "LyCORIS", a1111 / "models" / "Lora"]
    assert folders.embeddings == [ours / "embeddings", ours / "models" / "embeddings", a1111 / "embeddings"]
    assert [info.name for info in ModelRegistry(folders.checkpoints).scan()] == ["sd15/realistic.safetensors"]


def test_dir_flags_repeat_and_a_folder_named_twice_is_searched_once(a1111: Path, tmp_path: Path) -> None:
    extra = tmp_path / "more-vaes"
    args = parse("--data-dir", str(a1111), "--vae-dir", str(extra), "--vae-dir", str(a1111 / "models" / "VAE"),
                 "--vae-dir", str(extra / ".." / "more-vaes"))
    assert model_folders(args).vae == [a1111 / "models" / "VAE", extra]


def test_the_first_checkpoint_folder_is_the_one_downloads_go_to(tmp_path: Path) -> None:
    folders = find_model_folders(tmp_path / "data", ckpt_dirs=[tmp_path / "shared"])
    assert folders.checkpoints[0] == tmp_path / "data" / "models" / "Stable-diffusion"


def test_cmd_flags_list_every_folder_flag_as_json(a1111: Path, tmp_path: Path) -> None:
    args = parse("--data-dir", str(tmp_path), "--ckpt-dir", str(a1111 / "models" / "Stable-diffusion"),
                 "--lora-dir", str(a1111 / "models" / "Lora"))
    flags = json.loads(json.dumps(public_flags(args)))
    assert flags["ckpt_dir"] == [str(a1111 / "models" / "Stable-diffusion")]
    assert flags["lora_dir"] == [str(a1111 / "models" / "Lora")]
    assert flags["vae_dir"] == [] and flags["embeddings_dir"] == []
