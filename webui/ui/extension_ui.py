"""Extensions' UI: their txt2img sections, their tabs and their settings, rendered from the controls they declared.
Must not import torch or the engine; values go to GenerationParams.extensions through the extension host."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import gradio as gr

from webui.app.extensions import ExtensionHost, LoadedSettings
from webui.core.extension_values import Checkbox, Control, Dropdown, Slider, Textbox
from webui.core.params import ExtensionValues, GenerationParams

logger = logging.getLogger(__name__)


def control_id(extension: str, key: str) -> str:
    """The name a control's value travels under, and (with '.' → '_') its elem_id."""
    return f"extensions.{extension}.{key}"


def elem_id_of(name: str) -> str:
    return "ext_" + name.removeprefix("extensions.").replace(".", "_").replace("-", "_")


def render_control(control: Control, elem_id: str, value: Any = None) -> gr.components.Component:
    shown = control.default if value is None else value
    if isinstance(control, Slider):
        return gr.Slider(control.minimum, control.maximum, step=1 if control.integer else control.step,
                         value=shown, label=control.label, elem_id=elem_id)
    if isinstance(control, Checkbox):
        return gr.Checkbox(value=bool(shown), label=control.label, elem_id=elem_id)
    if isinstance(control, Dropdown):
        return gr.Dropdown(choices=list(control.choices), value=shown, label=control.label, elem_id=elem_id)
    if isinstance(control, Textbox):
        return gr.Textbox(value=str(shown), label=control.label, lines=control.lines, elem_id=elem_id)
    raise TypeError(f"unknown control type {type(control).__name__}")


def build_txt2img_sections(host: ExtensionHost | None) -> dict[str, gr.components.Component]:
    """Each enabled extension's section (an accordion) in the txt2img tab; name → component."""
    components: dict[str, gr.components.Component] = {}
    if host is None:
        return components
    for section in host.sections():
        with gr.Accordion(section.title, open=False, elem_id=f"ext_{section.extension.replace('-', '_')}_section"):
            for control in section.controls:
                name = control_id(section.extension, control.key)
                components[name] = render_control(control, elem_id_of(name))
    return components


def extension_values_from_controls(host: ExtensionHost | None, values: Mapping[str, Any]) -> ExtensionValues:
    """Control values by name ("extensions.<ext>.<key>") → GenerationParams.extensions, checked by the host."""
    if host is None or not values:
        return ()
    # A page built before an extension was disabled still shows its controls; their values are dropped.
    active = {section.extension for section in host.sections()}
    grouped: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        _, extension, key = name.split(".", 2)
        if extension in active:
            grouped.setdefault(extension, {})[key] = value
    return host.values_from_mapping(grouped)


def pasted_extension_values(host: ExtensionHost | None, fields: Mapping[str, str]) -> dict[str, Any]:
    """Control name → value from an infotext's fields (defaults where a key is missing)."""
    if host is None:
        return {}
    found: dict[str, Any] = {}
    for extension, values in host.values_from_infotext(fields).items():
        for key, value in values.items():
            found[control_id(extension, key)] = value
    return found


def build_extension_tabs(host: ExtensionHost | None) -> None:
    """Each enabled extension's tabs; a tab whose build raises shows the error and marks its extension failed."""
    if host is None:
        return
    for tab in host.tabs():
        with gr.Tab(tab.title, elem_id=f"tab_ext_{tab.extension.replace('-', '_')}"):
            try:
                tab.build()
            except Exception as error:  # an extension's UI code may raise anything; the page still builds
                host.ui_failed(tab.extension, f"tab {tab.title!r} raised {type(error).__name__}: {error}")
                logger.error("extension %s: tab %s failed:\n%s", tab.extension, tab.title, traceback.format_exc())
                gr.Markdown(f"**{tab.extension} failed to build this tab:** {type(error).__name__}: {error}")


def build_extension_settings(host: ExtensionHost | None) -> list[tuple[LoadedSettings, list[gr.components.Component]]]:
    """The enabled extensions' settings, one group each, with their stored values."""
    built: list[tuple[LoadedSettings, list[gr.components.Component]]] = []
    if host is None:
        return built
    sections = host.settings_sections()
    if sections:
        gr.Markdown("### Extensions")
    for settings in sections:
        stored = host.setting_values(settings.extension)
        with gr.Group():
            components = [
                render_control(control, f"setting_{elem_id_of(control_id(settings.extension, control.key))}",
                               stored.get(control.key))
                for control in settings.controls
            ]
        built.append((settings, components))
    return built


def save_extension_settings(
    host: ExtensionHost | None,
    built: Sequence[tuple[LoadedSettings, list[gr.components.Component]]],
    values: Sequence[Any],
) -> None:
    """Store the values of build_extension_settings' components (in that order); ParamError names the setting."""
    if host is None:
        return
    position = 0
    for settings, components in built:
        chunk = values[position : position + len(components)]
        position += len(components)
        host.update_settings(settings.extension, {c.key: v for c, v in zip(settings.controls, chunk, strict=True)})


def params_with_extensions(params: GenerationParams, extensions: ExtensionValues) -> GenerationParams:
    return params.replace(extensions=extensions).validated() if extensions else params
