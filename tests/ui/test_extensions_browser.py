"""The Extensions tab in a real browser: install from a git daemon on 127.0.0.1, enable, Reload UI, the extension's
controls in txt2img, generate, infotext, Send to txt2img, update to a new commit, disable, remove; broken extensions.
Must not import webui: what is asserted is what a user sees and what lands on disk."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.fixtures.extension_repos import (
    BROKEN_IMPORT,
    RAISING_HOOK,
    GitDaemon,
    commit_files,
    make_repo,
    stamp_extension,
)
from tests.ui.conftest import WebuiServer
from tests.ui.test_browser import (
    _wait_until_settled,
    button,
    choose,
    fill_text,
    generate_and_wait,
    number_box,
    open_tab,
    open_ui,
    set_number,
    set_small_job,
    textarea,
    wait_for_text,
)

# Hang guard for a restart (imports torch and gradio again) on a slow shared machine; never asserted as timing.
RESTART_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("ext-repos")
    make_repo(base / "stamp.git", stamp_extension("v1"))
    return base


@pytest.fixture(scope="module")
def daemon(repos: Path) -> Iterator[GitDaemon]:
    with GitDaemon(repos) as served:
        yield served


@pytest.fixture(scope="module")
def ext_server(start_webui: Callable[..., WebuiServer], tiny_model_dir: Path, ui_tmp: Path) -> WebuiServer:
    """A server of its own (it restarts itself on Reload UI), with two broken extensions already in its folder."""
    extensions_dir = ui_tmp / "ext-ui-extensions"
    make_repo(extensions_dir / "broken_import", BROKEN_IMPORT)
    make_repo(extensions_dir / "raising_hook", RAISING_HOOK)
    return start_webui("ext-ui", tiny_model_dir, ["--extensions-dir", str(extensions_dir)])


def reload_ui(page: Page) -> None:
    open_tab(page, "Extensions")
    with page.expect_navigation(timeout=RESTART_TIMEOUT_MS):
        button(page, "ext_reload_ui").click()
    _wait_until_settled(page)


def act(page: Page, name: str, action: str, expected: str) -> str:
    """Select `name` in the Installed tab, press the button `action`, wait for the message."""
    open_tab(page, "Extensions")
    open_tab(page, "Installed")
    choose(page, "ext_choice", name)
    button(page, f"ext_{action}").click()
    return wait_for_text(page, "ext_message", expected, RESTART_TIMEOUT_MS)


def open_section(page: Page, elem_id: str, title: str) -> None:
    page.locator(f"#{elem_id}").get_by_role("button", name=title).first.click()


def test_install_enable_generate_update_disable_remove(
    new_context: Callable[[], Any], ext_server: WebuiServer, repos: Path, daemon: GitDaemon
) -> None:
    page = open_ui(new_context().new_page(), ext_server)
    open_tab(page, "Extensions")
    # The shipped ones are listed (disabled); a broken one fails when enabled, and says why.
    wait_for_text(page, "ext_table", r"cfg_rescale[\s\S]*wildcards")
    act(page, "broken_import", "enable", r"failed to load: loading failed: ModuleNotFoundError")
    expect(textarea(page, "ext_error_details")).to_have_value(re.compile("a_module_that_does_not_exist_anywhere"))
    act(page, "raising_hook", "enable", r"Enabled raising_hook")

    open_tab(page, "Install from URL")
    fill_text(page, "ext_install_url", daemon.url("stamp.git"))
    button(page, "ext_install").click()
    wait_for_text(page, "ext_message", r"Installed stamp 1\.0\.0 \(disabled", RESTART_TIMEOUT_MS)
    installed = ext_server.root.parent / "ext-ui-extensions" / "stamp"
    assert (installed / "__init__.py").is_file() and not (installed / "imported.marker").exists()
    act(page, "stamp", "enable", r"Enabled stamp\. Reload UI")
    act(page, "cfg_rescale", "enable", r"Enabled cfg_rescale")
    wait_for_text(page, "ext_notice", r"Reload UI")

    reload_ui(page)
    open_section(page, "ext_stamp_section", "Stamp")
    open_section(page, "ext_cfg_rescale_section", "CFG Rescale")
    page.locator("#ext_stamp_enabled input[type=checkbox]").check()
    fill_text(page, "ext_stamp_label", "hello, world")
    set_number(page, "ext_cfg_rescale_multiplier", 0.7)
    fill_text(page, "txt2img_prompt", "a stamped lighthouse")
    set_small_job(page, steps=3)
    infotext = generate_and_wait(page)
    assert "Stamp: v1" in infotext and 'Stamp label: "hello, world"' in infotext
    assert "Stamp enabled: True" in infotext and "CFG Rescale: 0.7" in infotext
    # The raising hook failed its extension only; the image was made.
    assert ext_server.output_images()

    # Send to txt2img puts the extension's values back.
    page.locator("#ext_stamp_enabled input[type=checkbox]").uncheck()
    fill_text(page, "ext_stamp_label", "")
    set_number(page, "ext_cfg_rescale_multiplier", 0)
    button(page, "txt2img_send_to_txt2img").click()
    expect(number_box(page, "ext_cfg_rescale_multiplier")).to_have_value("0.7")
    expect(textarea(page, "ext_stamp_label")).to_have_value("hello, world")
    expect(page.locator("#ext_stamp_enabled input[type=checkbox]")).to_be_checked()

    open_tab(page, "Extensions")
    wait_for_text(page, "ext_table", r"raising_hook[\s\S]*failed: CFG hook raised RuntimeError")
    new_commit = commit_files(repos / "stamp.git", stamp_extension("v2"), "second version")
    act(page, "stamp", "check", r"stamp: behind 1 commit")
    act(page, "stamp", "update", rf"Updated stamp from \w{{8}} to {new_commit[:8]}")
    wait_for_text(page, "ext_table", rf"stamp\s*2\.0\.0[\s\S]*{new_commit[:8]}")

    reload_ui(page)
    open_section(page, "ext_stamp_section", "Stamp")
    page.locator("#ext_stamp_enabled input[type=checkbox]").check()
    set_small_job(page, steps=2)
    assert "Stamp: v2" in generate_and_wait(page)

    # Disabling stops its hooks at once (its controls go at the next Reload UI, which the app tests cover).
    act(page, "stamp", "disable", r"Disabled stamp\. Reload UI")
    wait_for_text(page, "ext_notice", r"Changed since this page was built: .*stamp")
    open_tab(page, "txt2img")
    previous = textarea(page, "txt2img_infotext").input_value()
    button(page, "txt2img_generate").click()
    expect(textarea(page, "txt2img_infotext")).not_to_have_value(previous)  # cleared when the job is queued
    wait_for_text(page, "txt2img_progress", r"\bDone:", RESTART_TIMEOUT_MS)
    infotext = wait_for_text(page, "txt2img_infotext", r"Steps: ")
    assert "Stamp" not in infotext and "Model: tiny" in infotext
    act(page, "stamp", "remove", r"Removed stamp")
    expect(page.locator("#ext_table")).not_to_contain_text("stamp")
    assert not installed.exists()



def test_available_list_from_an_index_file_the_user_picks(
    new_context: Callable[[], Any], ext_server: WebuiServer, tmp_path: Path
) -> None:
    index = tmp_path / "my-index.json"
    index.write_text(json.dumps({"extensions": [
        {"name": "picked-one", "url": "https://example.invalid/picked-one.git", "description": "from a file"}]}))
    state_file = ext_server.data_dir / "extensions.json"
    state_before = state_file.read_bytes() if state_file.exists() else None
    page = open_ui(new_context().new_page(), ext_server)
    open_tab(page, "Extensions")
    open_tab(page, "Available")
    # A path typed as the URL is not read: local files come only from the file picker.
    fill_text(page, "ext_index_url", str(index))
    button(page, "ext_index_load").click()
    wait_for_text(page, "ext_index_table", r"must be an http:// or https:// URL")
    page.locator("#ext_index_file input[type=file]").set_input_files(str(index))
    wait_for_text(page, "ext_index_table", r"picked-one[\s\S]*from a file")
    assert (state_file.read_bytes() if state_file.exists() else None) == state_before
