"""The default-model offer under the top bar while no checkpoint exists: Download button, progress bar, Cancel.
Must not import torch or the engine: the download runs on webui.app's BackgroundDownload thread, polled by a gr.Timer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import gradio as gr

from webui.app.model_download import BackgroundDownload, DownloadState, DownloadStatus, human_bytes
from webui.ui.context import UiContext
from webui.ui.txt2img import TopBar, loaded_status, progress_html

POLL_SECONDS = 1.0


@dataclass
class DownloadPanel:
    box: gr.Group
    note: gr.Markdown
    start: gr.Button
    cancel: gr.Button
    progress: gr.HTML
    timer: gr.Timer


def offer_text(download: BackgroundDownload) -> str:
    host = urlsplit(download.spec.url).netloc
    return (
        f"**No checkpoint yet.** Download {download.spec.title} from {host} into `{download.folder}` "
        "(resumable, checked against its sha256), or put a `.safetensors` checkpoint there and press ↻."
    )


def status_text(download: BackgroundDownload, status: DownloadStatus) -> str:
    name = download.spec.file_name
    if status.state == DownloadState.DONE:
        return f"Done: {name} downloaded and verified; loading it"
    if status.state == DownloadState.FAILED:
        return f"Error: {status.error}"
    if status.state == DownloadState.CANCELLED:
        return f"Cancelled at {human_bytes(status.done_bytes)}; Download resumes from there"
    if status.state == DownloadState.IDLE:
        return "Not started"
    if status.cancelling:
        return f"Cancelling at {human_bytes(status.done_bytes)}"
    if status.total_bytes:
        return (f"Downloading {name}: {status.fraction * 100:.0f}% "
                f"({human_bytes(status.done_bytes)} of {human_bytes(status.total_bytes)})")
    return f"Downloading {name}: {human_bytes(status.done_bytes)}"


def build_download_panel(ctx: UiContext) -> DownloadPanel | None:
    """The (initially hidden) panel; page load shows it when there is no checkpoint. None without a download."""
    download = ctx.model_download
    if download is None:
        return None
    with gr.Group(visible=False, elem_id="model_download") as box:
        note = gr.Markdown(offer_text(download), elem_id="model_download_note")
        with gr.Row():
            start = gr.Button(f"Download {download.spec.title}", variant="primary", elem_id="model_download_start")
            cancel = gr.Button("Cancel", elem_id="model_download_cancel", visible=False)
        progress = gr.HTML(progress_html(0.0, "Not started"), elem_id="model_download_progress", visible=False)
    timer = gr.Timer(POLL_SECONDS, active=False)
    return DownloadPanel(box, note, start, cancel, progress, timer)


def wire_download_panel(ctx: UiContext, demo: gr.Blocks, panel: DownloadPanel | None, top: TopBar) -> None:
    if panel is None or ctx.model_download is None:
        return
    download = ctx.model_download
    outputs = [panel.box, panel.start, panel.cancel, panel.progress, panel.timer, top.checkpoint, top.status]

    def show(status: DownloadStatus) -> dict[Any, Any]:
        running = status.running
        done = status.state == DownloadState.DONE
        update: dict[Any, Any] = {
            panel.start: gr.update(visible=not running and not done),
            panel.cancel: gr.update(visible=running),
            panel.progress: gr.update(
                value=progress_html(status.fraction, status_text(download, status),
                                    failed=status.state == DownloadState.FAILED),
                visible=status.state != DownloadState.IDLE,
            ),
            panel.timer: gr.Timer(active=running),
        }
        if done and status.path is not None:
            choices = ctx.list_checkpoints()
            update[top.checkpoint] = gr.update(choices=choices, value=status.path.name)
            update[top.status] = loaded_status(ctx)
        return update

    def offer_needed() -> bool:
        # Once a checkpoint is there (downloaded, or put in the folder and found by ↻) the offer goes away.
        return download.status().running or not ctx.list_checkpoints()

    def on_page_load() -> dict[Any, Any]:
        status = download.status()
        visible = offer_needed()
        update = {**show(status), panel.box: gr.update(visible=visible)}
        update.pop(top.status, None)
        if status.state == DownloadState.DONE and status.path is not None:
            # The top bar's choices were fixed when the page was built, before the download: list it now,
            # keeping the checkpoint the user saved if there is one.
            choices = ctx.list_checkpoints()
            saved = ctx.settings.current.sd_model_checkpoint
            update[top.checkpoint] = gr.update(choices=choices, value=saved if saved in choices else status.path.name)
        return update

    def start() -> dict[Any, Any]:
        download.start()  # False when another browser already started it: this page follows that one
        return show(download.status())

    def cancel() -> dict[Any, Any]:
        download.cancel()
        return show(download.status())

    demo.load(on_page_load, outputs=outputs, show_progress="hidden", api_name=False)
    panel.start.click(start, outputs=outputs, show_progress="hidden", api_name=False, queue=False)
    panel.cancel.click(cancel, outputs=outputs, show_progress="hidden", api_name=False, queue=False)
    top.refresh.click(lambda: gr.update(visible=offer_needed()), outputs=panel.box, api_name=False)
    panel.timer.tick(lambda: show(download.status()), outputs=outputs, show_progress="hidden", api_name=False,
                     queue=False)
