"""The Settings tab: output folder and format, file name pattern, live preview frequency, UI defaults.
Must not import torch or the engine; values are validated and stored by webui.app's settings store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from webui.app.settings_store import (
    CHECKPOINT_CACHE_HIGH,
    CHECKPOINT_CACHE_LOW,
    CHECKPOINTS_LIMIT_HIGH,
    CHECKPOINTS_LIMIT_LOW,
    PROMPT_CHUNKS_HIGH,
    PROMPT_CHUNKS_LOW,
)
from webui.core import samplers
from webui.core.params import OUTPUT_FORMATS, ParamError
from webui.ui.context import UiContext
from webui.ui.extension_ui import build_extension_settings, save_extension_settings


@dataclass
class SettingsTab:
    outdir: gr.Textbox
    samples_format: gr.Dropdown
    filename_pattern: gr.Textbox
    preview_every: gr.Slider
    default_steps: gr.Slider
    default_cfg_scale: gr.Slider
    default_sampler: gr.Dropdown
    default_scheduler: gr.Dropdown
    default_width: gr.Slider
    default_height: gr.Slider
    default_negative_prompt: gr.Textbox
    apply: gr.Button
    result: gr.Markdown
    # Enabled extensions' settings (declared controls, stored by the extension host) and where their save reports.
    extension_settings: list[Any] = field(default_factory=list)
    extension_result: gr.Markdown | None = None
    checkpoint_cache: gr.Slider | None = None
    checkpoints_limit: gr.Slider | None = None
    prompt_chunks: gr.Slider | None = None
    model_result: gr.Markdown | None = None


def build_settings_tab(ctx: UiContext) -> SettingsTab:
    current = ctx.settings.current
    defaults = current.ui_defaults
    gr.Markdown("### Saving images")
    outdir = gr.Textbox(label="Output folder (empty: outputs/ in the data folder)", value=current.outdir,
                        elem_id="settings_outdir")
    samples_format = gr.Dropdown(choices=list(OUTPUT_FORMATS), value=current.samples_format,
                                 label="File format for images", elem_id="settings_format")
    filename_pattern = gr.Textbox(label="File name pattern ([seed], [steps], [cfg], [sampler], [model_name], "
                                  "[prompt_words], [date], [datetime] …)", value=current.filename_pattern,
                                  elem_id="settings_filename_pattern")
    gr.Markdown("### Live previews")
    preview_every = gr.Slider(0, 150, step=1, value=current.preview_every_n_steps,
                              label="Show a live preview every N sampling steps (0: off)",
                              elem_id="settings_preview_every")
    gr.Markdown("### txt2img defaults (used when a browser has no saved state)")
    with gr.Row():
        default_steps = gr.Slider(1, 150, step=1, value=defaults.get("steps", 20), label="Sampling steps",
                                  elem_id="settings_default_steps")
        default_cfg_scale = gr.Slider(1.0, 30.0, step=0.5, value=defaults.get("cfg_scale", 7.0), label="CFG Scale",
                                      elem_id="settings_default_cfg_scale")
    with gr.Row():
        default_sampler = gr.Dropdown(choices=list(samplers.SAMPLERS), value=defaults.get("sampler"),
                                      label="Sampling method", elem_id="settings_default_sampler")
        default_scheduler = gr.Dropdown(choices=list(samplers.SCHEDULES), value=defaults.get("scheduler"),
                                        label="Schedule type", elem_id="settings_default_scheduler")
    with gr.Row():
        default_width = gr.Slider(64, 2048, step=8, value=defaults.get("width", 512), label="Width",
                                  elem_id="settings_default_width")
        default_height = gr.Slider(64, 2048, step=8, value=defaults.get("height", 512), label="Height",
                                   elem_id="settings_default_height")
    default_negative_prompt = gr.Textbox(label="Negative prompt", value=str(defaults.get("negative_prompt", "")),
                                         elem_id="settings_default_negative_prompt")
    gr.Markdown("### Stable Diffusion")
    with gr.Row():
        checkpoint_cache = gr.Slider(
            CHECKPOINT_CACHE_LOW, CHECKPOINT_CACHE_HIGH, step=1, value=current.sd_checkpoint_cache,
            label="Checkpoints to cache in RAM (swapping back to one is a copy, not a file read)",
            elem_id="settings_checkpoint_cache",
        )
        checkpoints_limit = gr.Slider(
            CHECKPOINTS_LIMIT_LOW, CHECKPOINTS_LIMIT_HIGH, step=1, value=current.sd_checkpoints_limit,
            label="Checkpoints kept on the GPU at the same time", elem_id="settings_checkpoints_limit",
        )
    prompt_chunks = gr.Slider(
        PROMPT_CHUNKS_LOW, PROMPT_CHUNKS_HIGH, step=1, value=current.max_prompt_chunks,
        label="Longest prompt a job may have, in 75-token chunks (longer prompts are refused)",
        elem_id="settings_max_prompt_chunks",
    )
    extension_settings = build_extension_settings(ctx.extensions)
    apply = gr.Button("Apply settings", variant="primary", elem_id="settings_apply")
    result = gr.Markdown(elem_id="settings_result")
    extension_result = gr.Markdown(elem_id="settings_extensions_result")
    model_result = gr.Markdown(elem_id="settings_model_result")
    return SettingsTab(outdir, samples_format, filename_pattern, preview_every, default_steps, default_cfg_scale,
                       default_sampler, default_scheduler, default_width, default_height, default_negative_prompt,
                       apply, result, extension_settings, extension_result, checkpoint_cache, checkpoints_limit,
                       prompt_chunks, model_result)


def settings_components(tab: SettingsTab) -> list[gr.components.Component]:
    return [tab.outdir, tab.samples_format, tab.filename_pattern, tab.preview_every, tab.default_steps,
            tab.default_cfg_scale, tab.default_sampler, tab.default_scheduler, tab.default_width,
            tab.default_height, tab.default_negative_prompt]


def settings_values(ctx: UiContext) -> Callable[[], list[Any]]:
    """The stored settings in settings_components() order, read at each page load (not at build time)."""

    def values() -> list[Any]:
        current = ctx.settings.current
        defaults = current.ui_defaults
        return [current.outdir, current.samples_format, current.filename_pattern, current.preview_every_n_steps,
                defaults.get("steps"), defaults.get("cfg_scale"), defaults.get("sampler"), defaults.get("scheduler"),
                defaults.get("width"), defaults.get("height"), defaults.get("negative_prompt", "")]

    return values


def wire_settings(ctx: UiContext, tab: SettingsTab) -> None:
    def apply(outdir: str, samples_format: str, pattern: str, preview_every: float, steps: float, cfg: float,
              sampler: str, scheduler: str, width: float, height: float, negative: str) -> str:
        ui_defaults: dict[str, Any] = {
            **ctx.settings.current.ui_defaults, "steps": int(steps), "cfg_scale": float(cfg), "sampler": sampler,
            "scheduler": scheduler, "width": int(width), "height": int(height), "negative_prompt": negative,
        }
        changes = {"outdir": outdir.strip(), "samples_format": samples_format, "filename_pattern": pattern,
                   "preview_every_n_steps": int(preview_every), "ui_defaults": ui_defaults}
        try:
            _, notes = ctx.settings.update(changes)
        except ParamError as error:
            return f"**Not saved.** {error}"
        return "  \n".join(notes)

    tab.apply.click(apply, inputs=settings_components(tab), outputs=tab.result, api_name=False)

    def apply_model_settings(cache: float, limit: float, prompt_chunks: float) -> str:
        try:
            _, notes = ctx.settings.update({"sd_checkpoint_cache": int(cache), "sd_checkpoints_limit": int(limit),
                                            "max_prompt_chunks": int(prompt_chunks)})
        except ParamError as error:
            return f"**Not saved.** {error}"
        # The main Apply handler already reports "Saved." or "Nothing to save"; only what changed here is added.
        return "  \n".join(note for note in notes if note.startswith(("sd_checkpoint", "max_prompt_chunks")))

    model_inputs = [tab.checkpoint_cache, tab.checkpoints_limit, tab.prompt_chunks]
    if all(component is not None for component in model_inputs) and tab.model_result is not None:
        tab.apply.click(apply_model_settings, inputs=model_inputs, outputs=tab.model_result, api_name=False)

    extension_inputs = [component for _, components in tab.extension_settings for component in components]
    if extension_inputs and tab.extension_result is not None:
        def apply_extension_settings(*values: Any) -> str:
            try:
                save_extension_settings(ctx.extensions, tab.extension_settings, values)
            except ParamError as error:
                return f"**Extension settings not saved.** {error}"
            return "Extension settings saved (applied now)."

        tab.apply.click(apply_extension_settings, inputs=extension_inputs, outputs=tab.extension_result,
                        api_name=False)
