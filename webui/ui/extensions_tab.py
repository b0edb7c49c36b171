"""The Extensions tab: installed extensions (status, errors, enable/disable, check, update, remove), install from a
git URL, the available list from an index, and Reload UI. Must not import torch or the engine; the extension host
(webui.app.extensions) does the work, this module only shows it."""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from webui.app.extensions import STATUS_FAILED, ExtensionError, ExtensionHost, ExtensionInfo, IndexEntry
from webui.core.params import ParamError
from webui.ui.context import UiContext

BOOT_ID_URL = "/internal/boot-id"
# After "Reload UI" the page waits for the restarted server (a new boot id), then reloads itself. The restart
# may first wait for running jobs, so the wait has no end; each poll gives up after a few seconds so that a
# request stuck on the dying server cannot stall the loop.
RELOAD_WHEN_RESTARTED_JS = (
    "async (message) => { if (!String(message).startsWith('Restarting')) return [];"
    f" const bootId = async () => {{ try {{ const r = await fetch({json.dumps(BOOT_ID_URL)},"
    " {cache: 'no-store', signal: AbortSignal.timeout(5000)});"
    " return r.ok ? (await r.json()).boot_id : null; } catch (e) { return null; } };"
    " const before = await bootId();"
    " for (;;) {"
    "  await new Promise(done => setTimeout(done, 1000));"
    "  const now = await bootId();"
    "  if (now && now !== before) { window.location.reload(); return; }"
    " } }"
)


@dataclass
class ExtensionsTab:
    notice: gr.Markdown
    table: gr.HTML
    choice: gr.Dropdown
    allow_requirements: gr.Checkbox
    enable: gr.Button
    disable: gr.Button
    check: gr.Button
    update: gr.Button
    remove: gr.Button
    message: gr.Markdown
    error_details: gr.Textbox
    reload_ui: gr.Button
    install_url: gr.Textbox
    install_branch: gr.Textbox
    install_folder: gr.Textbox
    install: gr.Button
    index_url: gr.Textbox
    index_load: gr.Button
    index_search: gr.Textbox
    index_table: gr.HTML
    index_choice: gr.Dropdown
    index_install: gr.Button
    index_entries: gr.State
    index_file: gr.File


def build_extensions_tab(ctx: UiContext) -> ExtensionsTab:
    host = ctx.extensions
    with gr.Tabs(elem_id="extensions_tabs"):
        with gr.Tab("Installed", elem_id="extensions_installed"):
            notice = gr.Markdown(elem_id="ext_notice")
            table = gr.HTML(elem_id="ext_table")
            with gr.Row(equal_height=True):
                choice = gr.Dropdown(label="Extension", choices=[], elem_id="ext_choice", scale=2)
                allow_requirements = gr.Checkbox(
                    label="Allow installing its requirements with pip when enabling", value=False,
                    elem_id="ext_allow_requirements", scale=2,
                )
            with gr.Row():
                enable = gr.Button("Enable", elem_id="ext_enable", variant="primary")
                disable = gr.Button("Disable", elem_id="ext_disable")
                check = gr.Button("Check for updates", elem_id="ext_check")
                update = gr.Button("Update", elem_id="ext_update")
                remove = gr.Button("Remove", elem_id="ext_remove", variant="stop")
            message = gr.Markdown(elem_id="ext_message")
            error_details = gr.Textbox(label="Error of the selected extension (traceback)", lines=6,
                                       interactive=False, elem_id="ext_error_details")
            reload_ui = gr.Button("Reload UI", elem_id="ext_reload_ui")
        with gr.Tab("Install from URL", elem_id="extensions_install"):
            install_url = gr.Textbox(label="URL of the extension's git repository", elem_id="ext_install_url")
            install_branch = gr.Textbox(label="Specific branch name (empty: the default branch)",
                                        elem_id="ext_install_branch")
            install_folder = gr.Textbox(label="Local folder name (empty: the name in its extension.toml)",
                                        elem_id="ext_install_folder")
            install = gr.Button("Install", variant="primary", elem_id="ext_install")
        with gr.Tab("Available", elem_id="extensions_available"):
            with gr.Row(equal_height=True):
                index_url = gr.Textbox(label="Load from (an http:// or https:// URL)",
                                       value=host.index_url if host else "", scale=4, elem_id="ext_index_url")
                index_load = gr.Button("Load", elem_id="ext_index_load", scale=1)
            index_file = gr.File(label="…or open an index file from this computer", file_types=[".json"],
                                 type="binary", elem_id="ext_index_file")
            index_search = gr.Textbox(label="Search", elem_id="ext_index_search")
            index_table = gr.HTML(elem_id="ext_index_table")
            with gr.Row(equal_height=True):
                index_choice = gr.Dropdown(label="Extension to install", choices=[], elem_id="ext_index_choice",
                                           scale=4)
                index_install = gr.Button("Install", variant="primary", elem_id="ext_index_install", scale=1)
    return ExtensionsTab(
        notice, table, choice, allow_requirements, enable, disable, check, update, remove, message, error_details,
        reload_ui, install_url, install_branch, install_folder, install, index_url, index_load, index_search,
        index_table, index_choice, index_install, index_entries=gr.State([]), index_file=index_file,
    )


# -- rendering ------------------------------------------------------------------------------------------------------


def installed_table(infos: list[ExtensionInfo]) -> str:
    if not infos:
        return "<p>No extension is installed.</p>"
    rows = []
    for info in infos:
        status = info.status + (f": {info.error}" if info.error else "")
        source = "built-in" if info.builtin else (info.remote or "(no git remote)")
        cells = [info.name, info.version, source, info.branch, info.commit[:8], info.commit_date[:10],
                 "yes" if info.enabled else "no", status]
        css = ' class="ext-failed"' if info.status == STATUS_FAILED else ""
        rows.append(f'<tr data-extension="{html.escape(info.name)}"{css}>'
                    + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
    head = "".join(f"<th>{name}</th>" for name in
                   ("Extension", "Version", "URL", "Branch", "Commit", "Date", "Enabled", "Status"))
    return f'<table class="ext-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def notice_text(host: ExtensionHost, can_reload: bool) -> str:
    lines = []
    if host.safe_mode:
        lines.append("**Safe mode** (--disable-extensions): no extension is loaded.")
    if not host.changes_allowed:
        lines.append("Installing, updating and removing are off: the server is exposed (--listen/--share) "
                     "without --enable-insecure-extension-access.")
    pending = host.reload_needed()
    if pending:
        action = "Press **Reload UI** to apply." if can_reload else "Restart the web UI to apply."
        lines.append(f"Changed since this page was built: {', '.join(pending)}. {action}")
    return "  \n".join(lines)


def index_table(entries: list[IndexEntry], search: str) -> tuple[str, list[str]]:
    wanted = search.strip().lower()
    shown = [entry for entry in entries
             if not wanted or wanted in f"{entry.name} {entry.description} {' '.join(entry.tags)} {entry.url}".lower()]
    if not shown:
        return "<p>No extension matches.</p>", []
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in (
            entry.name, entry.description, ", ".join(entry.tags), entry.url,
            "installed" if entry.installed else "")) + "</tr>"
        for entry in shown
    )
    head = "".join(f"<th>{name}</th>" for name in ("Extension", "Description", "Tags", "URL", ""))
    choices = [entry.url for entry in shown if not entry.installed]
    return f'<table class="ext-table"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>', choices


# -- events -----------------------------------------------------------------------------------------------------------


def wire_extensions_tab(ctx: UiContext, demo: gr.Blocks, tab: ExtensionsTab, tab_item: gr.Tab) -> None:
    host = ctx.extensions
    if host is None:
        return
    can_reload = ctx.restart is not None
    installed_outputs = [tab.notice, tab.table, tab.choice, tab.error_details]

    def refreshed(selected: str | None = None, message: str = "") -> list[Any]:
        """The Installed tab's outputs; the extension a `message` names becomes the selected one."""
        infos = host.list_extensions()
        names = [info.name for info in infos]
        selected = next((name for name in names if name in message.split()), selected)
        value = selected if selected in names else (names[0] if names else None)
        details = next((info.traceback or info.error for info in infos if info.name == value), "")
        return [notice_text(host, can_reload), installed_table(infos), gr.update(choices=names, value=value), details]

    # Each button's action on the chosen extension: (name, allow pip requirements) → the message shown.
    actions: list[tuple[gr.Button, Callable[[str, bool], str]]] = [
        (tab.enable, lambda name, allow: host.enable(name, install_requirements=allow)),
        (tab.disable, lambda name, _allow: host.disable(name)),
        (tab.check, lambda name, _allow: f"{name}: {host.check_updates(name)}"),
        (tab.update, lambda name, _allow: host.update(name)),
        (tab.remove, lambda name, _allow: host.remove(name)),
    ]

    def act(action: Callable[[str, bool], str]) -> Callable[[str | None, bool], list[Any]]:
        def handler(name: str | None, allow_requirements: bool) -> list[Any]:
            if not name:
                return ["Choose an extension first.", *refreshed(name)]
            try:
                text = action(name, allow_requirements)
            except (ExtensionError, ParamError) as error:
                text = f"**Not done.** {error}"
            return [text, *refreshed(name)]

        return handler

    for button, action in actions:
        button.click(act(action), inputs=[tab.choice, tab.allow_requirements],
                     outputs=[tab.message, *installed_outputs], api_name=False)

    def show_details(name: str | None) -> str:
        try:
            info = host.get(name) if name else None
        except ExtensionError:
            return ""
        return (info.traceback or info.error) if info is not None else ""

    tab.choice.input(show_details, inputs=tab.choice, outputs=tab.error_details, api_name=False)

    def install(url: str, branch: str, folder: str) -> list[Any]:
        try:
            text = host.install(url, branch, folder)
        except ExtensionError as error:
            return [f"**Not installed.** {error}", *refreshed()]
        return [text, *refreshed(message=text)]

    tab.install.click(install, inputs=[tab.install_url, tab.install_branch, tab.install_folder],
                      outputs=[tab.message, *installed_outputs], api_name=False)

    def show_index(read: Callable[[], list[IndexEntry]], search: str) -> list[Any]:
        try:
            entries = read()
        except ExtensionError as error:
            return [[], f"<p>{html.escape(str(error))}</p>", gr.update(choices=[], value=None)]
        table, choices = index_table(entries, search)
        return [entries, table, gr.update(choices=choices, value=choices[0] if choices else None)]

    def load_index(url: str, search: str) -> list[Any]:
        return show_index(lambda: host.load_index(url), search)

    def open_index_file(data: bytes | None, search: str) -> list[Any]:
        if data is None:
            return [[], "", gr.update(choices=[], value=None)]
        return show_index(lambda: host.read_index(data, "the chosen file"), search)

    index_outputs = [tab.index_entries, tab.index_table, tab.index_choice]
    tab.index_load.click(load_index, inputs=[tab.index_url, tab.index_search], outputs=index_outputs, api_name=False)
    tab.index_file.upload(open_index_file, inputs=[tab.index_file, tab.index_search], outputs=index_outputs,
                          api_name=False)

    def search(entries: list[IndexEntry], text: str) -> list[Any]:
        table, choices = index_table(entries, text)
        return [table, gr.update(choices=choices, value=choices[0] if choices else None)]

    tab.index_search.input(search, inputs=[tab.index_entries, tab.index_search],
                           outputs=[tab.index_table, tab.index_choice], api_name=False)
    tab.index_install.click(lambda url: install(url or "", "", ""), inputs=tab.index_choice,
                            outputs=[tab.message, *installed_outputs], api_name=False)

    def reload_ui() -> str:
        return ctx.restart() if ctx.restart is not None else "Restart the web UI to apply the changes."

    tab.reload_ui.click(reload_ui, outputs=tab.message, api_name=False).then(
        None, inputs=tab.message, js=RELOAD_WHEN_RESTARTED_JS, api_name=False
    )
    demo.load(lambda: refreshed(), outputs=installed_outputs, api_name=False)
    # Statuses change while the page is open (a hook fails during a job): shown fresh whenever the tab is opened.
    tab_item.select(refreshed, inputs=tab.choice, outputs=installed_outputs, api_name=False)
