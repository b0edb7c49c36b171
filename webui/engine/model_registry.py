"""Checkpoint files on disk: scanning the model folders, names, A1111 hashes, and resolving a request.
Touches only the file system and safetensors headers; must not import torch, diffusers, gradio or webui.app."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from webui.core.files import sha256_of_file, write_file_atomically
from webui.core.params import AUTOMATIC_VAE, NO_VAE
from webui.engine.families import CONVERT_HINT, PICKLE_SUFFIXES

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIX = ".safetensors"
VAE_BESIDE_CHECKPOINT_SUFFIX = ".vae.safetensors"
HASH_CACHE_VERSION = 1


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


def legacy_model_hash(path: Path) -> str:
    """A1111's old 8-character hash: sha256 of the 64 KiB at offset 1 MiB (accepted on look-up only)."""
    with path.open("rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]


def scan_safetensors(folders: list[Path], skip_vae_files: bool) -> list[ModelInfo]:
    """Every `*.safetensors` under `folders` (recursively), named relative to its folder, sorted by name.

    A file reached twice (overlapping folders, links) is listed once, under the first folder.
    """
    found: dict[Path, ModelInfo] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob(f"*{CHECKPOINT_SUFFIX}")):
            if (skip_vae_files and path.name.endswith(VAE_BESIDE_CHECKPOINT_SUFFIX)) or not path.is_file():
                continue
            resolved = path.resolve()
            if resolved in found:
                continue
            stat = resolved.stat()
            found[resolved] = ModelInfo(path.relative_to(folder).as_posix(), resolved, stat.st_size, stat.st_mtime)
    return sorted(found.values(), key=lambda info: info.name.lower())


def _lower_this_threads_priority() -> None:
    """Nice 19 for the calling thread only (Linux keeps a nice value per thread); a no-op where that fails."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # no setpriority (Windows), or not allowed
        pass


class FileHasher:
    """Full sha256 of model files, computed once per (path, size, mtime) and kept in a JSON cache file.

    Hashing a 2-7 GB file takes seconds to minutes, so it runs on one background thread when asked
    through `hash_in_background`; `cached` never hashes, so listings and infotexts never wait for it.
    """

    def __init__(self, cache_file: Path | None = None, digest: Callable[[Path], str] = sha256_of_file) -> None:
        self.cache_file = cache_file
        # What is computed per file: the full sha256 by default; LoRAs use A1111's addnet hash (another cache file).
        self.digest = digest
        self._lock = threading.Lock()
        self._by_file: dict[tuple[str, int, float], str] = {}
        self._pending: queue.SimpleQueue[ModelInfo] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._loaded = False

    def _load_locked(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.cache_file is None or not self.cache_file.is_file():
            return
        try:
            payload = json.loads(self.cache_file.read_text(encoding="utf-8"))
            entries = payload["sha256"] if payload.get("version") == HASH_CACHE_VERSION else {}
            for path, entry in entries.items():
                self._by_file[(path, int(entry["size"]), float(entry["mtime"]))] = str(entry["sha256"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            # A damaged cache only costs re-hashing; it must never stop the app.
            logger.warning("ignoring the hash cache %s: %s", self.cache_file, error)

    def _save_locked(self) -> None:
        if self.cache_file is None:
            return
        entries = {
            path: {"size": size, "mtime": mtime, "sha256": digest}
            for (path, size, mtime), digest in sorted(self._by_file.items())
        }
        payload = {"version": HASH_CACHE_VERSION, "sha256": entries}
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomically(self.cache_file, json.dumps(payload, indent=1).encode("utf-8"))
        except OSError as error:
            logger.warning("could not write the hash cache %s: %s", self.cache_file, error)

    @staticmethod
    def _key(info: ModelInfo) -> tuple[str, int, float]:
        return (str(info.path), info.size, info.mtime)

    def cached(self, info: ModelInfo) -> str | None:
        """The full hash if known for this exact file version; never hashes."""
        with self._lock:
            self._load_locked()
            return self._by_file.get(self._key(info))

    def sha256(self, info: ModelInfo) -> str:
        """The full hash, computing it now (blocking) if it is not cached."""
        known = self.cached(info)
        if known is not None:
            return known
        digest = self.digest(info.path)
        with self._lock:
            self._by_file[self._key(info)] = digest
            self._save_locked()
        return digest

    def hash_in_background(self, info: ModelInfo) -> None:
        """Queue `info` for hashing on the background thread, unless its hash is already known."""
        if self.cached(info) is not None:
            return
        with self._lock:
            self._pending.put(info)
            if self._worker is None:
                self._worker = threading.Thread(target=self._hash_pending, name="model-hasher", daemon=True)
                self._worker.start()

    def _hash_pending(self) -> None:
        # Background work at the lowest CPU priority: hashing a file starts with its load and would otherwise
        # take a core from the load's page faults and conversions (measured +1 s on a 2-core machine for SD 1.5).
        _lower_this_threads_priority()
        while True:
            # Checked and cleared under the lock, so a file queued meanwhile always finds a worker.
            with self._lock:
                if self._pending.empty():
                    self._worker = None
                    return
                info = self._pending.get_nowait()
            try:
                self.sha256(info)
            except OSError as error:
                logger.warning("could not hash %s: %s", info.path, error)


class ModelRegistry:
    """The checkpoints under the model folders; full hashes come from a shared FileHasher."""

    def __init__(self, folders: list[Path], hasher: FileHasher | None = None) -> None:
        self.folders = [folder.resolve() for folder in folders]
        self.hasher = hasher or FileHasher()

    def scan(self) -> list[ModelInfo]:
        """Every loadable checkpoint, sorted by name (A1111 lists recursively, skipping *.vae.*)."""
        return scan_safetensors(self.folders, skip_vae_files=True)

    def refused_files(self) -> list[Path]:
        """Pickle checkpoints in the model folders, so the user can be told why they are not listed."""
        refused: list[Path] = []
        for folder in self.folders:
            if folder.is_dir():
                refused.extend(p for p in sorted(folder.rglob("*")) if p.suffix.lower() in PICKLE_SUFFIXES)
        return refused

    def sha256(self, info: ModelInfo) -> str:
        return self.hasher.sha256(info)

    def cached_sha256(self, info: ModelInfo) -> str | None:
        """The full hash if it was already computed for this file version; never hashes (listings stay fast)."""
        return self.hasher.cached(info)

    def short_hash(self, info: ModelInfo) -> str:
        """A1111's 10-character `Model hash` (computes the hash if needed)."""
        return self.sha256(info)[:10]

    def cached_short_hash(self, info: ModelInfo) -> str | None:
        digest = self.hasher.cached(info)
        return digest[:10] if digest else None

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


class VaeNotFoundError(LookupError):
    """No VAE file matches the requested name; the message lists the choices."""


class VaeRegistry:
    """VAE files: `*.safetensors` under the VAE folders (A1111's models/VAE), named relative to their folder."""

    def __init__(self, folders: list[Path], hasher: FileHasher | None = None) -> None:
        self.folders = [folder.resolve() for folder in folders]
        self.hasher = hasher or FileHasher()

    def scan(self) -> list[ModelInfo]:
        return scan_safetensors(self.folders, skip_vae_files=False)

    def choices(self) -> list[str]:
        """What the VAE dropdown offers: Automatic, None, then every file."""
        return [AUTOMATIC_VAE, NO_VAE, *(info.name for info in self.scan())]

    def resolve(self, choice: str, checkpoint: ModelInfo) -> ModelInfo | None:
        """The external VAE file for `choice` with `checkpoint`, or None for the checkpoint's own VAE.

        Automatic: `<checkpoint stem>.vae.safetensors` beside the checkpoint, else the checkpoint's own.
        """
        choice = choice.strip()
        if choice in ("", NO_VAE):
            return None
        if choice == AUTOMATIC_VAE:
            stem = checkpoint.path.name.removesuffix(CHECKPOINT_SUFFIX)
            beside = checkpoint.path.with_name(stem + VAE_BESIDE_CHECKPOINT_SUFFIX)
            if not beside.is_file():
                return None
            stat = beside.stat()
            return ModelInfo(beside.name, beside, stat.st_size, stat.st_mtime)
        for info in self.scan():
            if choice in (info.name, info.path.name, info.name.removesuffix(CHECKPOINT_SUFFIX)):
                return info
        raise VaeNotFoundError(
            f"vae: no VAE named {choice!r} (choices: {', '.join(self.choices())}); "
            f"VAE files go in {', '.join(str(folder) for folder in self.folders) or 'models/VAE'}"
        )
