"""LoRA/LyCORIS files on disk as A1111 lists them: names, aliases, safetensors metadata, hashes, sidecars, previews.
Reads only file headers (never weights); must not import torch, diffusers, gradio, fastapi or webui.app."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from webui.core.files import HASH_BLOCK_BYTES, write_file_atomically
from webui.engine.families import MAX_HEADER_BYTES
from webui.engine.model_registry import FileHasher, ModelInfo

logger = logging.getLogger(__name__)

# A1111 also lists .pt/.ckpt networks, but only .safetensors ones load here; listing the others would offer cards
# that can never work.
NETWORK_SUFFIX = ".safetensors"
SHORT_HASH_LENGTH = 12
# A1111's SdVersion names (network.py); "Unknown": no training metadata to tell.
SD1, SD2, SDXL, UNKNOWN_VERSION = "SD1", "SD2", "SDXL", "Unknown"
SD_VERSIONS = (UNKNOWN_VERSION, SD1, SD2, SDXL)
# network.py metadata_tags_order: these kohya keys come first in the metadata dict, the rest keep their order.
METADATA_TAGS_ORDER: Mapping[str, int] = MappingProxyType({
    "ss_sd_model_name": 1, "ss_resolution": 2, "ss_clip_skip": 3, "ss_num_train_images": 10, "ss_tag_frequency": 20,
})
# networks.py seeds forbidden_network_aliases with these; "Addams" never matches (lookups lower-case the name), kept
# so the same prompts resolve as in A1111.
SEEDED_FORBIDDEN_ALIASES = frozenset({"none", "Addams"})
# ui_extra_networks.py allowed_preview_extensions; the samples format is added by the caller.
PREVIEW_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")
USER_METADATA_SUFFIX = ".json"
# A1111's user-metadata keys (ui_extra_networks_lora.py LoraUserMetadataEditor.save_lora_user_metadata).
_USER_METADATA_KEYS: Mapping[str, str] = MappingProxyType({
    "description": "description",
    "sd_version": "sd version",
    "activation_text": "activation text",
    "preferred_weight": "preferred weight",
    "negative_text": "negative text",
    "notes": "notes",
})
_NATURAL_SPLIT = re.compile(r"([0-9]+)")


class NetworkFileError(ValueError):
    """A network file whose header cannot be read; the message says why (the file name is added by the caller)."""


@dataclass(frozen=True, eq=False)
class NetworkFile:
    """One network file as A1111's NetworkOnDisk: `name` is the file stem (no folders), `alias` the training
    metadata's `ss_output_name` (else the stem), `folder` the subfolder inside its root ("" at the top), `metadata`
    the safetensors `__metadata__` (JSON-looking strings decoded), `sd_version` detected from it. `error` says why
    the header could not be read; such a file is still listed (metadata empty) and fails when it is used."""

    name: str
    alias: str
    path: Path
    folder: str
    metadata: Mapping[str, object]
    sd_version: str
    mtime: float
    size: int
    error: str | None = None

    @property
    def embedded_short_hash(self) -> str | None:
        """kohya's precomputed `sshs_model_hash` (A1111 prefers it over hashing the file), first 12 characters."""
        value = self.metadata.get("sshs_model_hash")
        return value[:SHORT_HASH_LENGTH].lower() if isinstance(value, str) and value else None


@dataclass(frozen=True)
class UserMetadata:
    """A1111's `<stem>.json` sidecar: what the card editor edits. `sd_version` "" means not set (the file's own is
    used); `preferred_weight` 0 means the default multiplier. `extra` holds the sidecar's other keys, kept when it is
    rewritten. `error` says why an existing sidecar could not be read (the defaults are used then)."""

    description: str = ""
    sd_version: str = ""
    activation_text: str = ""
    preferred_weight: float = 0.0
    negative_text: str = ""
    notes: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)
    error: str | None = None


# -- reading one file ---------------------------------------------------------------------------------------------


def read_safetensors_metadata(path: Path) -> dict[str, object]:
    """A1111's read_metadata_from_safetensors: the header's `__metadata__`, string values that start with "{"
    decoded as JSON when they parse, kohya's main keys first. Reads the header only; NetworkFileError if the file
    is not a complete safetensors file."""
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise NetworkFileError("file is empty or truncated (not a safetensors file)")
        (header_length,) = struct.unpack("<Q", prefix)
        raw_header = file.read(header_length) if 2 <= header_length <= MAX_HEADER_BYTES else b""
    if not raw_header.startswith(b"{"):
        if prefix[:2] == b"PK" or prefix[:1] == b"\x80":
            raise NetworkFileError("this is a pickle file renamed to .safetensors; only safetensors networks load")
        if not 2 <= header_length <= MAX_HEADER_BYTES:
            raise NetworkFileError("not a valid safetensors file (bad header length)")
        if len(raw_header) < header_length:
            raise NetworkFileError("file is truncated (header cut off)")
        raise NetworkFileError("not a valid safetensors file (the header is not JSON)")
    if len(raw_header) < header_length:
        raise NetworkFileError("file is truncated (header cut off)")
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NetworkFileError(f"not a valid safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise NetworkFileError("not a valid safetensors file (the header is not a JSON object)")
    _check_tensor_data(header, path.stat().st_size - 8 - header_length)
    raw_metadata = header.get("__metadata__")
    metadata: dict[str, object] = {}
    for key, value in (raw_metadata.items() if isinstance(raw_metadata, dict) else ()):
        metadata[str(key)] = _decoded(value)
    return dict(sorted(metadata.items(), key=lambda item: METADATA_TAGS_ORDER.get(item[0], 999)))


def _decoded(value: object) -> object:
    # A1111 decodes only strings that look like JSON objects (ss_tag_frequency, ss_bucket_info, ss_dataset_dirs).
    if isinstance(value, str) and value[:1] == "{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _check_tensor_data(header: Mapping[str, object], data_length: int) -> None:
    """A download cut short keeps its header: say so now rather than when the file is applied."""
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)):
            raise NetworkFileError(f"not a valid safetensors file (tensor {name} has no data offsets)")
        if offsets[1] > data_length:
            raise NetworkFileError(
                f"file is truncated ({data_length} data bytes, tensor {name} needs {offsets[1]}); download it again"
            )


def detect_sd_version(metadata: Mapping[str, object]) -> str:
    """A1111's NetworkOnDisk.detect_version from kohya's training metadata."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return SDXL
    if str(metadata.get("ss_v2", "")) == "True":
        return SD2
    if metadata:
        return SD1
    return UNKNOWN_VERSION


def effective_sd_version(file: NetworkFile, user: UserMetadata) -> str:
    """The version the Lora page uses: the sidecar's `sd version` when it names one, else the file's."""
    return user.sd_version if user.sd_version in SD_VERSIONS else file.sd_version


def addnet_hash(path: Path) -> str:
    """A1111's addnet_hash_safetensors: sha256 of everything after the header (8 + N bytes), read in 1 MiB blocks,
    so that editing the metadata does not change the hash."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        file.seek(header_length + 8)
        while block := file.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


# -- sidecars and previews ------------------------------------------------------------------------------------------


def _path_of(file: NetworkFile | Path) -> Path:
    return file.path if isinstance(file, NetworkFile) else Path(file)


def user_metadata_path(file: NetworkFile | Path) -> Path:
    return _path_of(file).with_suffix(USER_METADATA_SUFFIX)


def read_user_metadata(file: NetworkFile | Path) -> UserMetadata:
    """The `<stem>.json` sidecar; without a `description` key, `<stem>.txt` or `<stem>.description.txt` (as A1111).
    A missing sidecar gives the defaults; a broken one the defaults with `error` set (logged)."""
    path = _path_of(file)
    sidecar = user_metadata_path(path)
    data: dict[str, object] = {}
    error: str | None = None
    if sidecar.is_file():
        try:
            loaded = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as raised:
            loaded, error = {}, f"{sidecar.name}: cannot read ({raised})"
        if isinstance(loaded, dict):
            data = {str(key): value for key, value in loaded.items()}
        else:
            error = f"{sidecar.name}: not a JSON object"
        if error is not None:
            logger.warning("lora metadata: %s", error)
    description = data.get("description")
    if not isinstance(description, str):
        description = _description_file_text(path)
    known = set(_USER_METADATA_KEYS.values())
    return UserMetadata(
        description=description,
        sd_version=_text(data.get("sd version")),
        activation_text=_text(data.get("activation text")),
        preferred_weight=_weight(data.get("preferred weight")),
        negative_text=_text(data.get("negative text")),
        notes=_text(data.get("notes")),
        extra={key: value for key, value in data.items() if key not in known},
        error=error,
    )


def _description_file_text(path: Path) -> str:
    base = path.with_suffix("")
    for candidate in (base.with_name(base.name + ".txt"), base.with_name(base.name + ".description.txt")):
        if candidate.is_file():
            try:
                return candidate.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
    return ""


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _weight(value: object) -> float:
    # A1111 stores a float; hand-edited files may hold "0.8" or nothing usable (then the default multiplier).
    if isinstance(value, bool):
        return 0.0
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return 0.0
    return 0.0


def write_user_metadata(file: NetworkFile | Path, meta: UserMetadata) -> Path:
    """Write the sidecar atomically (readers see the old or the new file, never a part), A1111's layout (indent 4,
    UTF-8 text); keys the sidecar had that this editor does not know are kept. Returns the sidecar's path."""
    sidecar = user_metadata_path(file)
    payload: dict[str, object] = {}
    if sidecar.is_file():
        # Re-read so that keys written by another editor since `meta` was read are not lost.
        try:
            existing = json.loads(sidecar.read_text(encoding="utf-8"))
            if isinstance(existing, dict):
                payload.update(existing)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
    payload.update(meta.extra)
    for attribute, key in _USER_METADATA_KEYS.items():
        payload[key] = getattr(meta, attribute)
    write_file_atomically(sidecar, json.dumps(payload, indent=4, ensure_ascii=False).encode("utf-8"))
    return sidecar


def preview_path(file: NetworkFile | Path, extra_extensions: Sequence[str] = ()) -> Path | None:
    """A1111's find_preview: for each extension (png, jpg, jpeg, webp, gif, then `extra_extensions`, e.g. the samples
    format) `<stem>.<ext>`, then `<stem>.preview.<ext>`; the first that exists."""
    base = _path_of(file).with_suffix("")
    for extension in (*PREVIEW_EXTENSIONS, *extra_extensions):
        for suffix in (f".{extension}", f".preview.{extension}"):
            candidate = base.with_name(base.name + suffix)
            if candidate.is_file():
                return candidate
    return None


# -- the folders ----------------------------------------------------------------------------------------------------


def natural_sort_key(text: str) -> list[int | str]:
    """A1111's natural_sort_key: digit runs compare as numbers, the rest case-insensitively."""
    return [int(part) if part.isdigit() else part.lower() for part in _NATURAL_SPLIT.split(text)]


def walk_network_files(root: Path) -> Iterator[Path]:
    """A1111's walk_files order: folders (links followed, each once) by natural order of their path, files in each
    by natural order; `.safetensors` only (extension case-insensitive), hidden files included."""
    if not root.is_dir():
        return
    seen: set[str] = set()
    folders: list[tuple[str, list[str]]] = []
    for directory, subdirectories, names in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            # A link back up the tree: os.walk would loop forever.
            subdirectories.clear()
            continue
        seen.add(real)
        folders.append((directory, names))
    for directory, names in sorted(folders, key=lambda item: natural_sort_key(item[0])):
        for name in sorted(names, key=natural_sort_key):
            if name.lower().endswith(NETWORK_SUFFIX):
                yield Path(directory) / name


FileVersion = tuple[int, int]  # (mtime_ns, size)


@dataclass(frozen=True)
class _Tables:
    """One scan's lookup tables (networks.py's available_networks, available_network_aliases and
    forbidden_network_aliases), swapped in whole so that readers never see half a scan."""

    by_name: Mapping[str, NetworkFile]
    by_alias: Mapping[str, NetworkFile]
    forbidden: frozenset[str]


_EMPTY_TABLES = _Tables(MappingProxyType({}), MappingProxyType({}), SEEDED_FORBIDDEN_ALIASES)


class LoraRegistry:
    """The networks under `roots` (A1111's models/Lora, models/LyCORIS and --lora-dir), in A1111's walk order.

    Thread-safe: scans are serialised and swap their tables in whole; lookups never block on a scan. Headers are
    read once per file version (mtime, size), so a rescan costs a folder walk. Hashes come from `hasher` (A1111's
    addnet hash, cached by path, size and mtime; give it a cache file to keep them across restarts).
    """

    def __init__(self, roots: Sequence[Path], hasher: FileHasher | None = None) -> None:
        self.roots = [Path(root).expanduser().resolve() for root in roots]
        self.hasher = hasher if hasher is not None else FileHasher(digest=addnet_hash)
        self._scan_lock = threading.Lock()
        self._tables = _EMPTY_TABLES
        self._scanned = False
        self._headers: dict[Path, tuple[FileVersion, Mapping[str, object], str | None]] = {}

    # -- scanning ------------------------------------------------------------------------------------------------

    def scan(self) -> list[NetworkFile]:
        """Walk the folders now and return every network, in listing order (A1111's /sdapi/v1/loras order)."""
        with self._scan_lock:
            by_name: dict[str, NetworkFile] = {}
            by_alias: dict[str, NetworkFile] = {}
            forbidden = set(SEEDED_FORBIDDEN_ALIASES)
            headers: dict[Path, tuple[FileVersion, Mapping[str, object], str | None]] = {}
            seen_paths: set[Path] = set()
            for root in self.roots:
                for path in walk_network_files(root):
                    entry = self._entry(root, path, headers, seen_paths)
                    if entry is None:
                        continue
                    # A1111 list_available_networks: a stem seen before is replaced (the later file wins); an alias
                    # (or stem) that is already taken is forbidden, and such names resolve by file name only.
                    by_name[entry.name] = entry
                    if entry.alias in by_alias:
                        forbidden.add(entry.alias.lower())
                    by_alias[entry.name] = entry
                    by_alias[entry.alias] = entry
            self._headers = headers
            self._tables = _Tables(MappingProxyType(by_name), MappingProxyType(by_alias), frozenset(forbidden))
            self._scanned = True
            return list(by_name.values())

    def refresh(self) -> list[NetworkFile]:
        """A1111's refresh (the Lora page button, POST /sdapi/v1/refresh-loras): the same as scan."""
        return self.scan()

    def _entry(
        self, root: Path, path: Path, headers: dict[Path, tuple[FileVersion, Mapping[str, object], str | None]],
        seen_paths: set[Path],
    ) -> NetworkFile | None:
        try:
            resolved = path.resolve()
            stat = resolved.stat()
        except OSError as raised:
            logger.warning("lora: cannot read %s: %s", path, raised)
            return None
        if resolved in seen_paths or not resolved.is_file():
            return None  # the same file reached through two roots (or a link): listed once, under the first
        seen_paths.add(resolved)
        version = (stat.st_mtime_ns, stat.st_size)
        cached = self._headers.get(resolved)
        if cached is not None and cached[0] == version:
            metadata, error = cached[1], cached[2]
        else:
            metadata, error = self._read_header(resolved)
        headers[resolved] = (version, metadata, error)
        name = path.name[: -len(NETWORK_SUFFIX)]
        alias = metadata.get("ss_output_name")
        folder = path.parent.relative_to(root).as_posix()
        return NetworkFile(
            name=name,
            alias=alias if isinstance(alias, str) and alias else name,
            path=resolved,
            folder="" if folder == "." else folder,
            metadata=metadata,
            sd_version=detect_sd_version(metadata),
            mtime=stat.st_mtime,
            size=stat.st_size,
            error=error,
        )

    @staticmethod
    def _read_header(path: Path) -> tuple[Mapping[str, object], str | None]:
        try:
            return MappingProxyType(read_safetensors_metadata(path)), None
        except NetworkFileError as error:
            logger.warning("lora: %s: %s", path.name, error)
            return MappingProxyType({}), str(error)
        except OSError as error:
            logger.warning("lora: %s: cannot read (%s)", path.name, error)
            return MappingProxyType({}), f"cannot read ({error})"

    def _current(self) -> _Tables:
        if not self._scanned:
            self.scan()
        return self._tables

    def files(self) -> list[NetworkFile]:
        """The networks of the last scan (scanning first if there was none), in listing order."""
        return list(self._current().by_name.values())

    # -- names ---------------------------------------------------------------------------------------------------

    def _lookup(self, tables: _Tables, name: str) -> NetworkFile | None:
        if name.lower() in tables.forbidden:
            return tables.by_name.get(name)
        return tables.by_alias.get(name)

    def resolve(self, name: str) -> NetworkFile | None:
        """The network a prompt's `<lora:name:…>` means (A1111's rules: case-sensitive; by alias or stem, by stem
        only when the alias is ambiguous); the folders are rescanned once on a miss. None if there is none."""
        return self.resolve_all([name])[name]

    def resolve_all(self, names: Iterable[str]) -> dict[str, NetworkFile | None]:
        """`resolve` for every name of a prompt, with at most one rescan for all the misses (as A1111)."""
        wanted = list(dict.fromkeys(names))
        tables = self._current()
        found = {name: self._lookup(tables, name) for name in wanted}
        if any(entry is None for entry in found.values()):
            self.scan()
            tables = self._tables
            found = {name: self._lookup(tables, name) for name in wanted}
        return found

    def is_alias_forbidden(self, alias: str) -> bool:
        return alias.lower() in self._current().forbidden

    def preferred_name(self, file: NetworkFile, use_filename: bool = False) -> str:
        """A1111's get_alias: the name a card inserts and a paste rewrites to — the stem when `use_filename`
        (option lora_preferred_name "Filename") or when the alias is ambiguous, else the alias."""
        if use_filename or self.is_alias_forbidden(file.alias):
            return file.name
        return file.alias

    # -- hashes --------------------------------------------------------------------------------------------------

    @staticmethod
    def _info(file: NetworkFile) -> ModelInfo:
        return ModelInfo(file.name, file.path, file.size, file.mtime)

    def cached_short_hash(self, file: NetworkFile) -> str | None:
        """The 12-character hash if already known (metadata or cache); never reads the file."""
        embedded = file.embedded_short_hash
        if embedded is not None:
            return embedded
        digest = self.hasher.cached(self._info(file))
        return digest[:SHORT_HASH_LENGTH] if digest else None

    def short_hash(self, file: NetworkFile) -> str | None:
        """A1111's `Lora hashes` value: `sshs_model_hash` from the metadata, else the addnet hash (computed once
        per file version, then cached), first 12 hex characters; None if the file cannot be read."""
        known = self.cached_short_hash(file)
        if known is not None:
            return known
        try:
            return self.hasher.sha256(self._info(file))[:SHORT_HASH_LENGTH]
        except OSError as error:
            logger.warning("lora: cannot hash %s: %s", file.path, error)
            return None

    def by_short_hash(self, short_hash: str, compute_missing: bool = True) -> NetworkFile | None:
        """The network with this 12-character hash (a pasted `Lora hashes` entry). Known hashes are tried first;
        with `compute_missing` the files never hashed are hashed (once per version, cached) until one matches."""
        wanted = short_hash.strip().lower()[:SHORT_HASH_LENGTH]
        if not wanted:
            return None
        files = self.files()
        unknown: list[NetworkFile] = []
        for file in files:
            known = self.cached_short_hash(file)
            if known is None:
                unknown.append(file)
            elif known == wanted:
                return file
        if compute_missing:
            for file in unknown:
                if self.short_hash(file) == wanted:
                    return file
        return None
