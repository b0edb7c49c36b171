"""What the UI needs from the rest of the program, bundled once by the composition root.
Must not import gradio, torch or the engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from webui.app.extensions import ExtensionHost
from webui.app.gallery import GalleryIndex
from webui.app.model_download import BackgroundDownload
from webui.app.network_cards import NetworkCards
from webui.app.queue import GenerationQueue
from webui.app.settings_store import SettingsStore
from webui.app.token_counter import TokenCounter
from webui.core.styles import StyleDatabase


@dataclass(frozen=True)
class UiContext:
    """The long-lived objects built in main.py and handed to every tab's build()."""

    queue: GenerationQueue
    settings: SettingsStore
    gallery: GalleryIndex
    token_counter: TokenCounter
    list_checkpoints: Callable[[], list[str]]
    loaded_checkpoint: Callable[[], tuple[str, str | None] | None]
    where_to_put_checkpoints: str
    outputs_root: Callable[[], Path]
    # Automatic, None, then the files in the VAE folders (A1111's sd_vae choices).
    list_vaes: Callable[[], list[str]]
    # The default-model download offered while no checkpoint exists; None with --no-download-sd-model.
    model_download: BackgroundDownload | None = None
    # The extension host (sections, tabs, settings, the Extensions tab); None: no extensions at all.
    extensions: ExtensionHost | None = None
    # "Reload UI": restarts the server process and answers a message for the user; None where it cannot.
    restart: Callable[[], str] | None = None
    # styles.csv: the styles picker, the Styles cards and their editor; None: no styles.
    styles: StyleDatabase | None = None
    # The extra-networks cards (checkpoints, LoRA, embeddings, styles) and the LoRA look-up by hash for pasting.
    network_cards: NetworkCards | None = None
