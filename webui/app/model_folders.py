"""Where models are looked for: A1111's folder names under the data folder plus the --*-dir flags.
Standard library only; must not import torch, gradio, fastapi or webui.engine/ui/api."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS_SUBDIR = Path("models") / "Stable-diffusion"
VAE_SUBDIR = Path("models") / "VAE"
LORA_SUBDIR = Path("models") / "Lora"
# A1111 also walks models/LyCORIS (--lyco-dir-backcompat), after models/Lora.
LYCORIS_SUBDIR = Path("models") / "LyCORIS"
# A1111 keeps embeddings at DATA_DIR/embeddings; Forge (and our ARCHITECTURE.md) at DATA_DIR/models/embeddings.
EMBEDDINGS_SUBDIRS = (Path("embeddings"), Path("models") / "embeddings")


@dataclass(frozen=True)
class ModelFolders:
    """Folders searched for each kind of model, in search order; the first checkpoint folder receives downloads."""

    checkpoints: list[Path]
    vae: list[Path]
    lora: list[Path]
    embeddings: list[Path]


def _unique(folders: Iterable[Path]) -> list[Path]:
    """Absolute folders without repeats (the same folder given twice, or a flag naming a default folder)."""
    seen: set[Path] = set()
    result: list[Path] = []
    for folder in folders:
        resolved = folder.expanduser().resolve()
        if resolved not in seen:
            seen.add(resolved)
            result.append(resolved)
    return result


def find_model_folders(
    data_dir: Path,
    ckpt_dirs: Iterable[Path] = (),
    vae_dirs: Iterable[Path] = (),
    lora_dirs: Iterable[Path] = (),
    embeddings_dirs: Iterable[Path] = (),
) -> ModelFolders:
    """DATA_DIR's A1111 folders first, then each --*-dir folder in the order given.

    The flags add folders (A1111 adds --ckpt-dir and --vae-dir to its defaults but lets --lora-dir and
    --embeddings-dir replace theirs; adding everywhere is one rule and never hides a model).
    """
    return ModelFolders(
        checkpoints=_unique([data_dir / CHECKPOINTS_SUBDIR, *ckpt_dirs]),
        vae=_unique([data_dir / VAE_SUBDIR, *vae_dirs]),
        lora=_unique([data_dir / LORA_SUBDIR, data_dir / LYCORIS_SUBDIR, *lora_dirs]),
        embeddings=_unique([*(data_dir / subdir for subdir in EMBEDDINGS_SUBDIRS), *embeddings_dirs]),
    )
