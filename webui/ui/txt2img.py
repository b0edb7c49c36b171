"""The top bar (checkpoint, VAE, clip skip) and the txt2img tab: widgets ⇄ GenerationParams, progress streaming.
Must not import torch or the engine: jobs go through webui.app's queue."""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from webui.app.queue import JobSnapshot, JobState, LoadCheckpointRequest, QueueClosedError, Txt2ImgRequest
from webui.core import samplers
from webui.core.infotext import InfotextFields, parse_infotext
from webui.core.params import AUTOMATIC_VAE, INT_LIMITS, GenerationParams, ParamError
from webui.ui.context import UiContext
from webui.ui.extension_ui import (
    build_txt2img_sections,
    extension_values_from_controls,
    params_with_extensions,
    pasted_extension_values,
)
from webui.ui.paste import checkpoint_choice, restore_styles_and_networks, values_from_infotext, values_from_parsed
from webui.ui.styles_ui import StylesPicker, apply_styles, build_styles_picker, wire_styles_picker

# Controls kept in the browser's localStorage (they survive a refresh and a server restart), in this order.
REMEMBERED_CONTROLS = (
    "prompt", "negative_prompt", "sampler", "scheduler", "steps", "cfg_scale",
    "width", "height", "seed", "batch_count", "batch_size", "clip_skip",
)
INTEGER_FIELDS = ("steps", "width", "height", "seed", "batch_count", "batch_size", "clip_skip")
PROGRESS_POLL_SECONDS = 1.0


@dataclass
class TopBar:
    checkpoint: gr.Dropdown
    refresh: gr.Button
    vae: gr.Dropdown
    clip_skip: gr.Slider
    status: gr.Markdown


@dataclass
class Txt2ImgTab:
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    prompt_counter: gr.HTML
    negative_counter: gr.HTML
    generate: gr.Button
    interrupt: gr.Button
    skip: gr.Button
    sampler: gr.Dropdown
    scheduler: gr.Dropdown
    steps: gr.Slider
    cfg_scale: gr.Slider
    width: gr.Slider
    height: gr.Slider
    swap_size: gr.Button
    seed: gr.Number
    random_seed: gr.Button
    reuse_seed: gr.Button
    batch_count: gr.Slider
    batch_size: gr.Slider
    progress: gr.HTML
    preview: gr.Image
    gallery: gr.Gallery
    infotext: gr.Textbox
    send_to_txt2img: gr.Button
    download: gr.DownloadButton
    job_id: gr.State
    results: gr.State
    selected: gr.State
    # Extensions' section controls, by value name "extensions.<extension>.<key>".
    extension_controls: dict[str, gr.components.Component] = field(default_factory=dict)
    # The styles picker beside the prompt (applied to the prompts when a job is queued) and its ✎ button.
    styles_picker: StylesPicker | None = None

    @property
    def styles(self) -> gr.Dropdown | None:
        return self.styles_picker.dropdown if self.styles_picker is not None else None


def job_owner(request: gr.Request | None) -> str | None:
    """Whose job this is: the logged-in user (the REST API knows them by the same name), else the browser session."""
    if request is None:
        return None
    return request.username or request.session_hash


def pasteable_controls(top: TopBar, tab: Txt2ImgTab) -> dict[str, gr.components.Component]:
    """Field name → component for every control an infotext can fill."""
    controls: dict[str, gr.components.Component] = {
        "prompt": tab.prompt, "negative_prompt": tab.negative_prompt, "sampler": tab.sampler,
        "scheduler": tab.scheduler, "steps": tab.steps, "cfg_scale": tab.cfg_scale, "width": tab.width,
        "height": tab.height, "seed": tab.seed, "clip_skip": top.clip_skip, **tab.extension_controls,
    }
    if tab.styles is not None:
        controls["styles"] = tab.styles
    return controls


def remembered_components(top: TopBar, tab: Txt2ImgTab) -> list[gr.components.Component]:
    # The checkpoint is not among them: the server restores the last one chosen (Settings).
    by_name = {**pasteable_controls(top, tab), "batch_count": tab.batch_count, "batch_size": tab.batch_size}
    return [by_name[name] for name in REMEMBERED_CONTROLS]


def to_params(values: Mapping[str, Any]) -> GenerationParams:
    """Widget values → GenerationParams (validated). Sliders may hand over floats such as 20.0."""
    fields: dict[str, Any] = {}
    for name in ("prompt", "negative_prompt", "sampler", "scheduler", "cfg_scale", *INTEGER_FIELDS):
        value = values.get(name)
        if name in INTEGER_FIELDS:
            if value is None or value == "":
                raise ParamError(name, "is required")
            number = float(value)
            if not number.is_integer():
                raise ParamError(name, f"must be a whole number, got {value}")
            value = int(number)
        elif name == "cfg_scale":
            value = float(value) if value is not None else 7.0
        fields[name] = value if value is not None else ""
    checkpoint = values.get("checkpoint") or None
    vae = values.get("vae") or AUTOMATIC_VAE
    return GenerationParams(checkpoint=checkpoint, vae=vae, **fields).validated()


def render_progress(snapshot: JobSnapshot) -> str:
    fraction = snapshot.progress.fraction if snapshot.progress is not None else 0.0
    images = len(snapshot.images)
    if snapshot.state == JobState.DONE:
        fraction, text = 1.0, f"Done: {images} image{'s' if images != 1 else ''}"
    elif snapshot.state == JobState.INTERRUPTED:
        text = f"Interrupted ({images} image{'s' if images != 1 else ''} kept)"
    elif snapshot.state == JobState.FAILED:
        text = f"Error: {snapshot.error or snapshot.message}"
    else:
        text = snapshot.message
    return progress_html(fraction, text, failed=snapshot.state == JobState.FAILED)


def progress_html(fraction: float, text: str, failed: bool = False) -> str:
    css_class = "webui-progress failed" if failed else "webui-progress"
    return (
        f'<div class="{css_class}"><div class="webui-progress-bar" style="width:{fraction * 100:.1f}%"></div>'
        f'<span class="webui-progress-text">{html.escape(text)}</span></div>'
    )


def current_default(ctx: UiContext, name: str, fallback: Any) -> Any:
    """The stored UI default at build time; the page-load restore (blocks.py) applies later changes.

    Not a callable value: gradio would evaluate it in a load event of its own that races the restore.
    """
    return ctx.settings.current.ui_defaults.get(name, fallback)


def build_top_bar(ctx: UiContext) -> TopBar:
    choices = ctx.list_checkpoints()
    saved = ctx.settings.current.sd_model_checkpoint
    initial = saved if saved in choices else (choices[0] if choices else None)
    with gr.Row(elem_id="quicksettings", equal_height=True):
        checkpoint = gr.Dropdown(
            choices=choices, value=initial, label="Stable Diffusion checkpoint", elem_id="ckpt_dropdown",
            scale=4, allow_custom_value=False,
        )
        refresh = gr.Button("↻", elem_id="ckpt_refresh", scale=0, min_width=48)
        vae_choices = ctx.list_vaes()
        vae = gr.Dropdown(choices=vae_choices, value=chosen_or_first(vae_choices, ctx.settings.current.sd_vae),
                          label="SD VAE", elem_id="vae_dropdown", scale=2)
        clip_skip = gr.Slider(
            minimum=1, maximum=12, step=1, value=current_default(ctx, "clip_skip", 1),
            label="Clip skip", elem_id="clip_skip", scale=2,
        )
    status = gr.Markdown(elem_id="ckpt_status")
    return TopBar(checkpoint, refresh, vae, clip_skip, status)


def build_txt2img_tab(ctx: UiContext) -> Txt2ImgTab:
    limits = INT_LIMITS
    with gr.Row():
        with gr.Column(scale=6):
            prompt = gr.Textbox(
                label="Prompt", lines=3, elem_id="txt2img_prompt",
                placeholder="Prompt\n(Press Ctrl+Enter to generate)",
            )
            prompt_counter = gr.HTML("0/75", elem_id="txt2img_token_counter")
            negative_prompt = gr.Textbox(
                label="Negative prompt", lines=2, elem_id="txt2img_neg_prompt",
                value=current_default(ctx, "negative_prompt", ""),
            )
            negative_counter = gr.HTML("0/75", elem_id="txt2img_neg_token_counter")
        with gr.Column(scale=1, min_width=160):
            generate = gr.Button("Generate", variant="primary", elem_id="txt2img_generate")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id="txt2img_interrupt", min_width=60)
                skip = gr.Button("Skip", elem_id="txt2img_skip", min_width=60)
            styles_picker = build_styles_picker(ctx)
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Row():
                sampler = gr.Dropdown(
                    choices=list(samplers.SAMPLERS), value=current_default(ctx, "sampler", samplers.DEFAULT_SAMPLER),
                    label="Sampling method", elem_id="txt2img_sampling",
                )
                scheduler = gr.Dropdown(
                    choices=list(samplers.SCHEDULES), value=current_default(ctx, "scheduler", samplers.DEFAULT_SCHEDULE),
                    label="Schedule type", elem_id="txt2img_scheduler",
                )
            steps = gr.Slider(limits["steps"].low, limits["steps"].high, step=1, value=current_default(ctx, "steps", 20),
                              label="Sampling steps", elem_id="txt2img_steps")
            with gr.Row(equal_height=True):
                with gr.Column(scale=4):
                    width = gr.Slider(limits["width"].low, limits["width"].high, step=8,
                                      value=current_default(ctx, "width", 512), label="Width", elem_id="txt2img_width")
                    height = gr.Slider(limits["height"].low, limits["height"].high, step=8,
                                       value=current_default(ctx, "height", 512), label="Height", elem_id="txt2img_height")
                swap_size = gr.Button("⇅", elem_id="txt2img_swap_size", scale=0, min_width=48)
                with gr.Column(scale=2):
                    batch_count = gr.Slider(limits["batch_count"].low, limits["batch_count"].high, step=1,
                                            value=current_default(ctx, "batch_count", 1), label="Batch count",
                                            elem_id="txt2img_batch_count")
                    batch_size = gr.Slider(limits["batch_size"].low, limits["batch_size"].high, step=1,
                                           value=current_default(ctx, "batch_size", 1), label="Batch size",
                                           elem_id="txt2img_batch_size")
            cfg_scale = gr.Slider(1.0, 30.0, step=0.5, value=current_default(ctx, "cfg_scale", 7.0), label="CFG Scale",
                                  elem_id="txt2img_cfg_scale")
            with gr.Row(equal_height=True):
                seed = gr.Number(value=-1, precision=0, label="Seed", elem_id="txt2img_seed", scale=4)
                random_seed = gr.Button("⚄", elem_id="txt2img_random_seed", scale=0, min_width=48)
                reuse_seed = gr.Button("♻️", elem_id="txt2img_reuse_seed", scale=0, min_width=48)
            extension_controls = build_txt2img_sections(ctx.extensions)
        with gr.Column(scale=1):
            progress = gr.HTML(progress_html(0.0, "Idle"), elem_id="txt2img_progress")
            preview = gr.Image(label="Live preview", elem_id="txt2img_preview", type="pil", interactive=False,
                               height=192, show_label=True)
            gallery = gr.Gallery(label="Results", elem_id="txt2img_gallery", columns=4, height=360,
                                 object_fit="contain", interactive=False, format="png")
            infotext = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                  elem_id="txt2img_infotext")
            with gr.Row():
                send_to_txt2img = gr.Button("Send to txt2img", elem_id="txt2img_send_to_txt2img")
                download = gr.DownloadButton("Download", elem_id="txt2img_download", value=None)
    return Txt2ImgTab(
        prompt, negative_prompt, prompt_counter, negative_counter, generate, interrupt, skip, sampler, scheduler,
        steps, cfg_scale, width, height, swap_size, seed, random_seed, reuse_seed, batch_count, batch_size,
        progress, preview, gallery, infotext, send_to_txt2img, download,
        job_id=gr.State(None), results=gr.State([]), selected=gr.State(0), extension_controls=extension_controls,
        styles_picker=styles_picker,
    )


def paste_updates(
    ctx: UiContext, infotext: str, controls: Mapping[str, gr.components.Component], checkpoint: gr.Dropdown | None
) -> dict[gr.components.Component, Any]:
    """Gradio updates that fill the controls from an infotext (and pick its checkpoint if we have it)."""
    parsed = parse_infotext(infotext)
    if ctx.extensions is not None:
        # Extensions may rewrite what is pasted (wildcards puts its template back into the prompt).
        pasted = ctx.extensions.pasted(parsed.prompt, parsed.negative_prompt, parsed.fields)
        parsed = InfotextFields(pasted.prompt, pasted.negative_prompt, pasted.fields)
    cards = ctx.network_cards
    parsed, found_styles = restore_styles_and_networks(
        parsed, ctx.styles, cards.lora_name_by_hash if cards is not None else None)
    values, stem = values_from_parsed(parsed)
    if found_styles:
        values["styles"] = found_styles
    values.update(pasted_extension_values(ctx.extensions, parsed.fields))
    updates: dict[gr.components.Component, Any] = {
        controls[name]: value for name, value in values.items() if name in controls
    }
    if checkpoint is not None:
        choice = checkpoint_choice(stem, ctx.list_checkpoints())
        if choice is not None:
            updates[checkpoint] = choice
    return updates


def wire_txt2img(ctx: UiContext, top: TopBar, tab: Txt2ImgTab) -> None:
    """Events of the top bar and the txt2img tab."""
    # One name → component table: gradio hands the values over keyed by component (inputs given as a set), so
    # no positional list has to be kept in step with a signature.
    generation_controls: dict[str, gr.components.Component] = {
        **pasteable_controls(top, tab), "batch_count": tab.batch_count, "batch_size": tab.batch_size,
        "checkpoint": top.checkpoint, "vae": top.vae,
    }
    result_outputs = [tab.job_id, tab.progress, tab.preview, tab.gallery, tab.results, tab.infotext,
                      tab.download, tab.selected]

    def generate(values: dict[gr.components.Component, Any], request: gr.Request) -> Iterator[dict[Any, Any]]:
        named = {name: values[component] for name, component in generation_controls.items()}
        # A1111 applies the selected styles to the prompts before the job (the infotext holds the styled prompt).
        named["prompt"], named["negative_prompt"] = apply_styles(
            ctx.styles, named["prompt"] or "", named["negative_prompt"] or "", named.get("styles"))
        try:
            params = to_params(named)
            extension_values = {name: named[name] for name in tab.extension_controls}
            params = params_with_extensions(params, extension_values_from_controls(ctx.extensions, extension_values))
            job_id = ctx.queue.submit(Txt2ImgRequest(params), owner=job_owner(request))
        except (ParamError, ValueError, QueueClosedError) as error:
            yield {tab.progress: progress_html(0.0, f"Error: {error}", failed=True)}
            return
        yield {tab.job_id: job_id, tab.progress: progress_html(0.0, "Queued"), tab.results: [],
               tab.gallery: [], tab.infotext: "", tab.download: None, tab.selected: 0}
        version, preview_version, shown = -1, -1, 0
        while True:
            snapshot = ctx.queue.wait_for_change(job_id, version, PROGRESS_POLL_SECONDS)
            version = snapshot.version
            update: dict[Any, Any] = {tab.progress: render_progress(snapshot)}
            if snapshot.preview is not None and snapshot.preview_version != preview_version:
                preview_version = snapshot.preview_version
                update[tab.preview] = snapshot.preview
            if len(snapshot.images) != shown or snapshot.finished:
                shown = len(snapshot.images)
                results = [(str(saved.path), saved.infotext) for saved in snapshot.images]
                update[tab.results] = results
                update[tab.gallery] = [path for path, _ in results]
                if results:
                    update[tab.infotext] = results[0][1]
                    update[tab.download] = results[0][0]
            if snapshot.finished:
                yield update
                return
            yield update

    # Gradio only streams progress here; the GPU is serialised by our own queue, so no gradio limit.
    tab.generate.click(
        generate, inputs=set(generation_controls.values()), outputs=result_outputs, show_progress="hidden",
        concurrency_limit=None, api_name=False,
    ).then(lambda: loaded_status(ctx), outputs=top.status, show_progress="hidden", api_name=False)

    def interrupt(job_id: str | None) -> None:
        if job_id:
            ctx.queue.interrupt(job_id)

    def skip(job_id: str | None) -> None:
        if job_id:
            ctx.queue.skip(job_id)

    tab.interrupt.click(interrupt, inputs=tab.job_id, queue=False, api_name=False)
    tab.skip.click(skip, inputs=tab.job_id, queue=False, api_name=False)

    def select_result(results: list[tuple[str, str]], event: gr.SelectData) -> tuple[str, str | None, int]:
        index = int(event.index)
        if not 0 <= index < len(results):
            return "", None, 0
        path, infotext = results[index]
        return infotext, path, index

    tab.gallery.select(select_result, inputs=tab.results, outputs=[tab.infotext, tab.download, tab.selected],
                       api_name=False)

    def reuse_seed(results: list[tuple[str, str]], selected: int, current: float) -> float:
        if results and 0 <= selected < len(results):
            values, _ = values_from_infotext(results[selected][1])
            return float(values.get("seed", current))  # type: ignore[arg-type]
        return current

    tab.reuse_seed.click(reuse_seed, inputs=[tab.results, tab.selected, tab.seed], outputs=tab.seed, api_name=False)
    tab.random_seed.click(lambda: -1, outputs=tab.seed, api_name=False)
    tab.swap_size.click(lambda w, h: (h, w), inputs=[tab.width, tab.height], outputs=[tab.width, tab.height],
                        api_name=False)

    wire_send_to_txt2img(ctx, tab.send_to_txt2img, tab.infotext, top, tab, tabs=None, set_checkpoint=True)
    if tab.styles_picker is not None:
        wire_styles_picker(ctx, tab.styles_picker, tab.prompt, tab.negative_prompt)

    def count(prompt: str, steps: float) -> str:
        return ctx.token_counter.label(prompt or "", int(steps or 1))

    for box, counter in ((tab.prompt, tab.prompt_counter), (tab.negative_prompt, tab.negative_counter)):
        gr.on([box.change, tab.steps.change], count, inputs=[box, tab.steps], outputs=counter,
              trigger_mode="always_last", show_progress="hidden", api_name=False, queue=False)

    wire_checkpoint(ctx, top)


def wire_send_to_txt2img(
    ctx: UiContext, button: gr.Button, infotext: gr.Textbox, top: TopBar, tab: Txt2ImgTab,
    tabs: gr.Tabs | None, set_checkpoint: bool,
) -> None:
    """"Send to txt2img": fill the controls from an infotext, then show the txt2img tab (when given)."""
    controls = pasteable_controls(top, tab)
    outputs: list[Any] = [*controls.values(), top.checkpoint, tab.progress]
    if tabs is not None:
        outputs.append(tabs)

    def send(text: str) -> dict[Any, Any]:
        if not text:
            return {}
        try:
            updates = paste_updates(ctx, text, controls, top.checkpoint if set_checkpoint else None)
        except ParamError as error:
            return {tab.progress: progress_html(0.0, f"Error: {error}", failed=True)}
        if tabs is not None:
            updates[tabs] = gr.Tabs(selected="txt2img")
        return updates

    button.click(send, inputs=infotext, outputs=outputs, api_name=False)


def loaded_status(ctx: UiContext) -> str:
    loaded = ctx.loaded_checkpoint()
    if loaded is not None:
        name, short_hash = loaded
        stem = name.rsplit("/", 1)[-1].removesuffix(".safetensors")
        # The hash is computed in the background after a load: until then only the name is shown.
        return f"Loaded {stem} [{short_hash}]" if short_hash else f"Loaded {stem}"
    if not ctx.list_checkpoints():
        return f"No checkpoint found: {ctx.where_to_put_checkpoints}, then press ↻."
    return "No model loaded yet: the selected checkpoint loads with the first generation."


def request_checkpoint_swap(ctx: UiContext) -> Callable[..., Iterator[str]]:
    """An event handler that queues a checkpoint load and streams its status line."""

    def swap(name: str | None, request: gr.Request) -> Iterator[str]:
        if not name:
            yield loaded_status(ctx)
            return
        try:
            job_id = ctx.queue.submit(LoadCheckpointRequest(name), owner=job_owner(request))
        except QueueClosedError as error:
            yield f"Could not load {name}: {error}. {loaded_status(ctx)}"
            return
        version = -1
        while True:
            snapshot = ctx.queue.wait_for_change(job_id, version, PROGRESS_POLL_SECONDS)
            version = snapshot.version
            if snapshot.state == JobState.FAILED:
                yield f"Could not load {name}: {snapshot.error}. {loaded_status(ctx)}"
                return
            if snapshot.finished:
                ctx.settings.update({"sd_model_checkpoint": name})
                yield loaded_status(ctx)
                return
            yield snapshot.message

    return swap


def chosen_or_first(choices: list[str], wanted: str | None) -> str:
    """`wanted` when it is still offered, else the first choice (Automatic for the VAE list)."""
    return wanted if wanted in choices else choices[0]


def vae_dropdown_update(ctx: UiContext, wanted: str | None) -> Any:
    """The VAE files as they are now, with `wanted` selected if it is still there."""
    choices = ctx.list_vaes()
    return gr.update(choices=choices, value=chosen_or_first(choices, wanted))


def vae_dropdown_now(ctx: UiContext) -> Callable[[], Any]:
    """The VAE files and the saved choice at page load: both may have changed since the page was built."""
    return lambda: vae_dropdown_update(ctx, ctx.settings.current.sd_vae)


def wire_checkpoint(ctx: UiContext, top: TopBar) -> None:
    swap = request_checkpoint_swap(ctx)
    top.checkpoint.input(swap, inputs=top.checkpoint, outputs=top.status, concurrency_limit=None,
                         show_progress="hidden", api_name=False)

    def refresh(current: str | None) -> Any:
        choices = ctx.list_checkpoints()
        value = current if current in choices else (choices[0] if choices else None)
        return gr.update(choices=choices, value=value)

    top.refresh.click(refresh, inputs=top.checkpoint, outputs=top.checkpoint, api_name=False).then(
        lambda: loaded_status(ctx), outputs=top.status, api_name=False
    )

    top.refresh.click(lambda current: vae_dropdown_update(ctx, current), inputs=top.vae, outputs=top.vae,
                      api_name=False)

    def remember_vae(name: str | None) -> str:
        # The VAE loads with the next generation, which carries the choice in its parameters.
        try:
            ctx.settings.update({"sd_vae": name or AUTOMATIC_VAE})
        except ParamError as error:
            return f"VAE not saved: {error}"
        return f"VAE {name} is used from the next generation on."

    top.vae.input(remember_vae, inputs=top.vae, outputs=top.status, api_name=False)
