"""What the extra-networks cards show: one Card per checkpoint, LoRA, embedding and style (name, folder, date, family,
preview, the text a click inserts), the LoRA info view (kohya `ss_*` training metadata, the `<stem>.json` sidecar) and
the picture files a preview route may serve. Must not import gradio, fastapi, torch, webui.ui or webui.api."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from webui.core.params import ParamError
from webui.core.styles import Style, StyleDatabase
from webui.engine.families import CheckpointFormatError, detect_family, read_safetensors_header
from webui.engine.model_registry import ModelInfo, ModelRegistry
from webui.engine.networks.registry import (
    LoraRegistry,
    NetworkFile,
    UserMetadata,
    effective_sd_version,
    preview_path,
    read_user_metadata,
    write_user_metadata,
)

CHECKPOINTS = "checkpoints"
LORA = "lora"
TEXTUAL_INVERSION = "textual_inversion"
STYLES = "styles"
KINDS = (CHECKPOINTS, LORA, TEXTUAL_INVERSION, STYLES)
KIND_LABELS = {CHECKPOINTS: "Checkpoints", LORA: "Lora", TEXTUAL_INVERSION: "Textual Inversion", STYLES: "Styles"}
# Kinds whose cards are files in model folders (styles are rows of styles.csv).
FILE_KINDS = (CHECKPOINTS, LORA, TEXTUAL_INVERSION)

# A1111's allowed_preview_extensions(): `<stem>.<ext>` or `<stem>.preview.<ext>`, in this order.
PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
UNKNOWN_VERSION = "Unknown"
# A1111's extra_networks_default_multiplier: the weight of a card click when the sidecar names none (or 0).
DEFAULT_MULTIPLIER = 1.0
# A1111's extra_networks_add_text_separator, put before inserted text.
TEXT_SEPARATOR = " "
TOP_TAGS = 20
# Sidecar texts are typed by hand; anything longer is not an activation text but a pasted file.
MAX_SIDECAR_TEXT = 8192
MAX_PREFERRED_WEIGHT = 100.0
# Embedding width → A1111 sd_version: SD1's CLIP-L and SD2's OpenCLIP-H (SDXL files carry clip_l/clip_g keys).
EMBEDDING_WIDTH_VERSIONS = {768: "SD1", 1024: "SD2"}

# kohya training metadata shown in the info view, in A1111's order (ss_sd_model_name, ss_resolution, ... first).
TRAINING_FIELDS: tuple[tuple[str, str], ...] = (
    ("ss_sd_model_name", "Base model"),
    ("ss_base_model_version", "Base model version"),
    ("ss_resolution", "Resolution"),
    ("ss_clip_skip", "Clip skip"),
    ("ss_num_train_images", "Training images"),
    ("ss_network_module", "Network module"),
    ("ss_network_dim", "Network dim"),
    ("ss_network_alpha", "Network alpha"),
    ("ss_output_name", "Output name"),
    ("ss_epoch", "Epoch"),
    ("ss_steps", "Steps"),
    ("ss_learning_rate", "Learning rate"),
    ("ss_training_started_at", "Training started"),
)


@dataclass(frozen=True)
class PreviewFile:
    """A preview picture as the preview route names it: the kind's model folder (index) and the path inside it."""

    kind: str
    root: int
    relative: str
    mtime: float


@dataclass(frozen=True)
class Card:
    """One card as the page shows it; `id` is unique within its kind (a file's path relative to its folder)."""

    kind: str
    id: str
    name: str
    folder: str
    mtime: float
    sd_version: str
    preview: PreviewFile | None
    # Lowercased words the search box matches (name, alias, folder, activation text, description).
    search_text: str
    # What a click inserts into the prompt / negative prompt (Lora and Textual Inversion); empty otherwise.
    prompt_text: str = ""
    negative_text: str = ""
    description: str = ""
    # Styles: the style's own texts, shown on the card.
    style_prompt: str = ""
    style_negative: str = ""
    # Why the loaded model cannot use it, when the engine said so (an embedding of another width).
    misfit_note: str = ""


@dataclass(frozen=True)
class CardList:
    """The cards of one kind, and the family of the loaded model they were judged against (None: none loaded)."""

    kind: str
    cards: list[Card]
    loaded_version: str | None

    def fits(self, card: Card) -> bool:
        """False for a network made for another family than the loaded model's (A1111 hides those; we mark them)."""
        if card.misfit_note:
            return False
        if card.kind not in (LORA, TEXTUAL_INVERSION) or self.loaded_version is None:
            return True
        return card.sd_version in (UNKNOWN_VERSION, "", self.loaded_version)

    def folders(self) -> list[str]:
        """Every folder that holds a card, with its parents ("a/b" gives "a" and "a/b"), sorted."""
        found: set[str] = set()
        for card in self.cards:
            parts = PurePosixPath(card.folder).parts if card.folder else ()
            for depth in range(1, len(parts) + 1):
                found.add("/".join(parts[:depth]))
        return sorted(found, key=str.lower)

    def order_by_name(self) -> list[Card]:
        return sorted(self.cards, key=lambda card: (not self.fits(card), card.name.lower(), card.id))

    def order_by_date(self) -> list[Card]:
        """Newest first."""
        return sorted(self.cards, key=lambda card: (not self.fits(card), -card.mtime, card.name.lower()))


@dataclass(frozen=True)
class LoraDetails:
    """The info view of one LoRA card: file facts, the kohya training metadata and the editable sidecar."""

    card_id: str
    name: str
    alias: str
    file_name: str
    size: int
    sd_version: str
    training: list[tuple[str, str]]
    top_tags: list[tuple[str, int]]
    user: UserMetadata


def format_weight(weight: float) -> str:
    """1.0 → "1", 0.75 → "0.75": what A1111's JS prints for a number."""
    return f"{weight:g}"


def lora_prompt_text(name: str, user: UserMetadata, default_multiplier: float = DEFAULT_MULTIPLIER) -> str:
    """`<lora:NAME:W>` with the sidecar's preferred weight (0 = the default), then " activation text"."""
    weight = user.preferred_weight or default_multiplier
    text = f"<lora:{name}:{format_weight(weight)}>"
    if user.activation_text.strip():
        text += TEXT_SEPARATOR + user.activation_text.strip()
    return text


def lora_negative_text(user: UserMetadata) -> str:
    """A1111 wraps the sidecar's negative text as `(text:1)`, so a second click can find and remove it."""
    negative = user.negative_text.strip()
    return f"({negative}:1)" if negative else ""


def _decoded(value: object) -> object:
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def top_tags(metadata: Mapping[str, object], limit: int = TOP_TAGS) -> list[tuple[str, int]]:
    """The most frequent training tags over every dataset folder of `ss_tag_frequency`, most frequent first."""
    frequency = _decoded(metadata.get("ss_tag_frequency"))
    totals: dict[str, int] = {}
    if isinstance(frequency, Mapping):
        for tags in frequency.values():
            if not isinstance(tags, Mapping):
                continue
            for tag, count in tags.items():
                try:
                    totals[str(tag).strip()] = totals.get(str(tag).strip(), 0) + int(count)
                except (TypeError, ValueError):
                    continue
    ranked = sorted(((tag, count) for tag, count in totals.items() if tag), key=lambda item: (-item[1], item[0]))
    return ranked[:limit]


def _training_value(key: str, value: object) -> str:
    if key == "ss_training_started_at":
        try:
            stamp = float(str(value))
        except ValueError:
            return str(value)
        return datetime.datetime.fromtimestamp(stamp, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if key == "ss_resolution":
        numbers = re.findall(r"\d+", str(value))
        if len(numbers) == 2:
            return f"{numbers[0]}x{numbers[1]}"
    return str(value)


def training_summary(metadata: Mapping[str, object]) -> list[tuple[str, str]]:
    """(label, value) of the kohya fields present, in TRAINING_FIELDS order."""
    rows: list[tuple[str, str]] = []
    for key, label in TRAINING_FIELDS:
        value = metadata.get(key)
        if value is None or str(value).strip() in ("", "None"):
            continue
        rows.append((label, _training_value(key, value)))
    return rows


def embedding_version(path: Path) -> str:
    """An embedding's family from its safetensors header (vector width, SDXL's clip_l/clip_g); Unknown otherwise
    (a .pt/.bin needs unpickling to be read, which the card listing never does)."""
    if path.suffix.lower() != ".safetensors":
        return UNKNOWN_VERSION
    try:
        tensors = read_safetensors_header(path)
    except (CheckpointFormatError, OSError, ValueError):
        return UNKNOWN_VERSION
    if "clip_l" in tensors and "clip_g" in tensors:
        return "SDXL"
    vectors = tensors.get("emb_params")
    if vectors is None and len(tensors) == 1:
        vectors = next(iter(tensors.values()))
    if vectors is not None and vectors.shape:
        return EMBEDDING_WIDTH_VERSIONS.get(vectors.shape[-1], UNKNOWN_VERSION)
    return UNKNOWN_VERSION


@dataclass(frozen=True)
class EmbeddingFile:
    name: str
    path: Path
    root: int
    relative: str
    mtime: float


def scan_embedding_files(roots: Sequence[Path]) -> list[EmbeddingFile]:
    """Embedding files under `roots` (recursively, links followed), as the embedding database finds them."""
    found: dict[str, EmbeddingFile] = {}
    for index, root in enumerate(roots):
        if not root.is_dir():
            continue
        for directory, subdirectories, names in os.walk(root, followlinks=True):
            subdirectories.sort()
            for file_name in sorted(names):
                path = Path(directory) / file_name
                if path.suffix.lower() not in EMBEDDING_SUFFIXES or file_name.startswith("."):
                    continue
                try:
                    stat = path.stat()
                except OSError:
                    continue
                if stat.st_size == 0:
                    continue  # A1111 skips empty files (a download still being written)
                # The same name in two folders: the later file wins, as the embedding database does.
                found[path.stem] = EmbeddingFile(path.stem, path, index, path.relative_to(root).as_posix(),
                                                 stat.st_mtime)
    return sorted(found.values(), key=lambda item: item.name.lower())


def _folder_of(relative: str) -> str:
    parent = PurePosixPath(relative).parent.as_posix()
    return "" if parent == "." else parent


def _search_text(*parts: str) -> str:
    return " ".join(part.lower() for part in parts if part)


class NetworkCards:
    """The card listings of every kind, the LoRA info view and sidecar edits, and the preview files they name.

    Listings read the folders when asked (the registries cache headers per file version), so Refresh shows what is
    there now; the family check uses the checkpoint loaded at that moment.
    """

    def __init__(
        self,
        checkpoints: ModelRegistry,
        loras: LoraRegistry,
        embedding_folders: Sequence[Path],
        styles: StyleDatabase | None,
        loaded_checkpoint: Callable[[], tuple[str, str | None] | None],
        embedding_misfits: Callable[[], Mapping[str, str]] = dict,
        default_multiplier: Callable[[], float] = lambda: DEFAULT_MULTIPLIER,
    ) -> None:
        self._checkpoints = checkpoints
        self._loras = loras
        self._roots: dict[str, list[Path]] = {
            CHECKPOINTS: [Path(folder).resolve() for folder in checkpoints.folders],
            LORA: list(loras.roots),
            TEXTUAL_INVERSION: [Path(folder).resolve() for folder in embedding_folders],
        }
        self._styles = styles
        self._loaded_checkpoint = loaded_checkpoint
        # Embeddings the engine skipped for the loaded model (name → why); empty before the first job.
        self._embedding_misfits = embedding_misfits
        self._default_multiplier = default_multiplier
        self._lock = threading.Lock()
        # Family by file version: reading a header is cheap but not free with hundreds of files.
        self._checkpoint_versions: dict[tuple[Path, int, float], str] = {}
        self._embedding_versions: dict[tuple[Path, float], str] = {}

    # ------------------------------------------------------------------ listings

    def listing(self, kind: str, refresh: bool = False) -> CardList:
        if kind == CHECKPOINTS:
            cards = self._checkpoint_cards()
        elif kind == LORA:
            cards = self._lora_cards(refresh)
        elif kind == TEXTUAL_INVERSION:
            cards = self._embedding_cards()
        elif kind == STYLES:
            cards = self._style_cards(refresh)
        else:
            raise ParamError("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
        return CardList(kind, cards, self.loaded_version())

    def loaded_version(self) -> str | None:
        """A1111's sd_version name ("SD1", "SD2", "SDXL") of the loaded checkpoint; None when none is loaded."""
        loaded = self._loaded_checkpoint()
        if loaded is None:
            return None
        for info in self._checkpoints.scan():
            if info.name == loaded[0]:
                version = self._checkpoint_version(info)
                return None if version == UNKNOWN_VERSION else version
        return None

    def _checkpoint_version(self, info: ModelInfo) -> str:
        key = (info.path, info.size, info.mtime)
        with self._lock:
            known = self._checkpoint_versions.get(key)
        if known is not None:
            return known
        try:
            version = detect_family(info.path, read_safetensors_header(info.path)).a1111_version
        except (CheckpointFormatError, OSError, ValueError):
            version = UNKNOWN_VERSION
        with self._lock:
            self._checkpoint_versions[key] = version
        return version

    def _preview(self, kind: str, model_path: Path, found: Path | None = None) -> PreviewFile | None:
        picture = found if found is not None else preview_path(model_path)
        if picture is None:
            return None
        resolved = picture.resolve()
        for index, root in enumerate(self._roots[kind]):
            if resolved.is_relative_to(root):
                return PreviewFile(kind, index, resolved.relative_to(root).as_posix(), resolved.stat().st_mtime)
        return None

    def _checkpoint_cards(self) -> list[Card]:
        return [
            Card(kind=CHECKPOINTS, id=info.name, name=info.stem, folder=_folder_of(info.name), mtime=info.mtime,
                 sd_version=self._checkpoint_version(info), preview=self._preview(CHECKPOINTS, info.path),
                 search_text=_search_text(info.name, info.stem))
            for info in self._checkpoints.scan()
        ]

    def _lora_files(self, refresh: bool) -> list[NetworkFile]:
        return self._loras.refresh() if refresh else self._loras.files()

    def _lora_cards(self, refresh: bool) -> list[Card]:
        multiplier = self._default_multiplier()
        cards = []
        for file in self._lora_files(refresh):
            user = read_user_metadata(file)
            cards.append(Card(
                kind=LORA, id=self._relative_id(LORA, file.path), name=file.name, folder=file.folder,
                mtime=file.mtime, sd_version=effective_sd_version(file, user),
                preview=self._preview(LORA, file.path, preview_path(file)),
                search_text=_search_text(file.name, file.alias, file.folder, user.activation_text, user.description),
                # A1111's get_alias: the alias unless ambiguous, so the tag finds this very file again.
                prompt_text=lora_prompt_text(self._loras.preferred_name(file), user, multiplier),
                negative_text=lora_negative_text(user), description=user.description,
            ))
        return cards

    def _relative_id(self, kind: str, path: Path) -> str:
        """`<folder index>/<path inside it>`: unique even when two folders hold files of the same name."""
        resolved = path.resolve()
        for index, root in enumerate(self._roots[kind]):
            if resolved.is_relative_to(root):
                return f"{index}/{resolved.relative_to(root).as_posix()}"
        return f"-/{path.name}"

    def _embedding_cards(self) -> list[Card]:
        misfits = self._embedding_misfits()
        cards = []
        for item in scan_embedding_files(self._roots[TEXTUAL_INVERSION]):
            key = (item.path, item.mtime)
            with self._lock:
                version = self._embedding_versions.get(key)
            if version is None:
                version = embedding_version(item.path)
                with self._lock:
                    self._embedding_versions[key] = version
            cards.append(Card(
                kind=TEXTUAL_INVERSION, id=f"{item.root}/{item.relative}", name=item.name,
                folder=_folder_of(item.relative), mtime=item.mtime, sd_version=version,
                preview=self._preview(TEXTUAL_INVERSION, item.path),
                search_text=_search_text(item.name, item.relative), prompt_text=item.name,
                misfit_note=misfits.get(item.name, ""),
            ))
        return cards

    def _style_cards(self, refresh: bool) -> list[Card]:
        if self._styles is None:
            return []
        if refresh:
            self._styles.reload()
        return [
            Card(kind=STYLES, id=style.name, name=style.name, folder="", mtime=0.0, sd_version="", preview=None,
                 search_text=_search_text(style.name, style.prompt or "", style.negative_prompt or ""),
                 style_prompt=style.prompt or "", style_negative=style.negative_prompt or "")
            for style in self._styles.styles() if not style.is_divider
        ]

    # ------------------------------------------------------------------ LoRA info view and sidecar

    def _lora_file(self, card_id: str) -> NetworkFile:
        for file in self._lora_files(refresh=False):
            if self._relative_id(LORA, file.path) == card_id:
                return file
        raise ParamError("Lora", f"{card_id.partition('/')[2] or card_id} is no longer in the Lora folders; "
                         "press Refresh")

    def lora_details(self, card_id: str) -> LoraDetails:
        file = self._lora_file(card_id)
        user = read_user_metadata(file)
        return LoraDetails(
            card_id=card_id, name=file.name, alias=file.alias, file_name=file.path.name, size=file.size,
            sd_version=effective_sd_version(file, user), training=training_summary(file.metadata),
            top_tags=top_tags(file.metadata), user=user,
        )

    def save_lora_metadata(
        self, card_id: str, activation_text: str, preferred_weight: float | None, negative_text: str,
        description: str,
    ) -> LoraDetails:
        """Write the edited fields into `<stem>.json` (atomically), keeping every other key of the sidecar."""
        for field_name, text in (("activation text", activation_text), ("negative text", negative_text),
                                 ("description", description)):
            if len(text or "") > MAX_SIDECAR_TEXT:
                raise ParamError(field_name, f"must be at most {MAX_SIDECAR_TEXT} characters")
        weight = 0.0 if preferred_weight is None else float(preferred_weight)
        if not math.isfinite(weight) or abs(weight) > MAX_PREFERRED_WEIGHT:
            raise ParamError("preferred weight", f"must be a number between -{MAX_PREFERRED_WEIGHT:g} and "
                             f"{MAX_PREFERRED_WEIGHT:g} (0 uses the default)")
        file = self._lora_file(card_id)
        current = read_user_metadata(file)
        edited = replace(current, activation_text=activation_text or "", preferred_weight=weight,
                         negative_text=negative_text or "", description=description or "")
        write_user_metadata(file, edited)
        return self.lora_details(card_id)

    # ------------------------------------------------------------------ look-ups for pasting and the preview route

    def lora_name_by_hash(self, short_hash: str) -> str | None:
        """The name a pasted `<lora:NAME:` should use for the local file with this 12-hex short hash."""
        file = self._loras.by_short_hash(short_hash)
        return self._loras.preferred_name(file) if file is not None else None

    def style(self, name: str) -> Style | None:
        style = self._styles.get(name) if self._styles is not None else None
        return None if style is None or style.is_divider else style

    def preview_file(self, kind: str, root: int, relative: str) -> Path | None:
        """The picture a preview URL names, or None: it must resolve inside that kind's model folder (no `..`,
        no link out) and be a picture file; anything else is refused alike, so nothing about the disk leaks."""
        roots = self._roots.get(kind)
        if roots is None or not 0 <= root < len(roots) or not relative or "\x00" in relative:
            return None
        if PurePosixPath(relative).suffix.lower() not in PREVIEW_SUFFIXES:
            return None
        folder = roots[root]
        try:
            candidate = (folder / relative).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        if not candidate.is_relative_to(folder) or candidate.suffix.lower() not in PREVIEW_SUFFIXES:
            return None
        return candidate if candidate.is_file() else None
