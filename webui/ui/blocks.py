"""The whole page: top bar, the four tabs, remembered controls, keyboard shortcut and styles.
Must not import torch or the engine; the composition root passes everything in through UiContext."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr

from webui.ui.context import UiContext
from webui.ui.extension_ui import build_extension_tabs
from webui.ui.extensions_tab import build_extensions_tab, wire_extensions_tab
from webui.ui.extra_networks import EXTRA_NETWORKS_CSS, EXTRA_NETWORKS_HEAD, build_extra_networks, wire_extra_networks
from webui.ui.gallery_tab import build_gallery_tab, wire_gallery
from webui.ui.model_download_panel import build_download_panel, wire_download_panel
from webui.ui.pnginfo_tab import build_pnginfo_tab, wire_pnginfo
from webui.ui.settings_tab import build_settings_tab, settings_components, settings_values, wire_settings
from webui.ui.styles_ui import style_choices_now
from webui.ui.txt2img import (
    REMEMBERED_CONTROLS,
    build_top_bar,
    build_txt2img_tab,
    loaded_status,
    remembered_components,
    vae_dropdown_now,
    wire_txt2img,
)

TITLE = "Stable Diffusion"
STATUS_REFRESH_SECONDS = 3.0
BROWSER_STATE_KEY = "webui-txt2img-controls"

CSS = """
.webui-progress { position: relative; height: 1.8em; border-radius: 6px; overflow: hidden;
                  background: var(--block-background-fill); border: 1px solid var(--border-color-primary); }
.webui-progress-bar { position: absolute; inset: 0 auto 0 0; background: var(--color-accent-soft); }
.webui-progress.failed { border-color: var(--error-border-color, #e11); }
.webui-progress-text { position: relative; padding: 0 0.6em; line-height: 1.8em; }
#txt2img_token_counter, #txt2img_neg_token_counter { text-align: right; font-size: 0.85em; opacity: 0.8; }
.ext-table { width: 100%; border-collapse: collapse; font-size: 0.9em; }
.ext-table th, .ext-table td { border-bottom: 1px solid var(--border-color-primary); padding: 0.3em 0.5em; text-align: left; }
.ext-table tr.ext-failed td { color: var(--error-text-color, #c00); }
""" + EXTRA_NETWORKS_CSS

# Ctrl/Cmd+Enter in a prompt box generates, as in A1111.
HEAD = """
<script>
document.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
  const box = event.target.closest && event.target.closest("#txt2img_prompt, #txt2img_neg_prompt");
  if (!box) return;
  event.preventDefault();
  const button = document.querySelector("#txt2img_generate");
  if (button) button.click();
});
</script>
""" + EXTRA_NETWORKS_HEAD


def theme_head(theme: str | None) -> str:
    """A1111's --theme: gradio picks light/dark from the __theme URL parameter."""
    if theme not in ("light", "dark"):
        return ""
    return (
        "<script>(() => { const url = new URL(window.location);"
        f" if (url.searchParams.get('__theme') !== '{theme}') {{ url.searchParams.set('__theme', '{theme}');"
        " window.location.replace(url); } })();</script>"
    )


def build_ui(ctx: UiContext) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        top = build_top_bar(ctx)
        download_panel = build_download_panel(ctx)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                txt2img = build_txt2img_tab(ctx)
                extra_networks = build_extra_networks(ctx)
            with gr.Tab("Gallery", id="gallery", elem_id="tab_gallery") as gallery_item:
                gallery = build_gallery_tab()
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                pnginfo = build_pnginfo_tab()
            build_extension_tabs(ctx.extensions)
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                settings = build_settings_tab(ctx)
            with gr.Tab("Extensions", id="extensions", elem_id="tab_extensions") as extensions_item:
                extensions = build_extensions_tab(ctx)
        wire_txt2img(ctx, top, txt2img)
        wire_extra_networks(ctx, extra_networks, top, txt2img)
        wire_gallery(ctx, gallery, top, txt2img, tabs, gallery_item)
        wire_pnginfo(ctx, pnginfo, top, txt2img, tabs)
        wire_settings(ctx, settings)
        wire_extensions_tab(ctx, demo, extensions, extensions_item)
        wire_download_panel(ctx, demo, download_panel, top)
        remember_controls(ctx, demo, remembered_components(top, txt2img))
        demo.load(lambda: loaded_status(ctx), outputs=top.status, api_name=False)
        demo.load(vae_dropdown_now(ctx), outputs=top.vae, api_name=False)
        if txt2img.styles is not None:
            demo.load(style_choices_now(ctx), inputs=txt2img.styles, outputs=txt2img.styles, api_name=False)
        demo.load(settings_values(ctx), outputs=settings_components(settings), api_name=False)
        # Another browser may swap the checkpoint, and start-up loads one in the background.
        gr.Timer(STATUS_REFRESH_SECONDS).tick(lambda: loaded_status(ctx), outputs=top.status,
                                               show_progress="hidden", api_name=False, queue=False)
    if ctx.extensions is not None:
        ctx.extensions.mark_ui_built()
    return demo


def remember_controls(ctx: UiContext, demo: gr.Blocks, components: list[Any]) -> None:
    """Keep the txt2img controls in the browser's localStorage: saved on every change, restored on load.

    Both run in the browser (no server round trip), so a refresh right after an edit cannot race a
    pending save. On load the server first applies the current UI defaults from Settings, then the
    browser's saved values replace them.
    """

    def current_defaults() -> list[Any]:
        defaults = ctx.settings.current.ui_defaults
        return [defaults[name] if name in defaults else gr.update() for name in REMEMBERED_CONTROLS]

    key = json.dumps(BROWSER_STATE_KEY)
    save_js = f"(...values) => {{ localStorage.setItem({key}, JSON.stringify(values)); return []; }}"
    restore_js = (
        f"(...current) => {{ let saved = null; try {{ saved = JSON.parse(localStorage.getItem({key})); }} "
        "catch (error) { saved = null; } "
        "if (!Array.isArray(saved) || saved.length !== current.length) return current; "
        "return saved.map((value, index) => (value === null ? current[index] : value)); }"
    )
    demo.load(current_defaults, outputs=components, api_name=False).then(
        None, inputs=components, outputs=components, js=restore_js, api_name=False
    )
    gr.on([component.change for component in components], None, inputs=components, outputs=None,
          js=save_js, api_name=False)
