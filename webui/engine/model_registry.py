"""Checkpoint files on disk: scanning the model folders, names, A1111 hashes, and resolving a request.
Touches only the file system and safetensors headers; must not import torch, diffusers, gradio or webui.app."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from webui.engine.families import CONVERT_HINT, PICKLE_SUFFIXES

CHECKPOINT_SUFFIX = ".safetensors"
HASH_BLOCK_BYTES = 1024 * 1024


class CheckpointNotFoundError(LookupError):
    """No checkpoint matches the requested name, path or hash; the message lists where we looked."""


class RefusedCheckpointError(ValueError):
    """The file exists but will not be loaded (pickle format, outside the model folders)."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A checkpoint file as A1111 names it: `name` is relative to its model folder, `stem` has no extension."""

    name: str
    path: Path
    size: int
    mtime: float

    @property
    def stem(self) -> str:
        """A1111's name_for_extra: the file name without folders and extension (the infotext `Model`)."""
        return Path(self.name).name.removesuffix(CHECKPOINT_SUFFIX)


def sha256_of_file(path: Path) -> str:
    """Full-file sha256 (A1111's model hash is its first 10 hex characters)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def legacy_model_hash(path: Path) -> str:
    """A1111's old 8-character hash: sha256 of the 64 KiB at offset 1 MiB (accepted on look-up only)."""
    with path.open("rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]


class ModelRegistry:
    """The checkpoints under the model folders; full hashes are computed once per (path, size, mtime)."""

    def __init__(self, folders: list[Path]) -> None:
        self.folders = [folder.resolve() for folder in folders]
        self._sha256_by_file: dict[tuple[Path, int, float], str] = {}

    def scan(self) -> list[ModelInfo]:
        """Every loadable checkpoint, sorted by name (A1111 lists recursively, skipping *.vae.*)."""
        found: dict[Path, ModelInfo] = {}
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob(f"*{CHECKPOINT_SUFFIX}")):
                if path.name.endswith(f".vae{CHECKPOINT_SUFFIX}") or not path.is_file():
                    continue
                resolved = path.resolve()
                if resolved in found:
                    continue
                stat = resolved.stat()
                name = path.relative_to(folder).as_posix()
                found[resolved] = ModelInfo(name, resolved, stat.st_size, stat.st_mtime)
        return sorted(found.values(), key=lambda info: info.name.lower())

    def refused_files(self) -> list[Path]:
        """Pickle checkpoints in the model folders, so the user can be told why they are not listed."""
        refused: list[Path] = []
        for folder in self.folders:
            if folder.is_dir():
                refused.extend(p for p in sorted(folder.rglob("*")) if p.suffix.lower() in PICKLE_SUFFIXES)
        return refused

    def sha256(self, info: ModelInfo) -> str:
        key = (info.path, info.size, info.mtime)
        if key not in self._sha256_by_file:
            self._sha256_by_file[key] = sha256_of_file(info.path)
        return self._sha256_by_file[key]

    def cached_sha256(self, info: ModelInfo) -> str | None:
        """The full hash if it was already computed for this file version; never hashes (listings stay fast)."""
        return self._sha256_by_file.get((info.path, info.size, info.mtime))

    def short_hash(self, info: ModelInfo) -> str:
        """A1111's 10-character `Model hash`."""
        return self.sha256(info)[:10]

    def where_to_put_checkpoints(self) -> str:
        folders = ", ".join(str(folder) for folder in self.folders)
        return f"put a Stable Diffusion .safetensors checkpoint in {folders}"

    def resolve(self, query: str, allow_outside_paths: bool = False) -> ModelInfo:
        """The checkpoint a user meant: a path, a name in a model folder, a name without extension,
        A1111's 10-character short hash or its legacy 8-character hash.

        Requests from the network pass allow_outside_paths=False, so a name can only ever reach a
        file inside the model folders.
        """
        query = query.strip()
        if not query:
            raise CheckpointNotFoundError("checkpoint: no checkpoint name given")
        if allow_outside_paths:
            candidate = Path(query).expanduser()
            if candidate.is_file():
                return self._info_for_path(candidate.resolve())
        models = self.scan()
        wanted = query.replace(os.sep, "/")
        for info in models:
            if wanted in (info.name, info.name.removesuffix(CHECKPOINT_SUFFIX)):
                return info
        for info in models:
            if wanted in (info.path.name, info.stem):
                return info
        self._refuse_pickle_names(query)
        lowered = query.lower()
        if len(lowered) in (8, 10) and all(char in "0123456789abcdef" for char in lowered):
            for info in models:
                if len(lowered) == 10 and self.short_hash(info) == lowered:
                    return info
                if len(lowered) == 8 and legacy_model_hash(info.path) == lowered:
                    return info
        available = ", ".join(info.name for info in models) or "none"
        raise CheckpointNotFoundError(
            f"checkpoint: no checkpoint matches {query!r} (available: {available}); "
            + self.where_to_put_checkpoints()
        )

    def _refuse_pickle_names(self, query: str) -> None:
        for path in self.refused_files():
            if query in (path.name, path.stem):
                raise RefusedCheckpointError(f"checkpoint: {path.name} is a pickle file. {CONVERT_HINT}")

    def _info_for_path(self, path: Path) -> ModelInfo:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise RefusedCheckpointError(f"checkpoint: {path.name} is a pickle file. {CONVERT_HINT}")
        if path.suffix.lower() != CHECKPOINT_SUFFIX:
            raise RefusedCheckpointError(f"checkpoint: {path.name} is not a .safetensors file")
        stat = path.stat()
        name = path.name
        for folder in self.folders:
            if path.is_relative_to(folder):
                name = path.relative_to(folder).as_posix()
        return ModelInfo(name, path, stat.st_size, stat.st_mtime)
