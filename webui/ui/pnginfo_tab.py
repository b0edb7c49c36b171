"""The PNG Info tab: drop any image (PNG/JPEG/WebP, ours or A1111's), see its parameters, send them to txt2img.
Must not import torch or the engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from webui.app.outputs import read_infotext
from webui.core.params import ParamError
from webui.ui.context import UiContext
from webui.ui.txt2img import TopBar, Txt2ImgTab, paste_updates, pasteable_controls, progress_html


@dataclass
class PngInfoTab:
    image: gr.File
    preview: gr.Image
    infotext: gr.Textbox
    send_to_txt2img: gr.Button


def build_pnginfo_tab() -> PngInfoTab:
    with gr.Row():
        with gr.Column():
            # A file (not gr.Image) so the original bytes, metadata included, reach the server unchanged.
            image = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="pnginfo_image")
            preview = gr.Image(label="Preview", type="filepath", interactive=False, elem_id="pnginfo_preview",
                               height=320)
        with gr.Column():
            infotext = gr.Textbox(label="Parameters", lines=10, interactive=False, elem_id="pnginfo_infotext")
            send_to_txt2img = gr.Button("Send to txt2img", elem_id="pnginfo_send_to_txt2img")
    return PngInfoTab(image, preview, infotext, send_to_txt2img)


def wire_pnginfo(ctx: UiContext, tab: PngInfoTab, top: TopBar, txt2img: Txt2ImgTab, tabs: gr.Tabs) -> None:
    def read(path: str | None) -> tuple[str, str | None]:
        if not path:
            return "", None
        try:
            return read_infotext(Path(path)) or "No generation parameters found in this image.", path
        except OSError as error:
            return f"Cannot read this file as an image: {error}", None

    tab.image.change(read, inputs=tab.image, outputs=[tab.infotext, tab.preview], api_name=False)
    controls = pasteable_controls(top, txt2img)

    def send(infotext: str) -> dict[Any, Any]:
        if not infotext or "\n" not in infotext and ":" not in infotext:
            return {}
        try:
            updates = paste_updates(ctx, infotext, controls, top.checkpoint)
        except ParamError as error:
            return {txt2img.progress: progress_html(0.0, f"Error: {error}", failed=True)}
        return {**updates, tabs: gr.Tabs(selected="txt2img")}

    tab.send_to_txt2img.click(send, inputs=tab.infotext,
                              outputs=[*controls.values(), top.checkpoint, txt2img.progress, tabs], api_name=False)
