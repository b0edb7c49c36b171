"""ExtensionHost: finds extensions on disk, loads the enabled ones, calls their hooks in isolation, and installs,
updates and removes them with the `git` CLI. Must not import gradio, fastapi, torch, webui.ui or webui.api.

Layout: `<dir>/<name>/extension.toml` (name, version, title, description, requires, min_webui) and `__init__.py`
with `setup(api)`. Shipped extensions (the repository's extensions/ folder) are "built-in": they can be enabled and
disabled, never updated or removed here. Nothing an extension ships runs until it is enabled.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import tomllib
import traceback
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from webui.core.extension_values import (
    Control,
    Dropdown,
    Slider,
    coerce_values,
    infotext_fields_of,
    values_from_fields,
)
from webui.core.files import write_file_atomically
from webui.core.hooks import (
    AppStartedContext,
    BeforeGenerationContext,
    BeforeSaveContext,
    HookContext,
    HookFunction,
    HookPoint,
    InfotextPastedContext,
    RouteEndpoint,
)
from webui.core.params import ExtensionValue, ExtensionValues, GenerationParams, ParamError
from webui.extension_api import ExtensionAPI, Section, Tab

logger = logging.getLogger(__name__)

MANIFEST = "extension.toml"
ENTRY_POINT = "__init__.py"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# An infotext key must be one A1111's parser reads back as a key (infotext._PARAM_PATTERN).
INFOTEXT_KEY_PATTERN = re.compile(r"^\w[\w \-/]+$")
BRANCH_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,200}$")
# Requirements that would swap the engine's own libraries are refused, whatever the user consents to.
PROTECTED_PACKAGES = ("torch", "diffusers", "transformers", "gradio")
# A1111's default index (spec f.2); the Extensions tab lets the user point elsewhere.
DEFAULT_INDEX_URL = (
    "https://raw.githubusercontent.com/AUTOMATIC1111/stable-diffusion-webui-extensions/master/index.json"
)
INDEX_MAX_BYTES = 20 * 1024 * 1024
INDEX_URL_MAX_CHARACTERS = 2048
GIT_TIMEOUT_S = 300
PIP_TIMEOUT_S = 900
MODULE_PREFIX = "webui_extension_"
ACCESS_REFUSED = (
    "extension access disabled because the server is exposed (--listen or --share); "
    "start it with --enable-insecure-extension-access to install, update or remove extensions"
)

STATUS_DISABLED = "disabled"
STATUS_ENABLED = "enabled"
STATUS_FAILED = "failed"
STATUS_SAFE_MODE = "off (safe mode)"


class ExtensionError(Exception):
    """A management action could not be done; the message says why, for the user."""


class ExtensionAccessError(ExtensionError):
    """Install, update or remove while the server is exposed without --enable-insecure-extension-access."""


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    title: str
    description: str
    requires: tuple[str, ...]
    min_webui: str | None


@dataclass(frozen=True)
class ExtensionInfo:
    """One extension as the Extensions tab and the API show it."""

    name: str
    title: str
    version: str
    description: str
    directory: Path
    builtin: bool
    enabled: bool
    status: str
    error: str
    traceback: str
    remote: str
    branch: str
    commit: str
    commit_date: str
    requires: tuple[str, ...]


@dataclass(frozen=True)
class IndexEntry:
    name: str
    url: str
    description: str
    tags: tuple[str, ...]
    installed: bool


@dataclass(frozen=True)
class LoadedSection:
    extension: str
    title: str
    controls: tuple[Control, ...]


@dataclass(frozen=True)
class LoadedTab:
    extension: str
    title: str
    build: Callable[[], None]


@dataclass(frozen=True)
class LoadedSettings:
    extension: str
    title: str
    controls: tuple[Control, ...]


@dataclass
class _Record:
    """An extension folder and what became of it in this process."""

    directory: Path
    builtin: bool
    manifest: Manifest | None
    manifest_error: str = ""
    status: str = STATUS_DISABLED
    error: str = ""
    traceback: str = ""
    api: ExtensionAPI | None = None
    module_name: str = ""

    @property
    def name(self) -> str:
        return self.manifest.name if self.manifest is not None else self.directory.name

    @property
    def title(self) -> str:
        return self.manifest.title if self.manifest is not None else self.directory.name

    @property
    def active(self) -> bool:
        return self.api is not None and self.status == STATUS_ENABLED


@dataclass
class _State:
    """What extensions.json keeps: which extensions are enabled, their settings, the index URL."""

    enabled: list[str] = field(default_factory=list)
    settings: dict[str, dict[str, ExtensionValue]] = field(default_factory=dict)
    index_url: str = DEFAULT_INDEX_URL


def read_manifest(directory: Path) -> Manifest:
    """The folder's extension.toml, checked; ValueError saying what is wrong."""
    path = directory / MANIFEST
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{MANIFEST} is missing") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{MANIFEST} is not valid TOML: {error}") from None
    name = data.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"{MANIFEST}: name must be letters, digits, '_' or '-' (at most 64), got {name!r}")
    version = data.get("version")
    if not isinstance(version, str) or not version.strip():
        raise ValueError(f"{MANIFEST}: version must be text, got {version!r}")
    requires = data.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(item, str) for item in requires):
        raise ValueError(f"{MANIFEST}: requires must be a list of pip requirements, got {requires!r}")
    title = data.get("title", name)
    description = data.get("description", "")
    min_webui = data.get("min_webui")
    if not isinstance(title, str) or not isinstance(description, str):
        raise ValueError(f"{MANIFEST}: title and description must be text")
    if min_webui is not None and not isinstance(min_webui, str):
        raise ValueError(f"{MANIFEST}: min_webui must be a version text, got {min_webui!r}")
    if not (directory / ENTRY_POINT).is_file():
        raise ValueError(f"{ENTRY_POINT} with setup(api) is missing")
    return Manifest(name, version.strip(), title, description, tuple(requires), min_webui)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:4])


def _git_environment() -> dict[str, str]:
    env = dict(os.environ)
    # Never wait for a password prompt in a server process; never read the user's git config hooks.
    env.update(GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="true", SSH_ASKPASS="true", LC_ALL="C", GIT_CONFIG_NOSYSTEM="1")
    return env


def run_git(args: Sequence[str], cwd: Path | None = None, timeout: float = GIT_TIMEOUT_S) -> str:
    """`git args...` in a subprocess; its stdout, or ExtensionError with the tail of its stderr."""
    command = ["git", "-c", "core.hooksPath=/dev/null", *args]
    try:
        completed = subprocess.run(
            command, cwd=cwd, env=_git_environment(), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, check=False,
        )
    except FileNotFoundError:
        raise ExtensionError("git is not installed (it is needed to install and update extensions)") from None
    except subprocess.TimeoutExpired:
        raise ExtensionError(f"git {args[0]} took longer than {timeout:.0f} s and was stopped") from None
    if completed.returncode != 0:
        message = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        raise ExtensionError(f"git {args[0]} failed: {' '.join(message) or f'exit code {completed.returncode}'}")
    return completed.stdout.strip()


def checked_index_url(url: str) -> str:
    """`url` stripped, if it is an http(s) URL with a host (of at most 2048 characters); ExtensionError otherwise."""
    url = url.strip() if isinstance(url, str) else ""
    try:
        parts = urllib.parse.urlsplit(url)
        has_host = bool(parts.hostname)
    except ValueError:  # a malformed host ("http://[::1") or port
        has_host = False
    printable = all(ch.isprintable() and not ch.isspace() for ch in url)
    if not (has_host and parts.scheme in ("http", "https") and printable and len(url) <= INDEX_URL_MAX_CHARACTERS):
        raise ExtensionError("the index URL must be an http:// or https:// URL "
                             f"of at most {INDEX_URL_MAX_CHARACTERS} characters")
    return url


def folder_name_from_url(url: str) -> str:
    """The last path segment of a git URL without ".git" (A1111's default folder name)."""
    path = urllib.parse.urlsplit(url).path if "://" in url else url
    last = path.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return last[:-4] if last.endswith(".git") else last


def normalised_remote(url: str) -> str:
    return url.strip().rstrip("/").removesuffix(".git").lower()


def check_requirement_text(text: str) -> tuple[str, str | None]:
    """(package name, problem) for one pip requirement: problem is None when it is installed and satisfied."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        requirement = Requirement(text)
    except InvalidRequirement as error:
        return text, f"not a valid requirement ({error})"
    try:
        installed = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return requirement.name, "not installed"
    if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
        return requirement.name, f"installed {installed} does not satisfy {requirement.specifier}"
    return requirement.name, None


class ExtensionHost:
    """The one extension host of the process (built by main.py). Implements webui.core.hooks.Hooks.

    Thread use: hooks run on the queue's worker thread while the UI and API threads list and manage
    extensions; the hook table is swapped as a whole under a lock, and management actions are serialised.
    """

    def __init__(
        self,
        user_dir: Path,
        builtin_dir: Path | None,
        state_file: Path,
        data_dir: Path,
        *,
        safe_mode: bool = False,
        changes_allowed: bool = True,
        webui_version: str = "0",
        python: str = sys.executable,
    ) -> None:
        self.user_dir = user_dir
        self.builtin_dir = builtin_dir
        self.state_file = state_file
        self.data_dir = data_dir
        self.safe_mode = safe_mode
        self.changes_allowed = changes_allowed
        self.webui_version = webui_version
        self.python = python
        self._lock = threading.RLock()
        self._manage_lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._hook_table: dict[HookPoint, tuple[tuple[_Record, HookFunction], ...]] = {}
        self._state = _State()
        # Names whose UI (sections, tabs, settings) the current page shows, and whose code changed since.
        self._rendered: frozenset[str] = frozenset()
        self._stale_code: set[str] = set()

    # -- start-up and discovery ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Read the state file, find the extensions, load the enabled ones (none in safe mode)."""
        with self._lock:
            self._state = self._read_state()
            self._discover()
            for record in self._sorted_records():
                self._activate(record)
            self._rebuild_hook_table()

    def _roots(self) -> list[tuple[Path, bool]]:
        roots: list[tuple[Path, bool]] = []
        if self.builtin_dir is not None:
            roots.append((self.builtin_dir, True))
        if self.builtin_dir is None or self.user_dir.resolve() != self.builtin_dir.resolve():
            roots.append((self.user_dir, False))
        return roots

    def _discover(self) -> None:
        found: dict[str, _Record] = {}
        by_directory = {record.directory: record for record in self._records.values()}
        for root, builtin_root in self._roots():
            if not root.is_dir():
                continue
            for directory in sorted(root.iterdir()):
                if not directory.is_dir() or directory.name.startswith((".", "_")):
                    continue
                # A git checkout inside the shipped folder is a user's install (the default data dir is the checkout).
                builtin = builtin_root and not (directory / ".git").exists()
                record = by_directory.get(directory)
                if record is not None and record.api is not None:
                    found[record.name] = record
                    continue
                try:
                    manifest: Manifest | None = read_manifest(directory)
                    problem = ""
                except ValueError as error:
                    manifest, problem = None, str(error)
                record = _Record(directory, builtin, manifest, manifest_error=problem)
                if record.name in found:
                    record = _Record(directory, builtin, None, manifest_error=(
                        f"another extension ({found[record.name].directory}) already has the name {record.name!r}"))
                    found[directory.name + "@" + str(directory)] = record
                    continue
                found[record.name] = record
        self._records = found

    def _sorted_records(self) -> list[_Record]:
        return [self._records[name] for name in sorted(self._records)]

    # -- loading ------------------------------------------------------------------------------------------------

    def _activate(self, record: _Record) -> None:
        """Load an enabled extension: import it and call setup(api); any failure marks it failed."""
        if record.name not in self._state.enabled:
            record.status = STATUS_DISABLED
            return
        if record.manifest is None:
            record.status, record.error, record.traceback = STATUS_FAILED, f"bad manifest: {record.manifest_error}", ""
            return
        if self.safe_mode:
            record.status = STATUS_SAFE_MODE
            return
        if record.manifest.min_webui and _version_tuple(record.manifest.min_webui) > _version_tuple(self.webui_version):
            record.status = STATUS_FAILED
            record.error = f"needs web UI {record.manifest.min_webui} or newer (this is {self.webui_version})"
            return
        api = ExtensionAPI(record.name, record.directory, self.data_dir, self._setting_value)
        module_name = MODULE_PREFIX + record.name.replace("-", "_")
        try:
            spec = importlib.util.spec_from_file_location(
                module_name, record.directory / ENTRY_POINT, submodule_search_locations=[str(record.directory)]
            )
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import {record.directory / ENTRY_POINT}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            setup = getattr(module, "setup", None)
            if not callable(setup):
                raise AttributeError(f"{ENTRY_POINT} defines no setup(api) function")
            setup(api)
        except Exception as error:  # an extension's import or setup may raise anything; the app goes on
            self._purge_modules(module_name)
            record.api, record.status = None, STATUS_FAILED
            record.error = f"loading failed: {type(error).__name__}: {error}"
            record.traceback = traceback.format_exc()
            logger.error("extension %s failed to load:\n%s", record.name, record.traceback)
            return
        record.api, record.module_name, record.status, record.error, record.traceback = (
            api, module_name, STATUS_ENABLED, "", "")
        logger.info("extension %s %s loaded", record.name, record.manifest.version)

    def _deactivate(self, record: _Record) -> None:
        if record.module_name:
            self._purge_modules(record.module_name)
        record.api, record.module_name = None, ""
        record.status, record.error, record.traceback = STATUS_DISABLED, "", ""

    @staticmethod
    def _purge_modules(module_name: str) -> None:
        for loaded in [name for name in sys.modules if name == module_name or name.startswith(module_name + ".")]:
            del sys.modules[loaded]

    def _rebuild_hook_table(self) -> None:
        table: dict[HookPoint, list[tuple[_Record, HookFunction]]] = {}
        for record in self._sorted_records():
            if record.active and record.api is not None:
                for point, hook in record.api.registrations.hooks:
                    table.setdefault(point, []).append((record, hook))
        self._hook_table = {point: tuple(hooks) for point, hooks in table.items()}

    # -- the Hooks protocol (called on the worker thread) -------------------------------------------------------

    def has(self, point: HookPoint) -> bool:
        if point in self._hook_table:
            return True
        return point is HookPoint.BEFORE_SAVE and any(section.controls for section in self.sections())

    def run(self, point: HookPoint, context: HookContext) -> None:
        if point is HookPoint.BEFORE_SAVE and isinstance(context, BeforeSaveContext):
            self._add_control_fields(context)
        for record, hook in self._hook_table.get(point, ()):
            if not record.active:
                continue
            try:
                hook(context)
            except Exception as error:  # an extension's hook may raise anything; the job goes on without it
                self._mark_failed(record, f"{point.name} hook raised {type(error).__name__}: {error}")
        if isinstance(context, (BeforeGenerationContext, BeforeSaveContext)):
            context.infotext_fields = self._clean_fields(context.infotext_fields)

    def _mark_failed(self, record: _Record, message: str) -> None:
        with self._lock:
            record.status, record.error, record.traceback = STATUS_FAILED, message, traceback.format_exc()
        logger.error("extension %s: %s; its hooks are off until it is reloaded\n%s", record.name, message,
                     record.traceback)

    def _add_control_fields(self, context: BeforeSaveContext) -> None:
        for section in self.sections():
            try:
                values = coerce_values(section.extension, section.controls,
                                       context.params.extension_values(section.extension))
            except ParamError:
                continue
            for key, value in infotext_fields_of(section.controls, values).items():
                context.infotext_fields.setdefault(key, value)

    @staticmethod
    def _clean_fields(fields: Mapping[object, object]) -> dict[str, str]:
        clean: dict[str, str] = {}
        for key, value in fields.items():
            if isinstance(key, str) and INFOTEXT_KEY_PATTERN.match(key) and value is not None:
                clean[key] = str(value)
            else:
                logger.warning("extension infotext field %r dropped: keys are words, spaces, '-' and '/'", key)
        return clean

    def app_started(self, add_route: Callable[[str, RouteEndpoint, list[str]], None]) -> None:
        self.run(HookPoint.APP_STARTED, AppStartedContext(add_route))

    # -- what the UI and the API render --------------------------------------------------------------------------

    def sections(self) -> list[LoadedSection]:
        sections = []
        for record in self._sorted_records():
            section: Section | None = record.api.registrations.section if record.active and record.api else None
            if section is not None:
                sections.append(LoadedSection(record.name, section.title, section.controls))
        return sections

    def tabs(self) -> list[LoadedTab]:
        tabs = []
        for record in self._sorted_records():
            if record.active and record.api is not None:
                registered: list[Tab] = record.api.registrations.tabs
                tabs.extend(LoadedTab(record.name, tab.title, tab.build) for tab in registered)
        return tabs

    def settings_sections(self) -> list[LoadedSettings]:
        return [
            LoadedSettings(record.name, record.title, tuple(record.api.registrations.settings))
            for record in self._sorted_records()
            if record.active and record.api is not None and record.api.registrations.settings
        ]

    def mark_ui_built(self) -> None:
        """The page now shows the UI of the extensions active at this moment."""
        with self._lock:
            self._rendered = frozenset(record.name for record in self._records.values() if record.active)

    def reload_needed(self) -> list[str]:
        """Extensions whose state differs from what the page shows (enabled, disabled, updated since)."""
        with self._lock:
            active = {record.name for record in self._records.values() if record.active}
            enabled = set(self._state.enabled) & set(self._records) if not self.safe_mode else set()
            changed = (self._rendered ^ active) | (enabled - active - self._failed_names()) | self._stale_code
        return sorted(changed)

    def _failed_names(self) -> set[str]:
        return {record.name for record in self._records.values() if record.status == STATUS_FAILED}

    def ui_failed(self, extension: str, message: str) -> None:
        """The UI could not build an extension's tab or section."""
        record = self._records.get(extension)
        if record is not None:
            self._mark_failed(record, message)

    # -- values: UI, API and infotext ⇄ GenerationParams.extensions -----------------------------------------------

    def _section_of(self, extension: str, field_name: str) -> LoadedSection:
        for section in self.sections():
            if section.extension == extension:
                return section
        names = ", ".join(section.extension for section in self.sections()) or "none"
        raise ParamError(field_name, f"no enabled extension with controls has this name (enabled: {names})")

    def values_from_mapping(self, raw: Mapping[str, object]) -> ExtensionValues:
        """{extension: {key: value}} (named values) → GenerationParams.extensions; ParamError naming the field."""
        params = GenerationParams()
        for extension, values in raw.items():
            section = self._section_of(str(extension), f"extensions.{extension}")
            if not isinstance(values, Mapping):
                raise ParamError(f"extensions.{extension}", "must be an object of named values")
            coerced = coerce_values(section.extension, section.controls, values)
            params = params.with_extension_values(section.extension, coerced)
        return params.extensions

    def values_from_alwayson(self, alwayson: Mapping[str, object]) -> ExtensionValues:
        """A1111's `alwayson_scripts: {"<title>": {"args": [...]}}`: args in the section's control order, or named."""
        named: dict[str, dict[str, object]] = {}
        for title, entry in alwayson.items():
            section = self._section_by_title(str(title))
            args = entry.get("args", []) if isinstance(entry, Mapping) else entry
            keys = [control.key for control in section.controls]
            if isinstance(args, Mapping):
                named[section.extension] = dict(args)
            elif isinstance(args, (list, tuple)):
                if len(args) > len(keys):
                    raise ParamError(f"alwayson_scripts.{title}.args",
                                     f"takes at most {len(keys)} values ({', '.join(keys)}), got {len(args)}")
                named[section.extension] = dict(zip(keys, args, strict=False))
            else:
                raise ParamError(f"alwayson_scripts.{title}", 'must be {"args": [...]} or {"args": {name: value}}')
        return self.values_from_mapping(named)

    def _section_by_title(self, title: str) -> LoadedSection:
        wanted = title.strip().lower()
        for section in self.sections():
            if wanted in (section.extension.lower(), section.title.lower()):
                return section
        raise ParamError("alwayson_scripts", f"always on script {title!r} not found")

    def values_from_infotext(self, fields: Mapping[str, str]) -> dict[str, dict[str, ExtensionValue]]:
        """Section values from parsed infotext fields (a missing key means that control's default)."""
        found: dict[str, dict[str, ExtensionValue]] = {}
        for section in self.sections():
            found[section.extension] = values_from_fields(section.extension, section.controls, fields)
        return found

    def pasted(self, prompt: str, negative_prompt: str, fields: Mapping[str, str]) -> InfotextPastedContext:
        """INFOTEXT_PASTED hooks over a parsed infotext; returns the (possibly rewritten) context."""
        context = InfotextPastedContext(prompt, negative_prompt, dict(fields))
        self.run(HookPoint.INFOTEXT_PASTED, context)
        return context

    def script_info(self) -> list[dict[str, Any]]:
        """A1111's GET /sdapi/v1/script-info entries for the enabled sections."""
        entries = []
        for section in self.sections():
            args = []
            for control in section.controls:
                arg: dict[str, Any] = {"label": control.label, "value": control.default, "minimum": None,
                                       "maximum": None, "step": None, "choices": None}
                if isinstance(control, Slider):
                    arg.update(minimum=control.minimum, maximum=control.maximum, step=control.step)
                if isinstance(control, Dropdown):
                    arg["choices"] = list(control.choices)
                args.append(arg)
            entries.append({"name": section.title.lower(), "is_alwayson": True, "is_img2img": False, "args": args})
        return entries

    # -- settings ------------------------------------------------------------------------------------------------

    def _setting_value(self, extension: str, key: str) -> ExtensionValue | None:
        return self._state.settings.get(extension, {}).get(key)

    def setting_values(self, extension: str) -> dict[str, ExtensionValue]:
        for settings in self.settings_sections():
            if settings.extension == extension:
                stored = self._state.settings.get(extension, {})
                return {control.key: stored.get(control.key, control.default) for control in settings.controls}
        return {}

    def update_settings(self, extension: str, raw: Mapping[str, object]) -> None:
        for settings in self.settings_sections():
            if settings.extension == extension:
                try:
                    values = coerce_values(extension, settings.controls, raw)
                except ParamError as error:
                    raise ParamError("settings." + error.field.removeprefix("extensions."), error.reason) from None
                with self._lock:
                    self._state.settings[extension] = values
                    self._write_state()
                return
        raise ParamError(f"settings.{extension}", "no enabled extension with settings has this name")

    # -- listing ---------------------------------------------------------------------------------------------------

    def get(self, name: str) -> ExtensionInfo:
        record = self._record(name)
        return self._info(record)

    def list_extensions(self) -> list[ExtensionInfo]:
        with self._lock:
            records = self._sorted_records()
        return [self._info(record) for record in records]

    @staticmethod
    def _remote(record: _Record) -> str:
        """The checkout's origin URL; "" for a folder that is not a git checkout or has no remote."""
        if not (record.directory / ".git").exists():
            return ""
        try:
            return run_git(["config", "--get", "remote.origin.url"], record.directory, 30)
        except ExtensionError:
            return ""

    def _info(self, record: _Record) -> ExtensionInfo:
        branch = commit = commit_date = ""
        if (record.directory / ".git").exists():
            try:
                commit, commit_date = (run_git(["log", "-1", "--format=%H%n%cI"], record.directory, 30).splitlines()
                                       + ["", ""])[:2]
                branch = run_git(["rev-parse", "--abbrev-ref", "HEAD"], record.directory, 30)
            except ExtensionError:
                pass
        remote = self._remote(record)
        manifest = record.manifest
        error = record.error or (f"bad manifest: {record.manifest_error}" if manifest is None else "")
        status = STATUS_FAILED if manifest is None else record.status
        return ExtensionInfo(
            name=record.name, title=record.title, version=manifest.version if manifest else "",
            description=manifest.description if manifest else "", directory=record.directory,
            builtin=record.builtin, enabled=record.name in self._state.enabled, status=status, error=error,
            traceback=record.traceback, remote=remote, branch=branch, commit=commit, commit_date=commit_date,
            requires=manifest.requires if manifest else (),
        )

    def _record(self, name: str) -> _Record:
        with self._lock:
            record = self._records.get(name)
        if record is None:
            raise ExtensionError(f"no extension named {name!r} is installed")
        return record

    # -- enable / disable -------------------------------------------------------------------------------------------

    def enable(self, name: str, install_requirements: bool = False) -> str:
        """Enable (and load at once) an installed extension; requirements are installed only when allowed."""
        with self._manage_lock:
            record = self._record(name)
            if record.manifest is None:
                raise ExtensionError(f"{name} cannot be enabled: bad manifest: {record.manifest_error}")
            installed_note = self._ensure_requirements(record.manifest, install_requirements)
            with self._lock:
                if name not in self._state.enabled:
                    self._state.enabled.append(name)
                    self._write_state()
                if self.safe_mode:
                    record.status = STATUS_SAFE_MODE
                    return f"Enabled {name}; it loads when the web UI starts without --disable-extensions."
                if not record.active:
                    self._activate(record)
                    self._rebuild_hook_table()
            if record.status == STATUS_FAILED:
                return f"Enabled {name}, but it failed to load: {record.error}"
            return f"{installed_note}Enabled {name}. Reload UI to show its controls."

    def disable(self, name: str) -> str:
        with self._manage_lock:
            record = self._record(name)
            with self._lock:
                if name in self._state.enabled:
                    self._state.enabled.remove(name)
                    self._write_state()
                # Its hooks stop now; Python cannot unload the module's code, which stays idle until a restart.
                self._deactivate(record)
                self._rebuild_hook_table()
            return f"Disabled {name}. Reload UI to remove its controls."

    def _ensure_requirements(self, manifest: Manifest, allowed: bool) -> str:
        missing: list[str] = []
        for text in manifest.requires:
            package, problem = check_requirement_text(text)
            if problem is None:
                continue
            if problem.startswith("not a valid"):
                raise ExtensionError(f"{manifest.name}: requirement {text!r} is {problem}")
            if package.lower().replace("_", "-") in PROTECTED_PACKAGES:
                raise ExtensionError(
                    f"{manifest.name}: requirement {text!r} refused: {package} is {problem}, and extensions may not "
                    f"replace {', '.join(PROTECTED_PACKAGES)}"
                )
            missing.append(text)
        if not missing:
            return ""
        if not allowed:
            raise ExtensionError(
                f"{manifest.name} needs {', '.join(missing)}, which is not installed. Allow installing its "
                "requirements (pip) to enable it."
            )
        self._pip_install(missing)
        return f"Installed {', '.join(missing)}. "

    def _pip_install(self, requirements: list[str]) -> None:
        # Constraints pin the protected packages to the installed versions, so no dependency can replace them.
        pins = []
        for package in PROTECTED_PACKAGES:
            try:
                pins.append(f"{package}=={importlib.metadata.version(package)}")
            except importlib.metadata.PackageNotFoundError:
                continue
        constraints = self.state_file.parent / f".pip-constraints-{secrets.token_hex(4)}.txt"
        constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
        try:
            completed = subprocess.run(
                [self.python, "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints),
                 *requirements],
                capture_output=True, text=True, timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False,
            )
        finally:
            constraints.unlink(missing_ok=True)
        if completed.returncode != 0:
            tail = " ".join((completed.stderr or completed.stdout).strip().splitlines()[-3:])
            raise ExtensionError(f"pip could not install {', '.join(requirements)}: {tail}")

    # -- install / update / remove (git) ---------------------------------------------------------------------------

    def _check_access(self) -> None:
        if not self.changes_allowed:
            raise ExtensionAccessError(ACCESS_REFUSED)

    def install(self, url: str, branch: str = "", folder: str = "") -> str:
        """Clone `url` (optionally `branch`) into the extensions folder, disabled. Runs none of its code."""
        self._check_access()
        url, branch, folder = url.strip(), branch.strip(), folder.strip()
        # Control characters (a NUL most of all) can never be part of a URL git accepts, nor of a process argument.
        if not url or url.startswith("-") or any(ch.isspace() or not ch.isprintable() for ch in url):
            raise ExtensionError(f"not a git URL: {url!r}")
        if branch and (not BRANCH_PATTERN.match(branch) or ".." in branch):
            raise ExtensionError(f"not a branch name: {branch!r}")
        with self._manage_lock:
            for record in list(self._records.values()):
                remote = self._remote(record)
                if remote and normalised_remote(remote) == normalised_remote(url):
                    raise ExtensionError(f"{url} is already installed as {record.name}")
            self.user_dir.mkdir(parents=True, exist_ok=True)
            staging = self.user_dir / f".installing-{secrets.token_hex(6)}"
            try:
                run_git(["clone", *(["--branch", branch] if branch else []), "--", url, str(staging)])
                try:
                    manifest_name = read_manifest(staging).name
                except ValueError:
                    manifest_name = folder_name_from_url(url)
                name = folder or manifest_name
                if not NAME_PATTERN.match(name):
                    raise ExtensionError(f"cannot name the extension's folder {name!r}; give a folder name")
                target = self.user_dir / name
                if target.exists() or name in self._records or manifest_name in self._records:
                    raise ExtensionError(f"an extension named {manifest_name} is already installed")
                os.replace(staging, target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
            with self._lock:
                self._discover()
                self._rebuild_hook_table()
                # Looked up by folder: the manifest's name, not the folder's, is the extension's name.
                record = next(record for record in self._records.values() if record.directory == target)
        where = f" into {target.name}/" if target.name != record.name else ""
        if record.manifest is None:
            return f"Installed {record.name}{where}, but it cannot be enabled: bad manifest: {record.manifest_error}"
        return (f"Installed {record.name} {record.manifest.version}{where} (disabled: none of its code ran). "
                "Enable it to use it.")

    def _user_record(self, name: str, action: str) -> _Record:
        record = self._record(name)
        if record.builtin:
            raise ExtensionError(f"{name} is built in: it is {action}d with the web UI itself")
        if not (record.directory / ".git").exists():
            raise ExtensionError(f"{name} is not a git checkout, so it cannot be {action}d here")
        return record

    def check_updates(self, name: str) -> str:
        """"behind N commits", "latest" or "unknown (...)" after a git fetch."""
        record = self._user_record(name, "update")
        try:
            run_git(["fetch", "--quiet"], record.directory)
            behind = int(run_git(["rev-list", "--count", "HEAD..@{u}"], record.directory))
        except (ExtensionError, ValueError) as error:
            return f"unknown ({error})"
        return f"behind {behind} commit{'s' if behind != 1 else ''}" if behind else "latest"

    def update(self, name: str) -> str:
        """git fetch + fast-forward; the new code runs after Reload UI."""
        self._check_access()
        with self._manage_lock:
            record = self._user_record(name, "update")
            before = run_git(["rev-parse", "HEAD"], record.directory)
            run_git(["fetch", "--quiet"], record.directory)
            run_git(["merge", "--ff-only", "@{u}"], record.directory)
            after = run_git(["rev-parse", "HEAD"], record.directory)
            if before == after:
                return f"{name} is already up to date ({after[:8]})."
            try:
                record.manifest, record.manifest_error = read_manifest(record.directory), ""
            except ValueError as error:
                record.manifest_error = str(error)
            with self._lock:
                if record.name in self._state.enabled:
                    self._stale_code.add(record.name)
            return f"Updated {name} from {before[:8]} to {after[:8]}. Reload UI to run the new code."

    def remove(self, name: str) -> str:
        self._check_access()
        with self._manage_lock:
            record = self._user_record(name, "remove")
            with self._lock:
                self._deactivate(record)
                if name in self._state.enabled:
                    self._state.enabled.remove(name)
                self._state.settings.pop(name, None)
                self._write_state()
                # Renamed first, so a half-deleted folder is never taken for an extension.
                trash = record.directory.with_name(f".removing-{secrets.token_hex(6)}")
                os.replace(record.directory, trash)
                shutil.rmtree(trash, ignore_errors=True)
                self._records.pop(record.name, None)
                self._rebuild_hook_table()
            return f"Removed {name}. Reload UI to remove its controls."

    # -- index -------------------------------------------------------------------------------------------------------

    @property
    def index_url(self) -> str:
        return self._state.index_url

    def load_index(self, url: str) -> list[IndexEntry]:
        """The extensions listed at an http(s) `url`, which is then saved as the index the Available list loads
        (the user's choice, so only a state-changing request may make it)."""
        entries = self.fetch_index(url)
        self.save_index_url(url)
        return entries

    def save_index_url(self, url: str) -> None:
        """Remember `url` (checked as fetch_index checks it) as the index the Available list loads."""
        url = checked_index_url(url)
        with self._lock:
            if url != self._state.index_url:
                self._state.index_url = url
                self._write_state()

    def fetch_index(self, url: str | None = None) -> list[IndexEntry]:
        """The extensions listed by the index JSON (A1111's format) at an http(s) `url`, or at the saved index URL.

        Only reads: saving the URL is save_index_url's (a request that changes state). Local files are read only
        from bytes the user picked in the UI (read_index), never from a path a request names. The error says that
        the index could not be loaded, never what was found there (whether a host answered, a file existed)."""
        url = checked_index_url(url if url is not None else self._state.index_url)
        try:
            with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - checked_index_url: http(s) only
                data = response.read(INDEX_MAX_BYTES + 1)
        except (OSError, ValueError) as error:
            logger.warning("could not load the extension index from %s: %s", url, error)
            raise ExtensionError(f"could not load the index from {url}") from None
        return self.read_index(data, url)

    def read_index(self, data: bytes, source: str) -> list[IndexEntry]:
        """The extensions listed in an index document's bytes; `source` names it in errors."""
        if len(data) > INDEX_MAX_BYTES:
            raise ExtensionError(f"the index at {source} is larger than {INDEX_MAX_BYTES // (1024 * 1024)} MB")
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ExtensionError(f"the index at {source} is not JSON") from None
        entries = document.get("extensions") if isinstance(document, dict) else document
        if not isinstance(entries, list):
            raise ExtensionError(f'the index at {source} has no "extensions" list')
        with self._lock:
            records = list(self._records.values())
        remotes = {normalised_remote(remote) for remote in map(self._remote, records) if remote}
        installed = remotes | {record.name for record in records}
        listed = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                continue
            entry_url = entry["url"]
            tags = entry.get("tags") if isinstance(entry.get("tags"), list) else []
            listed.append(IndexEntry(
                name=str(entry.get("name") or folder_name_from_url(entry_url)), url=entry_url,
                description=str(entry.get("description") or ""), tags=tuple(str(tag) for tag in tags),
                installed=normalised_remote(entry_url) in installed or folder_name_from_url(entry_url) in installed,
            ))
        return listed

    # -- state file ----------------------------------------------------------------------------------------------------

    def _read_state(self) -> _State:
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return _State()
        except (OSError, ValueError) as error:
            logger.error("%s is unreadable (%s); extensions start disabled", self.state_file, error)
            return _State()
        state = _State()
        if isinstance(data, dict):
            if isinstance(data.get("enabled"), list):
                state.enabled = [name for name in data["enabled"] if isinstance(name, str)]
            if isinstance(data.get("settings"), dict):
                state.settings = {name: dict(values) for name, values in data["settings"].items()
                                  if isinstance(values, dict)}
            if isinstance(data.get("index_url"), str):
                state.index_url = data["index_url"]
        return state

    def _write_state(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(dataclasses.asdict(self._state), indent=4, ensure_ascii=False)
        write_file_atomically(self.state_file, text.encode("utf-8"))
