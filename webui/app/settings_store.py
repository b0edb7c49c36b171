"""Persisted user settings: config.json in the data dir (A1111's flat JSON object), validated, written atomically.
Must not import torch, gradio or fastapi; beyond the standard library only webui.core and webui.app.outputs."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from webui.core.files import write_file_atomically
from webui.core.params import AUTOMATIC_VAE, OUTPUT_FORMATS, GenerationParams, ParamError, check_text

_LOGGER = logging.getLogger(__name__)

SAMPLES_FORMATS = OUTPUT_FORMATS
# A1111's show_progress_every_n_steps slider tops out at the steps limit; 0 turns previews off here.
PREVIEW_STEPS_LOW = 0
PREVIEW_STEPS_HIGH = 150
# Prompt length in A1111's 75-token chunks: a 32-chunk prompt (2,400 tokens) is far beyond any real one, and
# a job holding the one worker for minutes on a pasted book is what this limit prevents.
PROMPT_CHUNKS_LOW = 1
PROMPT_CHUNKS_HIGH = 256
MAX_SETTING_CHARACTERS = 4096
# A1111's slider ranges for the checkpoint cache (0-10) and checkpoints kept loaded (1-10).
CHECKPOINT_CACHE_LOW, CHECKPOINT_CACHE_HIGH = 0, 10
CHECKPOINTS_LIMIT_LOW, CHECKPOINTS_LIMIT_HIGH = 1, 10
# A1111 writes config.json with json.dump(..., indent=4, ensure_ascii=False).
JSON_INDENT = 4
BACKUP_SUFFIX = ".bak"
CORRUPT_SUFFIX = ".corrupt-"

# The txt2img controls whose start values the user can choose; each is a GenerationParams field.
DEFAULT_UI_DEFAULTS: Mapping[str, object] = MappingProxyType({
    "steps": 20,
    "cfg_scale": 7.0,
    "sampler": "DPM++ 2M",
    "scheduler": "Automatic",
    "width": 512,
    "height": 512,
    "batch_count": 1,
    "batch_size": 1,
    "negative_prompt": "",
    "clip_skip": 1,
})
_UI_DEFAULT_TEXT_KEYS = frozenset({"sampler", "scheduler", "negative_prompt"})
_UI_DEFAULT_INT_KEYS = frozenset({"steps", "width", "height", "batch_count", "batch_size", "clip_skip"})

APPLIED_NOW = "applied now"
APPLIES_ON_RELOAD = "applies when the page is reloaded"
NEEDS_RESTART = "needs a restart"
# When a changed setting takes effect, shown to the user after saving.
SETTING_NOTES: Mapping[str, str] = MappingProxyType({
    # The web server may only serve files from the folder it was started with (and the gallery
    # indexes that folder), so a new output folder takes effect at the next start.
    "outdir": NEEDS_RESTART,
    "samples_format": APPLIED_NOW,
    "filename_pattern": APPLIED_NOW,
    "preview_every_n_steps": APPLIED_NOW,
    "sd_model_checkpoint": APPLIED_NOW,
    "sd_vae": APPLIED_NOW,
    "sd_checkpoint_cache": APPLIED_NOW,
    "sd_checkpoints_limit": APPLIED_NOW,
    "max_prompt_chunks": APPLIED_NOW,
    "ui_defaults": APPLIES_ON_RELOAD,
})
# Settings read only at start-up; none today, but a new one added here gets the restart note.
RESTART_REQUIRED: frozenset[str] = frozenset({"outdir"})


def _frozen_ui_defaults() -> Mapping[str, object]:
    return MappingProxyType(dict(DEFAULT_UI_DEFAULTS))


@dataclass(frozen=True)
class UserSettings:
    """The settings kept in config.json; field names are the file's keys."""

    outdir: str = ""  # "" = <data dir>/outputs (or the --outdir flag)
    samples_format: str = "png"
    filename_pattern: str = "[seed]"
    preview_every_n_steps: int = 10  # A1111's show_progress_every_n_steps default; 0 = live previews off
    sd_model_checkpoint: str = ""  # last chosen checkpoint (A1111's key), restored at start
    sd_vae: str = AUTOMATIC_VAE  # last chosen VAE (A1111's key): Automatic, None or a file in models/VAE
    # Checkpoints kept in RAM after being swapped out, so swapping back is a copy (A1111's key; its default is 0).
    sd_checkpoint_cache: int = 1
    sd_checkpoints_limit: int = 1  # checkpoints kept on the GPU at once (A1111's key and default)
    max_prompt_chunks: int = 32  # longest prompt (and negative prompt) a job may have, in 75-token chunks
    # A mapping proxy cannot be hashed, so it stays out of the generated __hash__.
    ui_defaults: Mapping[str, object] = field(default_factory=_frozen_ui_defaults, hash=False)

    def __post_init__(self) -> None:
        # Callers may pass a plain dict; a frozen settings object must not change under anyone.
        if not isinstance(self.ui_defaults, MappingProxyType):
            object.__setattr__(self, "ui_defaults", MappingProxyType(dict(self.ui_defaults)))


SETTING_KEYS: tuple[str, ...] = tuple(setting.name for setting in dataclasses.fields(UserSettings))


def _integer(key: str, value: object, low: int, high: int) -> int:
    # JSON and UI number boxes hand over 10.0 for 10; a fraction or a bool is a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(key, f"must be an integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ParamError(key, f"must be an integer, got {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise ParamError(key, f"must be between {low} and {high}, got {number}")
    return number


def _text(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ParamError(key, f"must be text, got {value!r}")
    check_text(key, value, MAX_SETTING_CHARACTERS)
    if "\0" in value:
        raise ParamError(key, "must not contain a NUL character")
    return value


def _validate_outdir(value: object) -> str:
    return _text("outdir", value)


def _validate_samples_format(value: object) -> str:
    text = _text("samples_format", value)
    if text not in SAMPLES_FORMATS:
        raise ParamError("samples_format", f"must be one of {', '.join(SAMPLES_FORMATS)}, got {text!r}")
    return text


def _validate_filename_pattern(value: object) -> str:
    text = _text("filename_pattern", value)
    if not text.strip():
        raise ParamError("filename_pattern", "must not be empty (use [none] for numbers only)")
    for separator in ("/", "\\"):
        if separator in text:
            raise ParamError("filename_pattern", f"must not contain the path separator {separator!r}")
    return text


def _validate_preview_steps(value: object) -> int:
    return _integer("preview_every_n_steps", value, PREVIEW_STEPS_LOW, PREVIEW_STEPS_HIGH)


def _validate_checkpoint(value: object) -> str:
    return _text("sd_model_checkpoint", value)


def _validate_vae(value: object) -> str:
    text = _text("sd_vae", value).strip()
    if not text:
        raise ParamError("sd_vae", "must not be empty (use Automatic or None)")
    return text


def _validate_checkpoint_cache(value: object) -> int:
    return _integer("sd_checkpoint_cache", value, CHECKPOINT_CACHE_LOW, CHECKPOINT_CACHE_HIGH)


def _validate_checkpoints_limit(value: object) -> int:
    return _integer("sd_checkpoints_limit", value, CHECKPOINTS_LIMIT_LOW, CHECKPOINTS_LIMIT_HIGH)


def _validate_prompt_chunks(value: object) -> int:
    return _integer("max_prompt_chunks", value, PROMPT_CHUNKS_LOW, PROMPT_CHUNKS_HIGH)


def _ui_default_value(key: str, value: object) -> object:
    """One ui_defaults value type-checked and normalised; ranges are GenerationParams' business."""
    qualified = f"ui_defaults.{key}"
    if key in _UI_DEFAULT_TEXT_KEYS:
        return _text(qualified, value)
    if key in _UI_DEFAULT_INT_KEYS:
        # Range checks happen in GenerationParams; only the type is settled here.
        return _integer(qualified, value, -(2**63), 2**63 - 1)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(qualified, f"must be a number, got {value!r}")
    return float(value)


def _check_ui_defaults(values: Mapping[str, object]) -> None:
    try:
        GenerationParams(**values).validated()  # type: ignore[arg-type]
    except ParamError as error:
        raise ParamError(f"ui_defaults.{error.field}", error.reason) from None


def _validate_ui_defaults(value: object, base: Mapping[str, object]) -> Mapping[str, object]:
    """`value` merged over `base`: every key known, every value within GenerationParams' limits."""
    if not isinstance(value, Mapping):
        raise ParamError("ui_defaults", f"must be an object of control values, got {value!r}")
    merged = dict(base)
    for key, item in value.items():
        if key not in DEFAULT_UI_DEFAULTS:
            raise ParamError(
                f"ui_defaults.{key}", f"unknown control; choose from {', '.join(DEFAULT_UI_DEFAULTS)}"
            )
        merged[key] = _ui_default_value(key, item)
    _check_ui_defaults(merged)
    return MappingProxyType(merged)


_VALIDATORS: Mapping[str, Callable[[object], object]] = MappingProxyType({
    "outdir": _validate_outdir,
    "samples_format": _validate_samples_format,
    "filename_pattern": _validate_filename_pattern,
    "preview_every_n_steps": _validate_preview_steps,
    "sd_model_checkpoint": _validate_checkpoint,
    "sd_vae": _validate_vae,
    "sd_checkpoint_cache": _validate_checkpoint_cache,
    "sd_checkpoints_limit": _validate_checkpoints_limit,
    "max_prompt_chunks": _validate_prompt_chunks,
})


@dataclass(frozen=True)
class _Parsed:
    """A config object split into validated settings and the keys this program does not know."""

    settings: UserSettings
    extra: Mapping[str, object]
    extra_ui_defaults: Mapping[str, object]


def _parse_ui_defaults(raw: object) -> tuple[Mapping[str, object], dict[str, object]]:
    defaults = _frozen_ui_defaults()
    if not isinstance(raw, Mapping):
        _LOGGER.warning("config.json: ui_defaults is not an object (%r); using the defaults", raw)
        return defaults, {}
    values = dict(defaults)
    unknown: dict[str, object] = {}
    for key, item in raw.items():
        if key not in DEFAULT_UI_DEFAULTS:
            # Kept for a newer version of this program that knows the control.
            unknown[key] = item
            continue
        try:
            candidate = {**values, key: _ui_default_value(key, item)}
            _check_ui_defaults(candidate)
        except ParamError as error:
            _LOGGER.warning("config.json: %s; using the default %r", error, DEFAULT_UI_DEFAULTS[key])
            continue
        values = candidate
    return MappingProxyType(values), unknown


def _parse(raw: Mapping[str, object]) -> _Parsed:
    """Settings from a config object: a bad value falls back to its default with a warning, never an error."""
    defaults = UserSettings()
    values: dict[str, object] = {}
    for key, validate in _VALIDATORS.items():
        if key not in raw:
            continue
        try:
            values[key] = validate(raw[key])
        except ParamError as error:
            _LOGGER.warning("config.json: %s; using the default %r", error, getattr(defaults, key))
    extra_ui_defaults: dict[str, object] = {}
    if "ui_defaults" in raw:
        values["ui_defaults"], extra_ui_defaults = _parse_ui_defaults(raw["ui_defaults"])
    # A1111 keeps settings it does not know (e.g. of a disabled extension) and writes them back.
    extra = {key: value for key, value in raw.items() if key not in SETTING_KEYS}
    return _Parsed(
        settings=dataclasses.replace(defaults, **values),  # type: ignore[arg-type]
        extra=MappingProxyType(extra),
        extra_ui_defaults=MappingProxyType(extra_ui_defaults),
    )


def _read_object(path: Path) -> dict[str, object]:
    """The JSON object in `path`; ValueError when the file is not one (OSError when unreadable)."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"the top level is {type(data).__name__}, not an object")
    return data


def _fsync_directory(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows), hence best effort.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class SettingsStore:
    """config.json: load with recovery from corruption, thread-safe reads, validated atomic updates."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.backup_path = self.path.with_name(self.path.name + BACKUP_SUFFIX)
        # One lock for reading and replacing the settings, so two updates never interleave their writes.
        self._lock = threading.Lock()
        self._parsed: _Parsed | None = None

    def load(self) -> UserSettings:
        """Read config.json again. Never raises for a bad file.

        Missing → defaults. Not a JSON object → the file is moved aside to
        config.json.corrupt-<timestamp>, then config.json.bak is used (and written back as
        config.json), else defaults; each step logs a warning. A value of the wrong type or out of
        range → that setting's default, with a warning. Unknown keys are kept for writing back.
        """
        with self._lock:
            return self._load_locked().settings

    @property
    def current(self) -> UserSettings:
        """The settings in effect (loaded on first use)."""
        with self._lock:
            parsed = self._parsed if self._parsed is not None else self._load_locked()
            return parsed.settings

    def update(self, changes: Mapping[str, object]) -> tuple[UserSettings, list[str]]:
        """Validate `changes`, write config.json atomically, and return the new settings and notes.

        Raises ParamError naming the key (e.g. "preview_every_n_steps: must be between 0 and 150")
        before anything is written; "ui_defaults" is merged into the current ones key by key. The
        previous file is kept as config.json.bak. An OSError while writing leaves both the file
        and the settings in effect unchanged. Notes: "Saved." plus one "<key>: <when it applies>"
        per changed key; nothing is written when no value changes.
        """
        with self._lock:
            parsed = self._parsed if self._parsed is not None else self._load_locked()
            old = parsed.settings
            new_values: dict[str, object] = {}
            for key, value in changes.items():
                if key == "ui_defaults":
                    new_values[key] = _validate_ui_defaults(value, old.ui_defaults)
                elif key in _VALIDATORS:
                    new_values[key] = _VALIDATORS[key](value)
                else:
                    raise ParamError(key, f"unknown setting; known settings: {', '.join(SETTING_KEYS)}")
            new = dataclasses.replace(old, **new_values)  # type: ignore[arg-type]
            changed = [key for key in SETTING_KEYS if getattr(new, key) != getattr(old, key)]
            if not changed:
                return old, ["Nothing to save: no setting changed."]
            updated = _Parsed(new, parsed.extra, parsed.extra_ui_defaults)
            self._write(updated)
            self._parsed = updated
            return new, ["Saved.", *(f"{key}: {self._note(key)}" for key in changed)]

    @staticmethod
    def _note(key: str) -> str:
        if key in RESTART_REQUIRED:
            return NEEDS_RESTART
        return SETTING_NOTES.get(key, APPLIED_NOW)

    def _load_locked(self) -> _Parsed:
        raw = self._read_with_recovery()
        self._parsed = _parse(raw)
        return self._parsed

    def _read_with_recovery(self) -> Mapping[str, object]:
        try:
            return _read_object(self.path)
        except FileNotFoundError:
            return {}
        except ValueError as error:
            _LOGGER.warning("%s is corrupt (%s)", self.path, error)
            self._quarantine()
        except OSError as error:
            # Unreadable (permissions, I/O error) is not corrupt: leave the file for the user to fix.
            _LOGGER.warning("%s cannot be read (%s); using default settings", self.path, error)
            return {}
        try:
            recovered = _read_object(self.backup_path)
        except FileNotFoundError:
            _LOGGER.warning("no %s to fall back on; using default settings", self.backup_path.name)
            return {}
        except (ValueError, OSError) as error:
            _LOGGER.warning("%s is unusable too (%s); using default settings", self.backup_path, error)
            return {}
        _LOGGER.warning("settings restored from %s", self.backup_path)
        try:
            # Put it back under the real name so that the next start does not fall back to defaults.
            write_file_atomically(self.path, self.backup_path.read_bytes())
        except OSError as error:
            _LOGGER.warning("could not restore %s from the backup (%s)", self.path, error)
        return recovered

    def _quarantine(self) -> None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}{CORRUPT_SUFFIX}{stamp}")
        attempt = 0
        # Two corruptions within a second must not overwrite the first evidence.
        while target.exists():
            attempt += 1
            target = self.path.with_name(f"{self.path.name}{CORRUPT_SUFFIX}{stamp}-{attempt}")
        try:
            os.rename(self.path, target)
        except OSError as error:
            _LOGGER.warning("could not move %s aside (%s)", self.path, error)
            return
        _LOGGER.warning("moved the corrupt file to %s", target)

    def _write(self, parsed: _Parsed) -> None:
        payload: dict[str, object] = {}
        for key in SETTING_KEYS:
            value = getattr(parsed.settings, key)
            payload[key] = {**value, **parsed.extra_ui_defaults} if key == "ui_defaults" else value
        payload.update(parsed.extra)
        data = json.dumps(payload, indent=JSON_INDENT, ensure_ascii=False).encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keep_backup()
        write_file_atomically(self.path, data)
        _fsync_directory(self.path.parent)

    def _keep_backup(self) -> None:
        try:
            previous = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            usable = isinstance(json.loads(previous.decode("utf-8")), dict)
        except ValueError:
            usable = False
        if not usable:
            # A damaged file must never replace a good backup.
            return
        write_file_atomically(self.backup_path, previous)
