"""Prompt styles as A1111's styles.csv: loading (a broken row is reported by file and line, the others load), applying
and extracting them as modules/styles.py does, and saving edits atomically with a .bak copy. Standard library only."""

from __future__ import annotations

import csv
import glob
import io
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from webui.core.files import write_file_atomically

logger = logging.getLogger(__name__)

PROMPT_PLACEHOLDER = "{prompt}"
CSV_COLUMNS = ("name", "prompt", "negative_prompt")
# Before 1.2 A1111 wrote "name,text"; such files still load (the text is the prompt).
OLD_PROMPT_COLUMN = "text"
# A1111 reads and writes styles.csv as UTF-8 with a byte-order mark (Excel opens it correctly then).
ENCODING = "utf-8-sig"
BACKUP_SUFFIX = ".bak"
DIVIDER_WIDTH = 40


@dataclass(frozen=True, slots=True)
class Style:
    """One style: `prompt` and `negative_prompt` may hold `{prompt}`. `path` is the file it is saved in (None: the
    default file). Divider pseudo-styles (several files loaded) have both texts None and are never saved."""

    name: str
    prompt: str | None
    negative_prompt: str | None
    path: Path | None = None

    @property
    def is_divider(self) -> bool:
        return self.prompt is None and self.negative_prompt is None


@dataclass(frozen=True, slots=True)
class StyleFileError:
    """Why a row (or, with `line` None, a whole file) was not loaded."""

    path: Path
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}: line {self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.reason}"


class StyleSaveError(OSError):
    """Saving was refused or failed; nothing was changed on disk (the message names the file)."""


# -- A1111's text operations (modules/styles.py), exactly ------------------------------------------------------------


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """A style text with `{prompt}` has every `{prompt}` replaced by the prompt; otherwise the stripped prompt and
    the stripped style text are joined by ", " (empty ones left out)."""
    if PROMPT_PLACEHOLDER in style_prompt:
        return style_prompt.replace(PROMPT_PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles_to_prompt(prompt: str, style_texts: Iterable[str | None]) -> str:
    """Each style text in order, so later styles wrap the earlier results; None (a divider) counts as empty."""
    for text in style_texts:
        prompt = merge_prompts(text or "", prompt)
    return prompt


def extract_style_text_from_prompt(style_text: str, prompt: str) -> tuple[bool, str]:
    """(matched, prompt without the style text). With `{prompt}`: the stripped prompt must start with the text left
    of it and end with the text right of it. Without: it must end with the text (a trailing ", " is dropped then);
    an empty text always matches (and strips the prompt)."""
    stripped_prompt = prompt.strip()
    stripped_style = style_text.strip()
    if PROMPT_PLACEHOLDER in stripped_style:
        left, _, right = stripped_style.partition(PROMPT_PLACEHOLDER)
        if stripped_prompt.startswith(left) and stripped_prompt.endswith(right):
            return True, stripped_prompt[len(left) : len(stripped_prompt) - len(right)]
    elif stripped_prompt.endswith(stripped_style):
        rest = stripped_prompt[: len(stripped_prompt) - len(stripped_style)]
        return True, rest[:-2] if rest.endswith(", ") else rest
    return False, prompt


def extract_original_prompts(style: Style, prompt: str, negative_prompt: str) -> tuple[bool, str, str]:
    """A style matches when both its texts extract; one with both texts empty never matches."""
    if not style.prompt and not style.negative_prompt:
        return False, prompt, negative_prompt
    matched, positive = extract_style_text_from_prompt(style.prompt or "", prompt)
    if not matched:
        return False, prompt, negative_prompt
    matched, negative = extract_style_text_from_prompt(style.negative_prompt or "", negative_prompt)
    if not matched:
        return False, prompt, negative_prompt
    return True, positive, negative


def divider_name(path: Path) -> str:
    """A1111's list divider before each file's styles when several files are loaded: ' STEM ' centred in dashes."""
    return f" {path.stem.upper()} ".center(DIVIDER_WIDTH, "-")


# -- reading a file --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Raw:
    """Text of a record that was not loaded (a comment, an unnamed or a broken row), written back as it was."""

    text: str


_Slot = str | _Raw  # a style name, or a record kept verbatim


@dataclass(frozen=True)
class _ParsedFile:
    styles: list[Style]
    slots: list[_Slot]
    errors: list[StyleFileError]
    # False: the file could not be parsed as a whole (unreadable, no usable header); saving never overwrites it.
    writable: bool


def _has_undecodable(text: str) -> bool:
    # Decoded with surrogateescape: bytes that are not UTF-8 became lone surrogates U+DC80..U+DCFF.
    return any("\udc80" <= char <= "\udcff" for char in text)


def parse_styles_file(path: Path) -> _ParsedFile:
    """The styles in one file; each broken row gives a StyleFileError with its first line number and is kept as it
    was (saving writes it back), the other rows load."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return _ParsedFile([], [], [StyleFileError(path, None, f"cannot read ({error})")], writable=False)
    text = data.decode(ENCODING, errors="surrogateescape")
    # newline="" keeps \r\n and lone \r inside quoted fields, as csv wants; the lines are also the raw text of records.
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(iter(lines), skipinitialspace=True)
    styles: list[Style] = []
    slots: list[_Slot] = []
    errors: list[StyleFileError] = []
    header: list[str] | None = None
    while True:
        start = reader.line_num
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            end = max(reader.line_num, start + 1)
            if header is None:
                return _ParsedFile([], [], [StyleFileError(path, start + 1, f"bad header ({error})")], writable=False)
            errors.append(StyleFileError(path, start + 1, f"not valid CSV ({error}); row skipped"))
            slots.append(_Raw("".join(lines[start:end])))
            continue
        raw = "".join(lines[start : reader.line_num])
        line = start + 1
        if header is None:
            if not row:
                continue
            header = row
            if "name" not in header or not ({"prompt", OLD_PROMPT_COLUMN} & set(header)):
                reason = f"the first line must name the columns {', '.join(CSV_COLUMNS)} (found {', '.join(row)})"
                return _ParsedFile([], [], [StyleFileError(path, line, reason)], writable=False)
            continue
        if not row:
            continue  # a blank line
        if _has_undecodable(raw):
            errors.append(StyleFileError(path, line, "not valid UTF-8 (save the file as UTF-8); row skipped"))
            slots.append(_Raw(raw))
            continue
        if len(row) != len(header):
            errors.append(StyleFileError(
                path, line, f"expected {len(header)} columns ({', '.join(header)}), found {len(row)} "
                "(put texts that contain commas in double quotes); row skipped",
            ))
            slots.append(_Raw(raw))
            continue
        values = dict(zip(header, row, strict=True))
        name = values["name"]
        if not name or name.startswith("#"):
            slots.append(_Raw(raw))  # A1111 ignores comment rows; kept so that saving does not delete them
            continue
        prompt = values["prompt"] if "prompt" in values else values[OLD_PROMPT_COLUMN]
        styles.append(Style(name, prompt, values.get("negative_prompt", ""), path))
        slots.append(name)
    return _ParsedFile(styles, slots, errors, writable=True)


def expand_style_paths(patterns: Sequence[Path]) -> tuple[Path, list[Path]]:
    """A1111's StyleDatabase paths: (default file for new styles, every file in order, no repeats). A pattern whose
    file part has * or ? is a wildcard; if the first one is, the default is its first match or styles.csv beside."""
    if not patterns:
        raise ValueError("styles: no styles file given")
    first = Path(patterns[0])
    ordered: list[Path] = []
    if _is_wildcard(first):
        matches = sorted(Path(path) for path in glob.glob(str(first)))
        default = matches[0] if matches else first.parent / "styles.csv"
        ordered.append(default)
    else:
        default = first
    for pattern in patterns:
        pattern = Path(pattern)
        ordered.extend(sorted(Path(path) for path in glob.glob(str(pattern))) if _is_wildcard(pattern) else [pattern])
    unique = list(dict.fromkeys(path.absolute() for path in ordered))
    return default.absolute(), unique


def _is_wildcard(path: Path) -> bool:
    return "*" in path.name or "?" in path.name


# -- the database ----------------------------------------------------------------------------------------------------


class StyleDatabase:
    """The styles of one or more styles.csv files (A1111's --styles-file, default DATA_DIR/styles.csv), in file order.

    Thread-safe: the UI edits while API requests read. Edits are saved at once: each file written to is first copied
    to `<file>.bak`, then replaced atomically; comment and broken rows are written back as they were.
    """

    def __init__(self, paths: Path | Sequence[Path]) -> None:
        self.patterns = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(path) for path in paths]
        self._lock = threading.Lock()
        self.default_path, self.files = expand_style_paths(self.patterns)
        self._styles: dict[str, Style] = {}
        self._slots: dict[Path, list[_Slot]] = {}
        self._unwritable: set[Path] = set()
        self._errors: list[StyleFileError] = []
        self.reload()

    # -- loading -----------------------------------------------------------------------------------------------------

    def reload(self) -> None:
        """Read every file again (A1111's refresh button); broken rows are logged and listed in `errors`."""
        with self._lock:
            self._reload_locked()

    def _reload_locked(self) -> None:
        self.default_path, self.files = expand_style_paths(self.patterns)
        styles: dict[str, Style] = {}
        slots: dict[Path, list[_Slot]] = {}
        unwritable: set[Path] = set()
        errors: list[StyleFileError] = []
        for path in self.files:
            if len(self.files) > 1:
                divider = divider_name(path)
                styles[divider] = Style(divider, None, None, None)
            if not path.is_file():
                continue
            parsed = parse_styles_file(path)
            for style in parsed.styles:
                styles[style.name] = style  # a name seen before: the later row wins, as in A1111
            slots[path] = parsed.slots
            if not parsed.writable:
                unwritable.add(path)
            errors.extend(parsed.errors)
        for error in errors:
            logger.warning("styles: %s", error)
        self._styles, self._slots, self._unwritable, self._errors = styles, slots, unwritable, errors

    @property
    def errors(self) -> list[StyleFileError]:
        """What the last load could not read, by file and line."""
        with self._lock:
            return list(self._errors)

    def styles(self) -> list[Style]:
        """Every style in database order, dividers included (as GET /sdapi/v1/prompt-styles lists them)."""
        with self._lock:
            return list(self._styles.values())

    def names(self) -> list[str]:
        with self._lock:
            return list(self._styles)

    def get(self, name: str) -> Style | None:
        with self._lock:
            return self._styles.get(name)

    # -- applying ----------------------------------------------------------------------------------------------------

    def apply(self, prompt: str, negative_prompt: str, names: Iterable[str]) -> tuple[str, str]:
        """The prompt and negative prompt with the named styles applied in order; unknown names count as empty
        styles (A1111: no error, though the prompt is stripped as merging with an empty text does)."""
        with self._lock:
            chosen = [self._styles.get(name) for name in names]
        return (
            apply_styles_to_prompt(prompt, (style.prompt if style else "" for style in chosen)),
            apply_styles_to_prompt(negative_prompt, (style.negative_prompt if style else "" for style in chosen)),
        )

    def extract(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        """A1111's extract_styles_from_prompt (pasting an infotext): repeatedly take out the first style (database
        order) whose texts both match, until none does. Returns the names in reverse order of discovery, and what
        is left of the prompts."""
        with self._lock:
            candidates = list(self._styles.values())
        extracted: list[str] = []
        while True:
            for style in candidates:
                matched, new_prompt, new_negative = extract_original_prompts(style, prompt, negative_prompt)
                if matched:
                    prompt, negative_prompt = new_prompt, new_negative
                    candidates.remove(style)
                    extracted.append(style.name)
                    break
            else:
                break
        return list(reversed(extracted)), prompt, negative_prompt

    extract_styles_from_prompt = extract

    # -- editing -----------------------------------------------------------------------------------------------------

    def save_style(self, style: Style) -> Style:
        """Create or replace the style named `style.name` and save. An existing style stays in its file and place;
        a new one goes to `style.path` or the default file. Returns the style as stored."""
        name = style.name
        if not name.strip() or name.startswith("#"):
            raise ValueError("style name: must not be empty or start with '#'")
        if "\n" in name or "\r" in name:
            raise ValueError("style name: must be one line")
        with self._lock:
            existing = self._styles.get(name)
            if existing is not None and existing.is_divider:
                raise ValueError(f"style name: {name!r} is the divider of a styles file")
            path = existing.path if existing is not None and existing.path is not None else style.path
            stored = replace(style, prompt=style.prompt or "", negative_prompt=style.negative_prompt or "",
                             path=(path or self.default_path).absolute())
            previous = dict(self._styles)
            self._styles[name] = stored
            try:
                self._save_locked({stored.path} if stored.path is not None else set())
            except BaseException:
                self._styles = previous
                raise
            return stored

    def delete_style(self, name: str) -> bool:
        """Remove the style and save its file; False if there is no such style (dividers cannot be deleted)."""
        with self._lock:
            style = self._styles.get(name)
            if style is None or style.is_divider:
                return False
            previous = dict(self._styles)
            del self._styles[name]
            try:
                self._save_locked({style.path or self.default_path})
            except BaseException:
                self._styles = previous
                raise
            return True

    def save(self) -> None:
        """Write every file that holds styles, and the default file (A1111's save_styles)."""
        with self._lock:
            paths = {style.path or self.default_path for style in self._styles.values() if not style.is_divider}
            self._save_locked(paths | {self.default_path})

    def _save_locked(self, paths: set[Path]) -> None:
        refused = sorted(str(path) for path in paths if path in self._unwritable)
        if refused:
            raise StyleSaveError(
                f"styles: {', '.join(refused)} could not be read, so it is not overwritten; fix it and reload first"
            )
        for path in sorted(paths):
            data = self._file_text(path).encode(ENCODING, errors="surrogateescape")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.is_file():
                    write_file_atomically(path.with_name(path.name + BACKUP_SUFFIX), path.read_bytes())
                write_file_atomically(path, data)
            except OSError as error:
                raise StyleSaveError(f"styles: cannot save {path}: {error}") from error
        self._reload_locked()

    def _file_text(self, path: Path) -> str:
        """The file's new text: its records in their old order (edited styles in place, removed ones left out,
        verbatim records as they were), then the new styles of this file."""
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(CSV_COLUMNS)
        written: set[str] = set()

        def write_style(name: str) -> None:
            style = self._styles.get(name)
            if style is None or style.is_divider or (style.path or self.default_path) != path or name in written:
                return
            writer.writerow((style.name, style.prompt or "", style.negative_prompt or ""))
            written.add(name)

        for slot in self._slots.get(path, []):
            if isinstance(slot, _Raw):
                buffer.write(slot.text if slot.text.endswith(("\n", "\r")) else slot.text + "\r\n")
            else:
                write_style(slot)
        for name in list(self._styles):
            write_style(name)
        return buffer.getvalue()
