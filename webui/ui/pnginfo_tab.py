"""The PNG Info tab: drop any image (PNG/JPEG/WebP, ours or A1111's), see its parameters, send them to txt2img.
Must not import torch or the engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from webui.app.outputs import read_infotext
from webui.ui.context import UiContext
from webui.ui.txt2img import TopBar, Txt2ImgTab, wire_send_to_txt2img


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
    def read(path: str | None) -> tuple[Any, str | None]:
        # Messages go in the placeholder, so "Send to txt2img" never pastes them as a prompt.
        if not path:
            return gr.update(value="", placeholder=""), None
        try:
            infotext = read_infotext(Path(path))
        except OSError as error:
            return gr.update(value="", placeholder=f"Cannot read this file as an image: {error}"), None
        if not infotext:
            return gr.update(value="", placeholder="No generation parameters found in this image."), path
        return gr.update(value=infotext, placeholder=""), path

    tab.image.change(read, inputs=tab.image, outputs=[tab.infotext, tab.preview], api_name=False)
    wire_send_to_txt2img(ctx, tab.send_to_txt2img, tab.infotext, top, txt2img, tabs, set_checkpoint=True)
