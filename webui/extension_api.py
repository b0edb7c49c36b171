"""The public plugin surface: what `setup(api)` of an extension receives, plus the hook points, contexts and controls.
The only webui module an extension may import; itself imports webui.core only (never app, engine, ui or api).

An extension is a folder `extensions/<name>/` with `extension.toml` and `__init__.py`:

    from webui.extension_api import CfgContext, ExtensionAPI, HookPoint, Slider

    def setup(api: ExtensionAPI) -> None:
        api.add_txt2img_section("My effect", [Slider("strength", "Strength", 0, 1, default=0, infotext="My effect")])
        api.on(HookPoint.CFG, lambda ctx: apply(api.values(ctx.params)["strength"], ctx))

Hooks change the context they get (never library functions); every call is isolated by the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from webui import __version__ as WEBUI_VERSION
from webui.core.extension_values import Checkbox, Control, Dropdown, Slider, Textbox, check_controls, coerce_values
from webui.core.hooks import (
    AppStartedContext,
    BeforeGenerationContext,
    BeforeSaveContext,
    CfgContext,
    ConditioningContext,
    HookContext,
    HookFunction,
    HookPoint,
    ImageContext,
    InfotextPastedContext,
    ModelLoadedContext,
    StepContext,
    WeightPatchesContext,
    WeightPatchSpec,
)
from webui.core.params import ExtensionValue, GenerationParams, ParamError

__all__ = [
    "WEBUI_VERSION", "AppStartedContext", "BeforeGenerationContext", "BeforeSaveContext", "CfgContext", "Checkbox",
    "ConditioningContext", "Control", "Dropdown", "ExtensionAPI", "ExtensionValue", "GenerationParams", "HookContext",
    "HookPoint", "ImageContext", "InfotextPastedContext", "ModelLoadedContext", "ParamError", "Registrations",
    "Slider", "StepContext", "Textbox", "WeightPatchSpec", "WeightPatchesContext",
]


@dataclass(frozen=True)
class Section:
    """Controls shown as one section of the txt2img tab; their values travel in GenerationParams.extensions."""

    title: str
    controls: tuple[Control, ...]


@dataclass(frozen=True)
class Tab:
    """A top-level tab; `build()` is called inside the tab while the page is built (it may use gradio)."""

    title: str
    build: Callable[[], None]


@dataclass
class Registrations:
    """Everything one extension's setup() declared; read by the host (webui.app.extensions)."""

    hooks: list[tuple[HookPoint, HookFunction]] = field(default_factory=list)
    section: Section | None = None
    tabs: list[Tab] = field(default_factory=list)
    settings: list[Control] = field(default_factory=list)


class ExtensionAPI:
    """One extension's handle on the web UI, valid for the life of the loaded extension."""

    def __init__(
        self,
        name: str,
        directory: Path,
        data_dir: Path,
        read_setting: Callable[[str, str], ExtensionValue | None],
    ) -> None:
        self.name = name
        self.directory = directory  # the extension's own folder
        self.data_dir = data_dir  # the web UI's data folder (models/, outputs/ …)
        self.registrations = Registrations()
        self._read_setting = read_setting

    # -- hooks ------------------------------------------------------------------------------------------------

    def on(self, point: HookPoint, hook: HookFunction) -> None:
        """Call `hook(context)` at `point`; the context type is named by point.value (see webui.core.hooks)."""
        if not isinstance(point, HookPoint):
            raise TypeError(f"on(): expected a HookPoint, got {point!r}")
        if not callable(hook):
            raise TypeError(f"on(): {hook!r} is not callable")
        self.registrations.hooks.append((point, hook))

    # -- UI -------------------------------------------------------------------------------------------------

    def add_txt2img_section(self, title: str, controls: Sequence[Control]) -> None:
        """One section in the txt2img tab. Values are named `extensions.<name>.<key>`; A1111's
        alwayson_scripts args map onto `controls` in this order. Controls with `infotext=` are written to the
        infotext when not at their default and filled back by "Send to txt2img"."""
        if self.registrations.section is not None:
            raise ValueError("add_txt2img_section(): an extension has one txt2img section")
        check_controls(controls)
        self.registrations.section = Section(title, tuple(controls))

    def add_tab(self, title: str, build: Callable[[], None]) -> None:
        self.registrations.tabs.append(Tab(title, build))

    def add_setting(self, control: Control) -> None:
        """A setting in the Settings tab (section "Extensions"), persisted by the host; read with setting()."""
        check_controls([*self.registrations.settings, control])
        self.registrations.settings.append(control)

    # -- values -----------------------------------------------------------------------------------------------

    def values(self, params: GenerationParams) -> dict[str, ExtensionValue]:
        """This extension's section values for a job, with each control's default where none was sent."""
        section = self.registrations.section
        if section is None:
            return {}
        return coerce_values(self.name, section.controls, params.extension_values(self.name))

    def setting(self, key: str) -> ExtensionValue:
        """The stored value of one of this extension's settings (its default until changed)."""
        for control in self.registrations.settings:
            if control.key == key:
                stored = self._read_setting(self.name, key)
                return control.default if stored is None else stored
        raise KeyError(f"{self.name} declares no setting {key!r}")
