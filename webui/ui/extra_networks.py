"""The extra-networks cards under txt2img (Checkpoints / Lora / Textual Inversion / Styles), their info view and
sidecar editor, the style editor, and the route that serves card previews. Must not import torch or the engine: the
cards come from webui.app.network_cards through UiContext."""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import gradio as gr
from starlette.responses import FileResponse, JSONResponse, Response

from webui.app.network_cards import (
    CHECKPOINTS,
    KIND_LABELS,
    KINDS,
    LORA,
    STYLES,
    TEXTUAL_INVERSION,
    Card,
    CardList,
    LoraDetails,
    NetworkCards,
)
from webui.core.params import ParamError
from webui.core.styles import Style
from webui.ui.context import UiContext
from webui.ui.styles_ui import style_choices_update
from webui.ui.txt2img import TopBar, Txt2ImgTab, request_checkpoint_swap

# The previews' route: /internal/extra-networks/preview/<kind>/<folder index>/<path inside that folder>?v=<mtime>.
PREVIEW_ROUTE = "/internal/extra-networks/preview"
SORT_BY_NAME = "Name"
SORT_BY_DATE = "Date modified"
SORT_CHOICES = (SORT_BY_NAME, SORT_BY_DATE)
ALL_FOLDERS = "All"
PLACEHOLDER = '<div class="en-empty">Loading…</div>'
# The URL carries the file's mtime, so a browser may keep a preview as long as it likes.
PREVIEW_CACHE_CONTROL = "private, max-age=86400"
EMPTY_MESSAGES = {
    CHECKPOINTS: "No checkpoint found. Put .safetensors files into models/Stable-diffusion, then press Refresh.",
    LORA: "No LoRA found. Put .safetensors files into models/Lora, then press Refresh.",
    TEXTUAL_INVERSION: "No embedding found. Put files into embeddings/, then press Refresh.",
    STYLES: "No style yet. Create one below.",
}

# Card search, sort and folder filter run in the page (hundreds of cards stay one HTML block), and so does a
# Lora / Textual Inversion click: A1111's updatePromptArea, ported from extraNetworks.js (a second click
# removes what the first inserted; a tag with another weight counts as the same network).
EXTRA_NETWORKS_HEAD = r"""
<script>
(() => {
  const SEPARATOR = " ";
  const NETWORK = /<([^:^>]+:[^:]+):[\d.]+>(.*)/;
  const NETWORKS = /<([^:^>]+:[^:]+):[\d.]+>/g;
  const NEGATIVE = /\(([^:^>]+:[\d.]+)\)/;
  const NEGATIVES = /\(([^:^>]+:[\d.]+)\)/g;
  const state = {};

  function escapeRegex(text) { return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"); }

  // The prompt without `text` (and the separator before it); null when `text` is not in it.
  function without(value, text, negative) {
    const parsed = text.match(negative ? NEGATIVE : NETWORK);
    if (parsed) {
      const key = parsed[1];
      const after = negative ? "" : parsed[2];
      const ranges = [];
      for (const found of value.matchAll(negative ? NEGATIVES : NETWORKS)) {
        if (found[1] !== key) continue;
        let start = found.index;
        let end = start + found[0].length;
        if (after && value.substr(end, after.length) === after) end += after.length;
        if (start >= SEPARATOR.length && value.substr(start - SEPARATOR.length, SEPARATOR.length) === SEPARATOR) {
          start -= SEPARATOR.length;
        }
        ranges.push([start, end]);
      }
      if (!ranges.length) return null;
      let result = "";
      let position = 0;
      for (const [start, end] of ranges) {
        result += value.slice(position, Math.max(position, start));
        position = Math.max(position, end);
      }
      return result + value.slice(position);
    }
    const plain = new RegExp(`(?:${escapeRegex(SEPARATOR)})?(?<![\\w])${escapeRegex(text)}(?![\\w])`, "g");
    const result = value.replace(plain, "");
    return result === value ? null : result;
  }

  function updatePromptArea(textarea, text, negative) {
    if (!textarea || !text) return;
    const removed = without(textarea.value, text, negative);
    if (removed !== null) {
      textarea.value = removed;
    } else {
      const value = textarea.value;
      textarea.value = value === "" || /\s$/.test(value) ? value + text : value + SEPARATOR + text;
    }
    textarea.dispatchEvent(new Event("input", { bubbles: true }));
  }

  function toggle(card) {
    const prompt = document.querySelector("#txt2img_prompt textarea");
    const negative = document.querySelector("#txt2img_neg_prompt textarea");
    updatePromptArea(prompt, card.dataset.prompt, false);
    if (card.dataset.negative) updatePromptArea(negative, card.dataset.negative, true);
  }

  function apply(kind) {
    const root = document.getElementById(`${kind}_cards`);
    const grid = root && root.querySelector(".en-grid");
    if (!grid) return;
    const wanted = state[kind] || {};
    const words = String(wanted.query || "").toLowerCase().split(/\s+/).filter(Boolean);
    const folder = wanted.folder && wanted.folder !== "All" ? wanted.folder : null;
    const rank = wanted.sort === "Date modified" ? "rankDate" : "rankName";
    let shown = 0;
    for (const card of grid.children) {
      const search = card.dataset.search || "";
      const cardFolder = card.dataset.folder || "";
      const fits = words.every((word) => search.includes(word))
        && (folder === null || cardFolder === folder || cardFolder.startsWith(`${folder}/`));
      card.hidden = !fits;
      card.style.order = card.dataset[rank];
      if (fits) shown += 1;
    }
    const count = root.querySelector(".en-count");
    if (count) count.textContent = `${shown} of ${grid.children.length}`;
  }

  function set(kind, query, sort, folder) {
    state[kind] = { query, sort, folder };
    apply(kind);
  }

  window.webuiExtraNetworks = { apply, set, toggle, without, state };
})();
</script>
"""

EXTRA_NETWORKS_CSS = """
.en-toolbar { align-items: center; }
.en-head { font-size: 0.85em; opacity: 0.75; margin: 0.2em 0 0.4em; }
.en-grid { display: flex; flex-wrap: wrap; gap: 0.6em; max-height: 36em; overflow-y: auto; padding: 0.2em; }
.en-card { position: relative; width: 10em; height: 13em; border-radius: 8px; overflow: hidden; cursor: pointer;
           border: 1px solid var(--border-color-primary); background: var(--block-background-fill);
           display: flex; flex-direction: column; justify-content: flex-end; }
.en-card[hidden] { display: none; }
.en-card:hover, .en-card:focus { outline: 2px solid var(--color-accent); }
.en-card img { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: cover; }
.en-card .en-nopreview { position: absolute; inset: 0; display: flex; align-items: center; justify-content: center;
                         font-size: 0.9em; opacity: 0.45; }
.en-card .en-name { position: relative; padding: 0.35em 0.5em; font-weight: 600; word-break: break-word;
                    background: rgba(0, 0, 0, 0.55); color: #fff; }
.en-card .en-text { position: relative; padding: 0.3em 0.5em; font-size: 0.8em; max-height: 6em; overflow: hidden;
                    background: rgba(0, 0, 0, 0.45); color: #eee; }
.en-card .en-badge { position: absolute; top: 0.3em; left: 0.3em; font-size: 0.75em; padding: 0.05em 0.4em;
                     border-radius: 4px; background: rgba(0, 0, 0, 0.6); color: #fff; }
.en-card .en-info { position: absolute; top: 0.25em; right: 0.25em; border: none; border-radius: 50%;
                    width: 1.8em; height: 1.8em; background: rgba(0, 0, 0, 0.6); color: #fff; cursor: pointer;
                    font: italic bold 1em Georgia, serif; }
.en-card.en-incompatible { opacity: 0.45; }
.en-card.en-incompatible .en-badge { background: #b3261e; }
.en-empty { padding: 1em; opacity: 0.8; }
.en-facts { border-collapse: collapse; font-size: 0.9em; }
.en-facts th, .en-facts td { text-align: left; padding: 0.15em 0.8em 0.15em 0; vertical-align: top; }
.en-tags { font-size: 0.9em; }
"""


def grid_js(kind: str) -> str:
    """js_on_load of one card grid: a click on ⓘ asks the server for the info view; a click on a Lora/TI card
    toggles its text in the prompt right here; other cards (checkpoint, style) go to the server."""
    kind_js = json.dumps(kind)
    return (
        "const kind = " + kind_js + ";\n"
        "element.addEventListener('click', (event) => {\n"
        "  const card = event.target.closest('.en-card');\n"
        "  if (!card || !element.contains(card)) return;\n"
        "  if (event.target.closest('.en-info')) {\n"
        "    event.stopPropagation();\n"
        "    trigger('click', { card_id: card.dataset.id, action: 'info' });\n"
        "    return;\n"
        "  }\n"
        "  if (card.dataset.prompt !== undefined) { window.webuiExtraNetworks.toggle(card); return; }\n"
        "  trigger('click', { card_id: card.dataset.id, action: 'pick' });\n"
        "});\n"
        "element.addEventListener('keydown', (event) => {\n"
        "  if (event.key === 'Enter' && event.target.classList.contains('en-card')) event.target.click();\n"
        "});\n"
        "watch('value', () => window.webuiExtraNetworks.apply(kind));\n"
    )


def filter_js(kind: str) -> str:
    """The search box, sort and folder controls change only what the page shows: no server round trip."""
    return ("(query, sort, folder) => { "
            f"window.webuiExtraNetworks.set({json.dumps(kind)}, query, sort, folder); return []; }}")


def preview_url(card: Card) -> str | None:
    preview = card.preview
    if preview is None:
        return None
    return f"{PREVIEW_ROUTE}/{preview.kind}/{preview.root}/{quote(preview.relative)}?v={int(preview.mtime)}"


def _attr(value: object) -> str:
    return html.escape(str(value), quote=True)


def render_card(card: Card, fits: bool, rank_name: int, rank_date: int) -> str:
    """One card. Every text from a file (names, metadata, sidecars) is escaped: a LoRA from the internet is
    untrusted input."""
    classes = "en-card" if fits else "en-card en-incompatible"
    attributes = [
        f'class="{classes}"', 'role="button"', 'tabindex="0"', f'data-id="{_attr(card.id)}"',
        f'data-search="{_attr(card.search_text)}"', f'data-folder="{_attr(card.folder)}"',
        f'data-rank-name="{rank_name}"', f'data-rank-date="{rank_date}"', f'data-mtime="{card.mtime:.0f}"',
        f'data-sd-version="{_attr(card.sd_version)}"', f'title="{_attr(card.name)}"',
    ]
    if card.prompt_text:
        attributes.append(f'data-prompt="{_attr(card.prompt_text)}"')
        if card.negative_text:
            attributes.append(f'data-negative="{_attr(card.negative_text)}"')
    url = preview_url(card)
    picture = (f'<img loading="lazy" decoding="async" alt="" src="{_attr(url)}">' if url
               else '<div class="en-nopreview">no preview</div>')
    badge = ""
    if card.kind in (LORA, TEXTUAL_INVERSION, CHECKPOINTS) and card.sd_version:
        title = "" if fits else ' title="made for another model family than the loaded one"'
        badge = f'<div class="en-badge"{title}>{_attr(card.sd_version)}</div>'
    text = ""
    if card.kind == STYLES:
        lines = [card.style_prompt, f"Negative: {card.style_negative}" if card.style_negative else ""]
        text = f'<div class="en-text">{_attr(" · ".join(line for line in lines if line))}</div>'
    elif card.description:
        text = f'<div class="en-text">{_attr(card.description)}</div>'
    info = '<button class="en-info" type="button" title="Info and edit" aria-label="Info">i</button>'
    return (f'<div {" ".join(attributes)}>{picture}{badge}{info}{text}'
            f'<div class="en-name">{_attr(card.name)}</div></div>')


def render_cards(listing: CardList) -> str:
    """The whole grid of one kind as one HTML block (sorted by name; the page re-sorts and filters it)."""
    if not listing.cards:
        return f'<div class="en-empty">{_attr(EMPTY_MESSAGES[listing.kind])}</div>'
    by_name = {card.id: rank for rank, card in enumerate(listing.order_by_name())}
    by_date = {card.id: rank for rank, card in enumerate(listing.order_by_date())}
    cards = "".join(render_card(card, listing.fits(card), by_name[card.id], by_date[card.id])
                    for card in listing.order_by_name())
    count = len(listing.cards)
    misfits = sum(not listing.fits(card) for card in listing.cards)
    note = (f'<span class="en-note"> · {misfits} made for another family than the loaded '
            f'{_attr(listing.loaded_version or "model")} (dimmed, listed last)</span>') if misfits else ""
    return (f'<div class="en-head"><span class="en-count">{count} of {count}</span>{note}</div>'
            f'<div class="en-grid" data-kind="{_attr(listing.kind)}">{cards}</div>')


def folder_choices(listing: CardList, current: str | None) -> Any:
    choices = [ALL_FOLDERS, *listing.folders()]
    return gr.update(choices=choices, value=current if current in choices else ALL_FOLDERS)


def file_size(size: int) -> str:
    return f"{size / 1_048_576:.1f} MiB" if size >= 1_048_576 else f"{size / 1024:.1f} KiB"


def details_html(details: LoraDetails) -> str:
    """The training facts of a LoRA (kohya ss_* metadata) and its most frequent training tags."""
    rows = [("File", details.file_name), ("Size", file_size(details.size)),
            ("Made for", details.sd_version)]
    if details.alias != details.name:
        rows.append(("Alias", details.alias))
    rows += details.training
    table = "".join(f"<tr><th>{_attr(label)}</th><td>{_attr(value)}</td></tr>" for label, value in rows)
    tags = ", ".join(f"{_attr(tag)} ({count})" for tag, count in details.top_tags)
    tags_block = (f'<div class="en-tags"><b>Top training tags:</b> {tags}</div>' if tags
                  else '<div class="en-tags">No training tags in the file.</div>')
    if not details.training:
        tags_block = '<div class="en-tags">The file carries no kohya training metadata.</div>' + tags_block
    return f'<table class="en-facts">{table}</table>{tags_block}'


def title_markdown(name: str) -> str:
    """A file name as a Markdown heading, its Markdown characters escaped (a name is not markup)."""
    return "### " + "".join(f"\\{char}" if char in "\\`*_{}[]()<>#+-.!|~" else char for char in name)


def facts_html(rows: list[tuple[str, str]]) -> str:
    return '<table class="en-facts">' + "".join(
        f"<tr><th>{_attr(label)}</th><td>{_attr(value)}</td></tr>" for label, value in rows) + "</table>"


@dataclass
class CardsTab:
    kind: str
    tab: gr.Tab
    search: gr.Textbox
    sort: gr.Dropdown
    folder: gr.Dropdown
    refresh: gr.Button
    grid: gr.HTML


@dataclass
class InfoPanel:
    group: gr.Group
    title: gr.Markdown
    facts: gr.HTML
    editor: gr.Group
    activation_text: gr.Textbox
    preferred_weight: gr.Number
    negative_text: gr.Textbox
    description: gr.Textbox
    save: gr.Button
    close: gr.Button
    status: gr.Markdown
    card_id: gr.State


@dataclass
class StyleEditor:
    name: gr.Textbox
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    copy_from_prompt: gr.Button
    save: gr.Button
    delete: gr.Button
    status: gr.Markdown


@dataclass
class ExtraNetworksPanel:
    accordion: gr.Accordion
    tabs: dict[str, CardsTab]
    info: InfoPanel
    style_editor: StyleEditor
    selected_kind: gr.State


def build_cards_tab(kind: str) -> CardsTab:
    with gr.Tab(KIND_LABELS[kind], id=f"extra_{kind}", elem_id=f"tab_extra_{kind}") as tab:
        with gr.Row(equal_height=True, elem_classes="en-toolbar"):
            search = gr.Textbox(show_label=False, placeholder="Search", max_lines=1, elem_id=f"{kind}_search",
                                scale=4, container=False)
            # Styles are rows of one file: no folders, no dates.
            files = kind != STYLES
            sort = gr.Dropdown(list(SORT_CHOICES), value=SORT_BY_NAME, show_label=False, elem_id=f"{kind}_sort",
                               scale=1, container=False, visible=files)
            folder = gr.Dropdown([ALL_FOLDERS], value=ALL_FOLDERS, show_label=False, elem_id=f"{kind}_folder",
                                 scale=1, container=False, visible=files)
            refresh = gr.Button("↻ Refresh", elem_id=f"{kind}_refresh", scale=0, min_width=110)
        grid = gr.HTML(PLACEHOLDER, elem_id=f"{kind}_cards", js_on_load=grid_js(kind))
    return CardsTab(kind, tab, search, sort, folder, refresh, grid)


def build_style_editor() -> StyleEditor:
    with gr.Group(elem_id="style_editor"):
        gr.Markdown("**Create or edit a style** (the i button on a card loads it; `{prompt}` in the style's "
                    "prompt marks where the prompt goes)")
        name = gr.Textbox(label="Name", max_lines=1, elem_id="style_edit_name")
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="style_edit_prompt")
        negative_prompt = gr.Textbox(label="Negative prompt", lines=2, elem_id="style_edit_negative")
        with gr.Row():
            copy_from_prompt = gr.Button("Copy from the txt2img prompts", elem_id="style_edit_copy")
            save = gr.Button("Save style", variant="primary", elem_id="style_edit_save")
            delete = gr.Button("Delete style", variant="stop", elem_id="style_edit_delete")
        status = gr.Markdown(elem_id="style_edit_status")
    return StyleEditor(name, prompt, negative_prompt, copy_from_prompt, save, delete, status)


def build_info_panel() -> InfoPanel:
    with gr.Group(visible=False, elem_id="extra_info") as group:
        title = gr.Markdown(elem_id="extra_info_title")
        facts = gr.HTML(elem_id="extra_info_facts")
        with gr.Group(visible=False) as editor:
            with gr.Row():
                activation_text = gr.Textbox(label="Activation text", lines=2, elem_id="extra_info_activation",
                                             scale=3)
                preferred_weight = gr.Number(label="Preferred weight (0: the default, 1)", value=0.0,
                                             elem_id="extra_info_weight", step=0.05, scale=1)
            negative_text = gr.Textbox(label="Negative text", lines=1, elem_id="extra_info_negative")
            description = gr.Textbox(label="Description", lines=2, elem_id="extra_info_description")
        with gr.Row():
            save = gr.Button("Save", variant="primary", elem_id="extra_info_save", visible=False)
            close = gr.Button("Close", elem_id="extra_info_close")
        status = gr.Markdown(elem_id="extra_info_status")
    return InfoPanel(group, title, facts, editor, activation_text, preferred_weight, negative_text, description,
                     save, close, status, card_id=gr.State(None))


def build_extra_networks(ctx: UiContext) -> ExtraNetworksPanel | None:
    """The cards panel under the txt2img controls, closed until opened (nothing is listed before); None without
    cards (a UI built without model folders, as some tests do)."""
    if ctx.network_cards is None:
        return None
    with gr.Accordion("Extra networks: checkpoints, Lora, textual inversion, styles", open=False,
                      elem_id="txt2img_extra_networks") as accordion:
        with gr.Tabs(elem_id="txt2img_extra_tabs"):
            tabs: dict[str, CardsTab] = {}
            for kind in KINDS:
                tabs[kind] = build_cards_tab(kind)
                if kind == STYLES:
                    with tabs[kind].tab:
                        style_editor = build_style_editor()
        info = build_info_panel()
    return ExtraNetworksPanel(accordion, tabs, info, style_editor, selected_kind=gr.State(CHECKPOINTS))


def _event_field(event: gr.EventData, name: str) -> str:
    data = event._data if isinstance(event._data, dict) else {}
    value = data.get(name)
    return value if isinstance(value, str) else ""


def _hidden_info(info: InfoPanel) -> dict[Any, Any]:
    return {info.group: gr.update(visible=False), info.card_id: None, info.status: ""}


def wire_extra_networks(ctx: UiContext, panel: ExtraNetworksPanel | None, top: TopBar, tab: Txt2ImgTab) -> None:
    cards = ctx.network_cards
    if cards is None or panel is None:
        return
    grids = {kind: cards_tab.grid for kind, cards_tab in panel.tabs.items()}
    folders = {kind: cards_tab.folder for kind, cards_tab in panel.tabs.items()}

    def render(kind: str, refresh: bool = False) -> Callable[[str | None], dict[Any, Any]]:
        def show(current_folder: str | None) -> dict[Any, Any]:
            listing = cards.listing(kind, refresh=refresh)
            return {grids[kind]: render_cards(listing), folders[kind]: folder_choices(listing, current_folder)}

        return show

    for kind, cards_tab in panel.tabs.items():
        outputs = [grids[kind], folders[kind]]
        cards_tab.tab.select(render(kind), inputs=folders[kind], outputs=outputs, show_progress="hidden",
                             api_name=False).then(lambda kind=kind: kind, outputs=panel.selected_kind,
                                                  api_name=False, show_progress="hidden")
        cards_tab.refresh.click(render(kind, refresh=True), inputs=folders[kind], outputs=outputs, api_name=False)
        controls = [cards_tab.search, cards_tab.sort, cards_tab.folder]
        gr.on([cards_tab.search.change, cards_tab.sort.change, cards_tab.folder.change], None, inputs=controls,
              outputs=None, js=filter_js(kind), api_name=False)

    def render_selected(kind: str, *current_folders: str | None) -> dict[Any, Any]:
        chosen = kind if kind in grids else CHECKPOINTS
        return render(chosen)(current_folders[list(grids).index(chosen)])

    panel.accordion.expand(render_selected, inputs=[panel.selected_kind, *folders.values()],
                           outputs=[*grids.values(), *folders.values()], show_progress="hidden", api_name=False)

    wire_info_panel(ctx, cards, panel, top)
    wire_style_editor(ctx, cards, panel, tab)


def wire_info_panel(ctx: UiContext, cards: NetworkCards, panel: ExtraNetworksPanel, top: TopBar) -> None:
    info = panel.info
    editor_fields = [info.activation_text, info.preferred_weight, info.negative_text, info.description]
    info_outputs = [info.group, info.title, info.facts, info.editor, info.save, info.status, info.card_id,
                    *editor_fields]

    def lora_info(card_id: str, status: str = "") -> dict[Any, Any]:
        details = cards.lora_details(card_id)
        user = details.user
        return {
            info.group: gr.update(visible=True), info.title: title_markdown(details.name),
            info.facts: details_html(details), info.editor: gr.update(visible=True),
            info.save: gr.update(visible=True), info.status: status, info.card_id: card_id,
            info.activation_text: user.activation_text, info.preferred_weight: user.preferred_weight,
            info.negative_text: user.negative_text, info.description: user.description,
        }

    def file_info(kind: str, card_id: str) -> dict[Any, Any]:
        card = next((card for card in cards.listing(kind).cards if card.id == card_id), None)
        if card is None:
            raise ParamError(KIND_LABELS[kind], "that file is gone; press Refresh")
        rows = [("Name", card.name), ("Folder", card.folder or "(top)"), ("Made for", card.sd_version)]
        if card.misfit_note:
            rows.append(("Not used now", card.misfit_note))
        return {
            info.group: gr.update(visible=True), info.title: title_markdown(card.name), info.facts: facts_html(rows),
            info.editor: gr.update(visible=False), info.save: gr.update(visible=False), info.status: "",
            info.card_id: None,
        }

    # ---- Lora and Textual Inversion: a click is handled in the page; ⓘ opens the info view.
    for kind in (LORA, TEXTUAL_INVERSION):
        def on_click(event: gr.EventData, kind: str = kind) -> dict[Any, Any]:
            card_id = _event_field(event, "card_id")
            if _event_field(event, "action") != "info" or not card_id:
                return {}
            try:
                return lora_info(card_id) if kind == LORA else file_info(kind, card_id)
            except ParamError as error:
                return {info.group: gr.update(visible=True), info.status: f"⚠ {error}"}

        panel.tabs[kind].grid.click(on_click, outputs=info_outputs, show_progress="hidden", api_name=False)

    # ---- Checkpoints: a click switches the checkpoint the way the top bar's dropdown does.
    swap = request_checkpoint_swap(ctx)

    def on_checkpoint_click(event: gr.EventData, request: gr.Request) -> Iterator[dict[Any, Any]]:
        card_id = _event_field(event, "card_id")
        if not card_id:
            return
        if _event_field(event, "action") == "info":
            try:
                yield file_info(CHECKPOINTS, card_id)
            except ParamError as error:
                yield {info.group: gr.update(visible=True), info.status: f"⚠ {error}"}
            return
        if card_id not in ctx.list_checkpoints():
            yield {top.status: f"{card_id} is no longer in the checkpoint folders; press Refresh."}
            return
        yield {top.checkpoint: card_id}
        for status in swap(card_id, request):
            yield {top.status: status}

    panel.tabs[CHECKPOINTS].grid.click(
        on_checkpoint_click, outputs=[*info_outputs, top.checkpoint, top.status], show_progress="hidden",
        concurrency_limit=None, api_name=False,
    )

    def save(card_id: str | None, activation_text: str, preferred_weight: float | None, negative_text: str,
             description: str) -> dict[Any, Any]:
        if not card_id:
            return {info.status: "⚠ Open a Lora card's info (i) first."}
        try:
            details = cards.save_lora_metadata(card_id, activation_text, preferred_weight, negative_text,
                                               description)
        except (ParamError, OSError) as error:
            return {info.status: f"⚠ Not saved: {error}"}
        return lora_info(details.card_id, status=f"Saved {details.file_name.rsplit('.', 1)[0]}.json.")

    def render_lora(current_folder: str | None) -> tuple[str, Any]:
        # The card's click text changes with the sidecar (weight, activation text): show it at once.
        listing = cards.listing(LORA)
        return render_cards(listing), folder_choices(listing, current_folder)

    info.save.click(save, inputs=[info.card_id, *editor_fields], outputs=info_outputs, api_name=False).then(
        render_lora, inputs=panel.tabs[LORA].folder, outputs=[panel.tabs[LORA].grid, panel.tabs[LORA].folder],
        api_name=False, show_progress="hidden",
    )
    info.close.click(lambda: _hidden_info(info), outputs=[info.group, info.card_id, info.status], api_name=False)


def wire_style_editor(ctx: UiContext, cards: NetworkCards, panel: ExtraNetworksPanel, tab: Txt2ImgTab) -> None:
    editor = panel.style_editor
    styles_tab = panel.tabs[STYLES]
    styles_db = ctx.styles
    picker = tab.styles
    if picker is None:
        return  # a style card adds its style to the picker: without one there is nothing to wire
    fields = [editor.name, editor.prompt, editor.negative_prompt]

    def rerender(current_folder: str | None, chosen: list[str] | None) -> tuple[str, Any, Any]:
        listing = cards.listing(STYLES)
        return render_cards(listing), folder_choices(listing, current_folder), style_choices_update(ctx, chosen)

    rerender_outputs = [styles_tab.grid, styles_tab.folder, picker]

    def on_style_click(chosen: list[str] | None, event: gr.EventData) -> dict[Any, Any]:
        name = _event_field(event, "card_id")
        style = cards.style(name) if name else None
        if style is None:
            return {editor.status: "⚠ That style is gone; press Refresh."}
        if _event_field(event, "action") == "info":
            return {editor.name: style.name, editor.prompt: style.prompt or "",
                    editor.negative_prompt: style.negative_prompt or "", editor.status: ""}
        current = list(chosen or [])
        # A second click takes the style out of the picker again, as a second Lora click takes the tag out.
        updated = [item for item in current if item != name] if name in current else [*current, name]
        return {picker: gr.update(value=updated)}

    styles_tab.grid.click(on_style_click, inputs=picker, outputs=[*fields, editor.status, picker],
                          show_progress="hidden", api_name=False)

    editor.copy_from_prompt.click(lambda prompt, negative: (prompt, negative),
                                  inputs=[tab.prompt, tab.negative_prompt],
                                  outputs=[editor.prompt, editor.negative_prompt], api_name=False)

    def save(name: str, prompt: str, negative_prompt: str) -> str:
        if styles_db is None:
            return "⚠ Styles are not available."
        name = (name or "").strip()
        created = styles_db.get(name) is None
        try:
            styles_db.save_style(Style(name, prompt or "", negative_prompt or ""))
        except (ValueError, OSError) as error:
            return f"⚠ Not saved: {error}"
        return f"{'Created' if created else 'Saved'} style {name}."

    def delete(name: str) -> str:
        if styles_db is None:
            return "⚠ Styles are not available."
        name = (name or "").strip()
        try:
            deleted = styles_db.delete_style(name)
        except (ValueError, OSError) as error:
            return f"⚠ Not deleted: {error}"
        return f"Deleted style {name}." if deleted else f"⚠ There is no style called {name!r}."

    # After an edit: the cards, and the picker's choices (a deleted style also leaves the selection).
    editor.save.click(save, inputs=fields, outputs=editor.status, api_name=False).then(
        rerender, inputs=[styles_tab.folder, picker], outputs=rerender_outputs, api_name=False,
        show_progress="hidden")
    editor.delete.click(delete, inputs=editor.name, outputs=editor.status, api_name=False).then(
        rerender, inputs=[styles_tab.folder, picker], outputs=rerender_outputs, api_name=False,
        show_progress="hidden")


def preview_endpoint(cards: NetworkCards) -> Callable[[str, int, str], Response]:
    """GET PREVIEW_ROUTE/{kind}/{root}/{path}: a card's preview picture, only from inside that kind's model folders
    (NetworkCards.preview_file resolves the name and refuses anything else with the same 404)."""

    def preview(kind: str, root: int, path: str) -> Response:
        picture = cards.preview_file(kind, root, path)
        if picture is None:
            return JSONResponse({"detail": "File not found"}, status_code=404)
        return FileResponse(picture, headers={"Cache-Control": PREVIEW_CACHE_CONTROL,
                                              "X-Content-Type-Options": "nosniff"})

    return preview
