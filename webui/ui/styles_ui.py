"""The txt2img styles picker (A1111's multi-select "Styles" beside the prompt) and its ✎ apply button; the selected
styles are applied to the prompts when a job is queued. Must not import torch or the engine; styles come from
webui.core.styles through UiContext."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from webui.core.styles import StyleDatabase
from webui.ui.context import UiContext


@dataclass
class StylesPicker:
    dropdown: gr.Dropdown
    apply: gr.Button


def style_names(styles: StyleDatabase | None) -> list[str]:
    """The styles a user can pick, in database order (the dividers between files are left out: they hold no text)."""
    if styles is None:
        return []
    return [style.name for style in styles.styles() if not style.is_divider]


def style_choices_update(ctx: UiContext, chosen: Sequence[str] | None) -> Any:
    """The picker with the styles as they are now; chosen styles that were deleted drop out."""
    names = style_names(ctx.styles)
    return gr.update(choices=names, value=[name for name in (chosen or []) if name in names])


def style_choices_now(ctx: UiContext) -> Callable[[Sequence[str] | None], Any]:
    """At page load: styles created or deleted since the page was built (by another browser, or the API)."""
    return lambda chosen: style_choices_update(ctx, chosen)


def apply_styles(styles: StyleDatabase | None, prompt: str, negative_prompt: str,
                 names: Sequence[str] | None) -> tuple[str, str]:
    """A1111: the selected styles, in the order picked, applied to the prompt and the negative prompt."""
    if styles is None or not names:
        return prompt, negative_prompt
    return styles.apply(prompt, negative_prompt, list(names))


def build_styles_picker(ctx: UiContext) -> StylesPicker:
    with gr.Row(equal_height=True):
        dropdown = gr.Dropdown(choices=style_names(ctx.styles), value=[], multiselect=True, label="Styles",
                               elem_id="txt2img_styles", scale=4, min_width=120)
        apply = gr.Button("✎", elem_id="txt2img_style_apply", scale=0, min_width=48)
    return StylesPicker(dropdown, apply)


def wire_styles_picker(ctx: UiContext, picker: StylesPicker, prompt: gr.Textbox, negative_prompt: gr.Textbox) -> None:
    """✎ writes the selected styles into the prompts and clears the selection (A1111's "apply styles"), so they are
    not applied a second time when the job is queued."""

    def materialize(prompt_text: str, negative_text: str, chosen: list[str] | None) -> tuple[str, str, Any]:
        new_prompt, new_negative = apply_styles(ctx.styles, prompt_text or "", negative_text or "", chosen)
        return new_prompt, new_negative, gr.update(value=[])

    picker.apply.click(materialize, inputs=[prompt, negative_prompt, picker.dropdown],
                       outputs=[prompt, negative_prompt, picker.dropdown], api_name=False)
