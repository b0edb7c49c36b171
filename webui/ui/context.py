"""What the UI needs from the rest of the program, bundled once by the composition root.
Must not import gradio, torch or the engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from webui.app.gallery import GalleryIndex
from webui.app.queue import GenerationQueue
from webui.app.settings_store import SettingsStore
from webui.app.token_counter import TokenCounter


@dataclass(frozen=True)
class UiContext:
    """The long-lived objects built in main.py and handed to every tab's build()."""

    queue: GenerationQueue
    settings: SettingsStore
    gallery: GalleryIndex
    token_counter: TokenCounter
    list_checkpoints: Callable[[], list[str]]
    loaded_checkpoint: Callable[[], tuple[str, str] | None]
    where_to_put_checkpoints: str
    outputs_root: Callable[[], Path]
