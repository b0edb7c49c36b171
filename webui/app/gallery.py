"""The gallery index: every image under the outputs folder, newest first, paged and filtered from memory.
Must not import torch, gradio or fastapi; beyond the standard library only webui.core, webui.app.outputs and PIL."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from webui.app.outputs import read_infotext
from webui.core.files import write_file_atomically
from webui.core.infotext import parse_infotext

_LOGGER = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
DEFAULT_PAGE_SIZE = 24
# Bumped whenever the cache layout changes; an unknown version is ignored, never misread.
CACHE_VERSION = 1
# A1111's per-day sub-folders are named by [date] (YYYY-MM-DD).
_DAY_FOLDER_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class GalleryEntry:
    """One indexed image and what the gallery shows and filters on."""

    path: Path
    mtime: float
    day: str  # YYYY-MM-DD: the date folder's name if it has that form, else the file's local mtime date
    prompt: str
    negative_prompt: str
    model: str | None
    infotext: str | None


@dataclass(frozen=True)
class GalleryPage:
    """One page of a filtered listing; `page` is 0-based and already clamped into range."""

    entries: tuple[GalleryEntry, ...]
    page: int
    page_count: int
    total: int


@dataclass(frozen=True, slots=True)
class _Record:
    """An entry plus what tells whether its file changed, and its prepared search text."""

    entry: GalleryEntry
    relative: str
    size: int
    mtime_ns: int
    search_text: str


@dataclass(frozen=True, slots=True)
class _FileState:
    """What one directory listing says about a file: enough to tell whether it changed."""

    relative: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class _Described:
    """What the infotext of one file says, as stored in the cache."""

    infotext: str | None
    prompt: str
    negative_prompt: str
    model: str | None


def _describe(infotext: str | None) -> _Described:
    if not infotext:
        return _Described(infotext, "", "", None)
    try:
        parsed = parse_infotext(infotext)
    except ValueError:
        # Text from other software may not be A1111 infotext at all; it is still searchable.
        return _Described(infotext, infotext, "", None)
    return _Described(infotext, parsed.prompt, parsed.negative_prompt, parsed.fields.get("Model") or None)


def _read_description(path: Path) -> _Described:
    try:
        infotext = read_infotext(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # Pillow reports damaged or half-copied files with these; the file is listed without text.
        _LOGGER.debug("no infotext from %s: %s", path, error)
        infotext = None
    return _describe(infotext)


def _day_of(relative: str, mtime: float) -> str:
    parts = relative.split("/")
    if len(parts) >= 2 and _DAY_FOLDER_PATTERN.fullmatch(parts[-2]):
        try:
            return datetime.date.fromisoformat(parts[-2]).isoformat()
        except ValueError:
            pass  # "2024-13-45" has the form but is no date
    return datetime.date.fromtimestamp(mtime).isoformat()


def _record(root: Path, state: _FileState, described: _Described) -> _Record:
    mtime = state.mtime_ns / 1e9
    entry = GalleryEntry(
        path=root.joinpath(*state.relative.split("/")),
        mtime=mtime,
        day=_day_of(state.relative, mtime),
        prompt=described.prompt,
        negative_prompt=described.negative_prompt,
        model=described.model,
        infotext=described.infotext,
    )
    search_text = f"{described.prompt}\n{described.negative_prompt}".casefold()
    return _Record(entry, state.relative, state.size, state.mtime_ns, search_text)


def _scan(root: Path) -> dict[str, _FileState]:
    """Every image file under `root`, keyed by its '/'-separated path relative to `root`."""
    found: dict[str, _FileState] = {}
    pending: list[tuple[Path, str]] = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            listing = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        with listing:
            for item in listing:
                # Dot names are temp files of atomic writes and tool folders, never outputs.
                if item.name.startswith("."):
                    continue
                relative = f"{prefix}{item.name}"
                try:
                    # Symbolic links are not followed: they could point outside the outputs folder.
                    if item.is_dir(follow_symlinks=False):
                        pending.append((Path(item.path), f"{relative}/"))
                        continue
                    if not item.is_file(follow_symlinks=False):
                        continue
                    if os.path.splitext(item.name)[1].lower() not in IMAGE_SUFFIXES:
                        continue
                    status = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we were listing
                found[relative] = _FileState(relative, status.st_size, status.st_mtime_ns)
    return found


def _sort_key(record: _Record) -> tuple[int, str]:
    # Equal times happen within one batch; the higher sequence number is the newer image.
    return record.mtime_ns, record.relative


class GalleryIndex:
    """The images under an outputs folder, kept in memory; only new or changed files are ever read.

    Thread-safe: the generation worker adds while the UI pages.
    """

    def __init__(self, root: Path, cache_file: Path | None = None) -> None:
        # Resolved once, so that containment checks compare real paths and entries have one spelling.
        self.root = Path(root).resolve()
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self._lock = threading.Lock()
        # Serialises refreshes; the main lock is not held during their disk work.
        self._refresh_lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._ordered: tuple[_Record, ...] | None = None
        # Keys added or deleted while a refresh scans, so its result does not undo them.
        self._changed_during_refresh: set[str] | None = None
        self._cache_loaded = False
        self._cache_dirty = False

    # --- keeping the index current ----------------------------------------------------------------

    def refresh(self) -> None:
        """Bring the index in line with the folder: read new or changed files (path, size, mtime), drop vanished ones.

        The first refresh starts from the cache file, if any, and a refresh that changed anything
        rewrites it.
        """
        with self._refresh_lock:
            with self._lock:
                known = dict(self._records)
                self._changed_during_refresh = set()
            if not self._cache_loaded:
                self._cache_loaded = True
                for relative, record in self._load_cache().items():
                    known.setdefault(relative, record)
            states = _scan(self.root)
            refreshed: dict[str, _Record] = {}
            read_any = False
            for relative, state in states.items():
                record = known.get(relative)
                if record is not None and record.size == state.size and record.mtime_ns == state.mtime_ns:
                    refreshed[relative] = record
                    continue
                read_any = True
                refreshed[relative] = _record(self.root, state, _read_description(self.root / relative))
            # Compared with what was known (cache included), so an unchanged folder rewrites nothing.
            changed = read_any or refreshed.keys() != known.keys()
            with self._lock:
                for relative in self._changed_during_refresh:
                    current = self._records.get(relative)
                    if current is None:
                        refreshed.pop(relative, None)
                    else:
                        refreshed[relative] = current
                self._changed_during_refresh = None
                if changed:
                    self._cache_dirty = True
                self._records = refreshed
                self._ordered = None
                write_cache = self._cache_dirty and self.cache_file is not None
                snapshot = tuple(self._records.values()) if write_cache else ()
                self._cache_dirty = False
            if write_cache:
                self._write_cache(snapshot)

    def add(self, path: Path, infotext: str | None = None) -> None:
        """Index one just-saved image without rescanning; `infotext` saves reading it back."""
        resolved = self._resolve_inside_root(path)
        relative = resolved.relative_to(self.root).as_posix()
        status = resolved.stat()
        described = _describe(infotext) if infotext is not None else _read_description(resolved)
        record = _record(self.root, _FileState(relative, status.st_size, status.st_mtime_ns), described)
        with self._lock:
            self._records[relative] = record
            self._note_change(relative)

    def delete(self, path: Path) -> None:
        """Delete an image file and its entry. The path comes from the browser, so it must resolve to
        an image inside the outputs folder (ValueError otherwise); an already-missing file is no error.
        """
        resolved = self._resolve_inside_root(path)
        relative = resolved.relative_to(self.root).as_posix()
        # A double click or a second browser tab may delete the same image twice.
        resolved.unlink(missing_ok=True)
        with self._lock:
            self._records.pop(relative, None)
            self._note_change(relative)

    # --- reading (memory only) --------------------------------------------------------------------

    def page(
        self,
        page: int,
        page_size: int = DEFAULT_PAGE_SIZE,
        search: str = "",
        day: str | None = None,
        model: str | None = None,
    ) -> GalleryPage:
        """One page of the images, newest first, filtered; `page` is clamped into range.

        `search` is a case-insensitive substring of the prompt or negative prompt; `day`
        (YYYY-MM-DD) and `model` must match exactly; None or "" means no filter.
        """
        if page_size < 1:
            raise ValueError(f"page_size: must be at least 1, got {page_size}")
        needle = search.casefold() if search.strip() else ""
        with self._lock:
            ordered = self._ordered_locked()
        matching = [
            record.entry
            for record in ordered
            if (not needle or needle in record.search_text)
            and (not day or record.entry.day == day)
            and (not model or record.entry.model == model)
        ]
        page_count = math.ceil(len(matching) / page_size)
        chosen_page = min(max(page, 0), max(page_count - 1, 0))
        start = chosen_page * page_size
        return GalleryPage(
            entries=tuple(matching[start:start + page_size]),
            page=chosen_page,
            page_count=page_count,
            total=len(matching),
        )

    def days(self) -> list[str]:
        """The days that have images, newest first."""
        with self._lock:
            return sorted({record.entry.day for record in self._records.values()}, reverse=True)

    def models(self) -> list[str]:
        """The models named in the images' infotexts, alphabetically."""
        with self._lock:
            names: set[str] = {model for record in self._records.values() if (model := record.entry.model)}
        return sorted(names, key=lambda name: (name.casefold(), name))

    def entry(self, path: Path) -> GalleryEntry:
        """The indexed entry of `path`; KeyError if it is not indexed."""
        try:
            relative = Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            raise KeyError(str(path)) from None
        with self._lock:
            record = self._records.get(relative)
        if record is None:
            raise KeyError(str(path))
        return record.entry

    # --- internals --------------------------------------------------------------------------------

    def _resolve_inside_root(self, path: Path) -> Path:
        # resolve() follows every symbolic link and "..", so what is checked is what gets touched.
        resolved = Path(path).resolve()
        if resolved == self.root or not resolved.is_relative_to(self.root):
            raise ValueError(f"path: {path} is not inside the outputs folder")
        if resolved.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"path: {path} is not an image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return resolved

    def _note_change(self, relative: str) -> None:
        # Caller holds self._lock.
        self._ordered = None
        self._cache_dirty = True
        if self._changed_during_refresh is not None:
            self._changed_during_refresh.add(relative)

    def _ordered_locked(self) -> tuple[_Record, ...]:
        # Sorted once per change, not once per page.
        if self._ordered is None:
            self._ordered = tuple(sorted(self._records.values(), key=_sort_key, reverse=True))
        return self._ordered

    def _load_cache(self) -> dict[str, _Record]:
        if self.cache_file is None:
            return {}
        try:
            data = json.loads(self.cache_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            _LOGGER.warning("ignoring the gallery cache %s: %s", self.cache_file, error)
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("root") != str(self.root):
            # Another layout or another outputs folder: reading the files again is always correct.
            return {}
        records: dict[str, _Record] = {}
        for item in data.get("entries", []):
            try:
                relative, size, mtime_ns = item["path"], item["size"], item["mtime_ns"]
                infotext, prompt = item["infotext"], item["prompt"]
                negative_prompt, model = item["negative_prompt"], item["model"]
            except (KeyError, TypeError):
                continue
            valid = (
                isinstance(relative, str) and isinstance(size, int) and isinstance(mtime_ns, int)
                and isinstance(infotext, (str, type(None))) and isinstance(prompt, str)
                and isinstance(negative_prompt, str) and isinstance(model, (str, type(None)))
            )
            if not valid:
                continue
            state = _FileState(relative, size, mtime_ns)
            records[relative] = _record(self.root, state, _Described(infotext, prompt, negative_prompt, model))
        return records

    def _write_cache(self, records: tuple[_Record, ...]) -> None:
        assert self.cache_file is not None
        payload = {
            "version": CACHE_VERSION,
            "root": str(self.root),
            "entries": [
                {
                    "path": record.relative,
                    "size": record.size,
                    "mtime_ns": record.mtime_ns,
                    "infotext": record.entry.infotext,
                    "prompt": record.entry.prompt,
                    "negative_prompt": record.entry.negative_prompt,
                    "model": record.entry.model,
                }
                for record in records
            ],
        }
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomically(self.cache_file, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
        except OSError as error:
            # Only a cache: the next start reads the files instead.
            _LOGGER.warning("could not write the gallery cache %s: %s", self.cache_file, error)
