"""What the REST routes need from the rest of the program, bundled once by the composition root.
Must not import torch, the engine, gradio or fastapi."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from webui.app.extensions import ExtensionHost
from webui.app.gallery import GalleryIndex
from webui.app.queue import GenerationQueue
from webui.app.settings_store import SettingsStore
from webui.core.styles import StyleDatabase


@dataclass(frozen=True, slots=True)
class CheckpointListing:
    """A checkpoint file as the API lists it; sha256 only when already known (never hashed for a listing)."""

    name: str  # relative to its model folder, e.g. "anime/model.safetensors"
    filename: str  # absolute path
    stem: str  # file name without folder and extension (the infotext's "Model")
    sha256: str | None


@dataclass(frozen=True, slots=True)
class LoraListing:
    """One entry of A1111's GET /sdapi/v1/loras."""

    name: str  # the file stem
    alias: str  # ss_output_name, else the stem
    path: str  # absolute path
    metadata: Mapping[str, object]  # the safetensors __metadata__, JSON-looking strings decoded


@dataclass(frozen=True, slots=True)
class EmbeddingListing:
    """One embedding as A1111's GET /sdapi/v1/embeddings lists it."""

    step: int | None
    sd_checkpoint: str | None
    sd_checkpoint_name: str | None
    shape: int
    vectors: int


@dataclass(frozen=True, slots=True)
class EmbeddingsListing:
    """Embeddings usable with the loaded model (`loaded`) and the others (`skipped`), by name."""

    loaded: Mapping[str, EmbeddingListing]
    skipped: Mapping[str, EmbeddingListing]


def _no_loras() -> list[LoraListing]:
    return []


def _nothing_to_refresh() -> None:
    return None


def _no_embeddings() -> EmbeddingsListing:
    return EmbeddingsListing({}, {})


@dataclass(frozen=True)
class ApiContext:
    """The long-lived objects built in main.py and handed to the routers."""

    queue: GenerationQueue
    settings: SettingsStore
    gallery: GalleryIndex
    list_checkpoints: Callable[[], list[CheckpointListing]]
    loaded_checkpoint: Callable[[], tuple[str, str | None] | None]  # (name, short hash) of the loaded model
    outputs_root: Callable[[], Path]
    cmd_flags: Mapping[str, object]  # parsed flags with every secret already masked
    version: str
    # (name relative to its VAE folder, absolute path) of every VAE file, for /sdapi/v1/sd-vae and sd_vae.
    list_vae_files: Callable[[], list[tuple[str, str]]]
    # The extension host: alwayson_scripts, /sdapi/v1/extensions, /api/v1/extensions; None: no extensions.
    extensions: ExtensionHost | None = None
    # The LoRA files (cheap: headers are cached per file version) and a rescan of their folders.
    list_loras: Callable[[], list[LoraListing]] = _no_loras
    refresh_loras: Callable[[], None] = _nothing_to_refresh
    # The embeddings as last fitted to the loaded model; a refresh runs as a queue job (RefreshEmbeddingsRequest).
    list_embeddings: Callable[[], EmbeddingsListing] = _no_embeddings
    # styles.csv: /sdapi/v1/prompt-styles and the `styles` of txt2img requests; None: no styles.
    styles: StyleDatabase | None = None
