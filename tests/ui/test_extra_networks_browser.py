"""The extra-networks cards and styles in a real browser, on a server of their own with real tiny files: open the Lora
tab, search, click a card (tag in the prompt, a second click takes it out), generate (`Lora hashes` in the infotext),
Send to txt2img, the info view's sidecar editor (file on disk), a checkpoint card, and styles (picker, ✎, editor).
Must not import webui: what is asserted is what a user sees and what lands on disk."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.fixtures.network_files import (
    SDXL_METADATA,
    TINY_TE_CHECKPOINT_KEY,
    checkpoint_tensor_shape,
    write_lora,
    write_preview,
    write_sidecar,
)
from tests.ui.conftest import WebuiServer
from tests.ui.test_browser import (
    JOB_TIMEOUT_MS,
    button,
    ensure_checkpoint,
    fill_text,
    generate_and_wait,
    open_ui,
    screenshot,
    set_small_job,
    textarea,
    wait_for_text,
)

TAGS = {"img/10_fox": {"fox": 12, "snow": 5}}
STYLES_CSV = "name,prompt,negative_prompt\nSharp,sharp focus,blurry\nCinematic,\"cinematic still of {prompt}\",\n"


@pytest.fixture(scope="module")
def networks_server(start_webui: Callable[..., WebuiServer], tiny_model_dir: Path, ui_tmp: Path) -> WebuiServer:
    """The tiny SD1 checkpoints, a Lora folder (--lora-dir) with a LoRA that fits them (preview, sidecar, training
    metadata), one in a subfolder and one made for SDXL, and a styles file (--styles-file)."""
    files = ui_tmp / "extra-networks-files"
    lora = files / "Lora"
    width = checkpoint_tensor_shape(tiny_model_dir / "tiny.safetensors", TINY_TE_CHECKPOINT_KEY)[0]
    fox = write_lora(lora / "fox_style.safetensors", {
        "ss_output_name": "foxy", "ss_sd_model_name": "v1-5-pruned.safetensors", "ss_resolution": "(512, 512)",
        "ss_tag_frequency": TAGS,
    }, width=width, seed=1)
    write_preview(lora / "fox_style.preview.png", color=(220, 90, 20))
    write_sidecar(fox, {"activation text": "fox ears", "preferred weight": 0.7, "negative text": "human"})
    write_lora(lora / "people" / "plain_person.safetensors", {"ss_sd_model_name": "v1-5"}, width=width, seed=2)
    write_preview(lora / "people" / "plain_person.png", color=(30, 160, 60))
    write_lora(lora / "xl_detail.safetensors", SDXL_METADATA, width=width, seed=3)
    styles = files / "styles.csv"
    styles.write_text(STYLES_CSV, encoding="utf-8")
    return start_webui("extra-networks", tiny_model_dir,
                       ["--lora-dir", str(lora), "--styles-file", str(styles)])


@pytest.fixture
def page(new_context: Callable[[], Any], networks_server: WebuiServer) -> Page:
    page = open_ui(new_context().new_page(), networks_server)
    ensure_checkpoint(page, "tiny")
    # The cards judge each network against the loaded model: wait until start-up has loaded it.
    wait_for_text(page, "ckpt_status", r"Loaded tiny \[", JOB_TIMEOUT_MS)
    return page


def open_cards(page: Page, tab_name: str, kind: str) -> None:
    """Open the extra-networks panel (if closed) and one of its tabs; wait for its cards."""
    panel = page.locator("#txt2img_extra_networks")
    if not page.locator("#txt2img_extra_tabs").is_visible():
        panel.get_by_text("Extra networks", exact=False).first.click()
    page.locator("#txt2img_extra_tabs").get_by_role("tab", name=tab_name, exact=True).click()
    expect(page.locator(f"#{kind}_cards .en-head, #{kind}_cards .en-empty").first).to_be_visible()


def card(page: Page, kind: str, title: str):  # noqa: ANN201 - playwright Locator
    return page.locator(f'#{kind}_cards .en-card[title="{title}"]')


def visible_titles(page: Page, kind: str) -> list[str]:
    return page.locator(f"#{kind}_cards .en-card:not([hidden])").evaluate_all(
        "cards => cards.sort((a, b) => Number(a.style.order) - Number(b.style.order)).map(c => c.title)")


def search(page: Page, kind: str, text: str) -> None:
    box = page.locator(f"#{kind}_search textarea, #{kind}_search input").first
    box.fill(text)


def selected_styles(page: Page) -> list[str]:
    return page.locator("#txt2img_styles .token").evaluate_all(
        "tokens => tokens.map(t => t.innerText.replace(/[×✕]/g, '').trim()).filter(Boolean)")


def pick_style(page: Page, name: str) -> None:
    page.locator("#txt2img_styles input").first.click()
    page.get_by_role("option", name=name, exact=True).click()
    page.keyboard.press("Escape")
    expect(page.locator("#txt2img_styles")).to_contain_text(name)


def test_lora_card_search_click_generate_and_send_back(page: Page, networks_server: WebuiServer) -> None:
    open_cards(page, "Lora", "lora")
    expect(page.locator("#lora_cards .en-card")).to_have_count(3)
    # The SDXL LoRA does not fit the loaded SD1 model: dimmed, badge "SDXL", listed last.
    expect(card(page, "lora", "xl_detail")).to_have_class(re.compile(r"\ben-incompatible\b"))
    assert visible_titles(page, "lora") == ["fox_style", "plain_person", "xl_detail"]
    expect(page.locator('#lora_cards .en-card[title="fox_style"] img')).to_have_attribute(
        "src", re.compile(r"^/internal/extra-networks/preview/lora/\d+/fox_style\.preview\.png\?v=\d+$"))
    page.wait_for_function("() => [...document.querySelectorAll('#lora_cards img')].every(i => i.naturalWidth > 0)")
    screenshot(page, "extra_networks_lora.png")

    search(page, "lora", "fox ears")  # the activation text is searched too
    expect(page.locator("#lora_cards .en-card:not([hidden])")).to_have_count(1)
    expect(page.locator("#lora_cards .en-count")).to_have_text("1 of 3")
    search(page, "lora", "")
    expect(page.locator("#lora_cards .en-card:not([hidden])")).to_have_count(3)

    fill_text(page, "txt2img_prompt", "a watercolor fox")
    fill_text(page, "txt2img_neg_prompt", "ugly")
    card(page, "lora", "fox_style").click()
    expect(textarea(page, "txt2img_prompt")).to_have_value("a watercolor fox <lora:foxy:0.7> fox ears")
    expect(textarea(page, "txt2img_neg_prompt")).to_have_value("ugly (human:1)")
    card(page, "lora", "fox_style").click()  # a second click takes it out again
    expect(textarea(page, "txt2img_prompt")).to_have_value("a watercolor fox")
    expect(textarea(page, "txt2img_neg_prompt")).to_have_value("ugly")
    card(page, "lora", "fox_style").click()
    prompt = "a watercolor fox <lora:foxy:0.7> fox ears"
    expect(textarea(page, "txt2img_prompt")).to_have_value(prompt)

    set_small_job(page, steps=2)
    infotext = generate_and_wait(page)
    assert infotext.splitlines()[0] == prompt
    assert re.search(r'\bLora hashes: "foxy: [0-9a-f]{12}"', infotext), infotext
    assert "does not fit" not in (page.locator("#txt2img_progress").inner_text())

    fill_text(page, "txt2img_prompt", "something else")
    fill_text(page, "txt2img_neg_prompt", "")
    button(page, "txt2img_send_to_txt2img").click()
    expect(textarea(page, "txt2img_prompt")).to_have_value(prompt)
    expect(textarea(page, "txt2img_neg_prompt")).to_have_value("ugly (human:1)")


def test_folder_filter_and_sort_by_date(page: Page) -> None:
    open_cards(page, "Lora", "lora")
    folder = page.locator("#lora_folder input").first
    folder.click()
    page.get_by_role("option", name="people", exact=True).click()
    expect(page.locator("#lora_cards .en-card:not([hidden])")).to_have_count(1)
    assert visible_titles(page, "lora") == ["plain_person"]
    folder.click()
    page.get_by_role("option", name="All", exact=True).click()
    expect(page.locator("#lora_cards .en-card:not([hidden])")).to_have_count(3)
    sort = page.locator("#lora_sort input").first
    sort.click()
    page.get_by_role("option", name="Date modified", exact=True).click()
    # Newest first, the SDXL one still last (it does not fit the loaded model).
    page.wait_for_function("() => document.querySelector('#lora_cards .en-card[title=xl_detail]').style.order"
                           " === document.querySelector('#lora_cards .en-card[title=xl_detail]').dataset.rankDate")
    assert visible_titles(page, "lora")[-1] == "xl_detail"


def test_info_view_edits_the_sidecar_on_disk(page: Page, networks_server: WebuiServer, ui_tmp: Path) -> None:
    sidecar = ui_tmp / "extra-networks-files" / "Lora" / "people" / "plain_person.json"
    open_cards(page, "Lora", "lora")
    card(page, "lora", "fox_style").locator(".en-info").click()
    expect(page.locator("#extra_info").first).to_be_visible()
    expect(page.locator("#extra_info_facts")).to_contain_text("v1-5-pruned.safetensors")
    expect(page.locator("#extra_info_facts")).to_contain_text("512x512")
    expect(page.locator("#extra_info_facts")).to_contain_text("fox (12)")
    expect(textarea(page, "extra_info_activation")).to_have_value("fox ears")
    assert textarea(page, "txt2img_prompt").input_value() == "", "the info button also inserted the tag"

    card(page, "lora", "plain_person").locator(".en-info").click()
    expect(page.locator("#extra_info_title")).to_contain_text("plain_person")
    fill_text(page, "extra_info_activation", "green jacket")
    weight = page.locator("#extra_info_weight input").first
    weight.fill("0.6")
    weight.press("Tab")
    fill_text(page, "extra_info_negative", "hat")
    fill_text(page, "extra_info_description", "A person in green")
    button(page, "extra_info_save").click()
    wait_for_text(page, "extra_info_status", r"Saved plain_person\.json")
    saved = json.loads(sidecar.read_text(encoding="utf-8"))
    assert saved["activation text"] == "green jacket"
    assert saved["preferred weight"] == 0.6
    assert saved["negative text"] == "hat"
    assert saved["description"] == "A person in green"

    card(page, "lora", "plain_person").click()
    expect(textarea(page, "txt2img_prompt")).to_have_value("<lora:plain_person:0.6> green jacket")
    expect(textarea(page, "txt2img_neg_prompt")).to_have_value("(hat:1)")


def test_styles_apply_to_the_job_and_paste_back_into_the_picker(page: Page) -> None:
    fill_text(page, "txt2img_prompt", "a lighthouse")
    fill_text(page, "txt2img_neg_prompt", "")
    pick_style(page, "Sharp")
    set_small_job(page, steps=2)
    infotext = generate_and_wait(page)
    # The job got the styled prompts; the boxes keep what was typed (as A1111).
    assert infotext.splitlines()[0] == "a lighthouse, sharp focus"
    assert "Negative prompt: blurry" in infotext
    expect(textarea(page, "txt2img_prompt")).to_have_value("a lighthouse")

    page.locator("#txt2img_styles .token-remove, #txt2img_styles [aria-label*='Remove']").first.click()
    expect(page.locator("#txt2img_styles .token")).to_have_count(0)
    button(page, "txt2img_send_to_txt2img").click()
    # Pasting takes the style's text back out of the prompts and selects the style again.
    expect(textarea(page, "txt2img_prompt")).to_have_value("a lighthouse")
    expect(page.locator("#txt2img_styles")).to_contain_text("Sharp")
    assert selected_styles(page) == ["Sharp"]

    # ✎ writes the selected styles into the prompts and clears the picker.
    button(page, "txt2img_style_apply").click()
    expect(textarea(page, "txt2img_prompt")).to_have_value("a lighthouse, sharp focus")
    expect(textarea(page, "txt2img_neg_prompt")).to_have_value("blurry")
    expect(page.locator("#txt2img_styles .token")).to_have_count(0)


def test_style_cards_editor_and_checkpoint_cards(page: Page, ui_tmp: Path) -> None:
    styles_file = ui_tmp / "extra-networks-files" / "styles.csv"
    open_cards(page, "Styles", "styles")
    expect(page.locator("#styles_cards .en-card")).to_have_count(2)
    card(page, "styles", "Cinematic").click()
    expect(page.locator("#txt2img_styles")).to_contain_text("Cinematic")

    page.locator("#style_edit_name input").first.fill("Noir")
    fill_text(page, "style_edit_prompt", "black and white photo of {prompt}")
    fill_text(page, "style_edit_negative", "color")
    button(page, "style_edit_save").click()
    wait_for_text(page, "style_edit_status", r"Created style Noir")
    expect(page.locator("#styles_cards .en-card")).to_have_count(3)
    assert "Noir,black and white photo of {prompt},color" in styles_file.read_text(encoding="utf-8-sig")
    card(page, "styles", "Noir").locator(".en-info").click()
    expect(textarea(page, "style_edit_prompt")).to_have_value("black and white photo of {prompt}")
    button(page, "style_edit_delete").click()
    wait_for_text(page, "style_edit_status", r"Deleted style Noir")
    expect(page.locator("#styles_cards .en-card")).to_have_count(2)
    assert "Noir" not in styles_file.read_text(encoding="utf-8-sig")

    open_cards(page, "Checkpoints", "checkpoints")
    try:
        card(page, "checkpoints", "tiny_b").click()
        wait_for_text(page, "ckpt_status", r"Loaded tiny_b \[", JOB_TIMEOUT_MS)
        expect(page.locator("#ckpt_dropdown input").first).to_have_value("tiny_b.safetensors")
    finally:
        card(page, "checkpoints", "tiny").click()
        wait_for_text(page, "ckpt_status", r"Loaded tiny \[", JOB_TIMEOUT_MS)
