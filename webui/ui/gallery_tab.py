"""The Gallery tab: every saved image, newest first, paged, searchable, with send-to-txt2img and delete.
Must not import torch or the engine; it reads webui.app's gallery index."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from webui.app.gallery import GalleryPage
from webui.core.params import ParamError
from webui.ui.context import UiContext
from webui.ui.paste import checkpoint_choice, values_from_infotext
from webui.ui.txt2img import TopBar, Txt2ImgTab, request_checkpoint_swap, wire_send_to_txt2img

PAGE_SIZE = 24
ALL = "All"


@dataclass
class GalleryTab:
    search: gr.Textbox
    day: gr.Dropdown
    model: gr.Dropdown
    refresh: gr.Button
    previous: gr.Button
    next: gr.Button
    page_info: gr.Markdown
    gallery: gr.Gallery
    infotext: gr.Textbox
    send_to_txt2img: gr.Button
    switch_checkpoint: gr.Button
    delete: gr.Button
    confirm_row: gr.Row
    delete_confirm: gr.Button
    delete_cancel: gr.Button
    page: gr.State
    paths: gr.State
    selected: gr.State


def build_gallery_tab() -> GalleryTab:
    with gr.Row(equal_height=True):
        search = gr.Textbox(label="Search prompts", elem_id="gallery_search", scale=4)
        day = gr.Dropdown(choices=[ALL], value=ALL, label="Date", elem_id="gallery_date", scale=2)
        model = gr.Dropdown(choices=[ALL], value=ALL, label="Model", elem_id="gallery_model", scale=2)
        refresh = gr.Button("↻ Refresh", elem_id="gallery_refresh", scale=1)
    with gr.Row(equal_height=True):
        previous = gr.Button("◀ Previous", elem_id="gallery_prev", scale=1)
        page_info = gr.Markdown("", elem_id="gallery_page_info")
        next_page = gr.Button("Next ▶", elem_id="gallery_next", scale=1)
    with gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Outputs", elem_id="gallery_gallery", columns=6, height=520,
                                 object_fit="contain", interactive=False, allow_preview=False,
                                 preview=False)
        with gr.Column(scale=2):
            infotext = gr.Textbox(label="Generation parameters", lines=8, interactive=False,
                                  elem_id="gallery_infotext")
            with gr.Row():
                send_to_txt2img = gr.Button("Send to txt2img", elem_id="gallery_send_to_txt2img")
                switch_checkpoint = gr.Button("Switch checkpoint", elem_id="gallery_switch_ckpt", visible=False)
            delete = gr.Button("Delete", elem_id="gallery_delete", variant="stop")
            with gr.Row(visible=False) as confirm_row:
                delete_confirm = gr.Button("Really delete", elem_id="gallery_delete_confirm", variant="stop")
                delete_cancel = gr.Button("Cancel", elem_id="gallery_delete_cancel")
    return GalleryTab(search, day, model, refresh, previous, next_page, page_info, gallery, infotext,
                      send_to_txt2img, switch_checkpoint, delete, confirm_row, delete_confirm, delete_cancel,
                      page=gr.State(0), paths=gr.State([]), selected=gr.State(None))


def wire_gallery(
    ctx: UiContext, tab: GalleryTab, top: TopBar, txt2img: Txt2ImgTab, tabs: gr.Tabs, tab_item: gr.Tab
) -> None:
    def show(page: int, search: str, day: str, model: str) -> tuple[Any, ...]:
        result: GalleryPage = ctx.gallery.page(
            page, PAGE_SIZE, search or "", None if day in (ALL, None) else day, None if model in (ALL, None) else model
        )
        paths = [str(entry.path) for entry in result.entries]
        noun = "image" if result.total == 1 else "images"
        info = f"Page {result.page + 1} of {max(result.page_count, 1)} · {result.total} {noun}"
        return (result.page, paths, paths, info, gr.update(choices=[ALL, *ctx.gallery.days()]),
                gr.update(choices=[ALL, *ctx.gallery.models()]), "", None, gr.update(visible=False),
                gr.update(visible=False))

    filters = [tab.search, tab.day, tab.model]
    shown = [tab.page, tab.paths, tab.gallery, tab.page_info, tab.day, tab.model, tab.infotext, tab.selected,
             tab.switch_checkpoint, tab.confirm_row]

    def refresh(page: int, search: str, day: str, model: str) -> tuple[Any, ...]:
        ctx.gallery.refresh()
        return show(page, search, day, model)

    tab.refresh.click(refresh, inputs=[tab.page, *filters], outputs=shown, api_name=False)
    tab.previous.click(lambda p, *f: show(max(p - 1, 0), *f), inputs=[tab.page, *filters], outputs=shown,
                       api_name=False)
    tab.next.click(lambda p, *f: show(p + 1, *f), inputs=[tab.page, *filters], outputs=shown, api_name=False)
    for component in filters:
        component.change(lambda *f: show(0, *f), inputs=filters, outputs=shown, api_name=False,
                         trigger_mode="always_last", show_progress="hidden")
    # Opening the tab shows what was saved since (the index is updated as images are written).
    tab_item.select(lambda p, *f: show(p, *f), inputs=[tab.page, *filters], outputs=shown, api_name=False)

    def select(paths: list[str], checkpoint: str | None, event: gr.SelectData) -> tuple[Any, ...]:
        index = int(event.index)
        if not 0 <= index < len(paths):
            return "", None, gr.update(visible=False)
        entry = ctx.gallery.entry(Path(paths[index]))
        infotext = entry.infotext or ""
        differs = False
        label = "Switch checkpoint"
        try:
            _, stem = values_from_infotext(infotext) if infotext else ({}, None)
        except ParamError:
            stem = None
        choice = checkpoint_choice(stem, ctx.list_checkpoints())
        if stem and choice is not None and choice != checkpoint:
            differs, label = True, f"Switch checkpoint to {choice}"
        return infotext, paths[index], gr.update(visible=differs, value=label)

    tab.gallery.select(select, inputs=[tab.paths, top.checkpoint],
                       outputs=[tab.infotext, tab.selected, tab.switch_checkpoint], api_name=False)

    # The checkpoint is not pasted here: the Switch button offers it (A1111 asks before swapping).
    wire_send_to_txt2img(ctx, tab.send_to_txt2img, tab.infotext, top, txt2img, tabs, set_checkpoint=False)

    def switch(infotext: str) -> Any:
        _, stem = values_from_infotext(infotext)
        choice = checkpoint_choice(stem, ctx.list_checkpoints())
        return gr.update(value=choice) if choice else gr.update()

    # Setting the dropdown's value does not fire its .input event, so the swap is requested explicitly.
    tab.switch_checkpoint.click(switch, inputs=tab.infotext, outputs=top.checkpoint, api_name=False).then(
        request_checkpoint_swap(ctx), inputs=top.checkpoint, outputs=top.status, api_name=False,
        concurrency_limit=None,
    ).then(lambda: gr.update(visible=False), outputs=tab.switch_checkpoint, api_name=False)

    tab.delete.click(lambda selected: gr.update(visible=bool(selected)), inputs=tab.selected,
                     outputs=tab.confirm_row, api_name=False)
    tab.delete_cancel.click(lambda: gr.update(visible=False), outputs=tab.confirm_row, api_name=False)

    def delete(selected: str | None, page: int, search: str, day: str, model: str) -> tuple[Any, ...]:
        if selected:
            ctx.gallery.delete(Path(selected))
        return show(page, search, day, model)

    tab.delete_confirm.click(delete, inputs=[tab.selected, tab.page, *filters], outputs=shown, api_name=False)
