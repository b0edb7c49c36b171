"""Real-browser tests of the web UI: headless Chromium drives the session's `python -m webui` server like a user does.
Must not import webui: what is asserted is what a user sees (text, images, files on disk), never the app's objects."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import piexif
import piexif.helper
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from webui.ui.blocks import BROWSER_STATE_KEY

if TYPE_CHECKING:
    from tests.ui.conftest import EngineImages, WebuiServer

SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

# Waits for a job to finish (ms). A hang guard for a slow shared machine; the tests never assert durations.
JOB_TIMEOUT_MS = 180_000
SMALL = 64
HASH10 = r"[0-9a-f]{10}"


# ---------------------------------------------------------------- page helpers


def button(page: Page, elem_id: str):  # noqa: ANN201 - playwright Locator
    """gr.Button puts elem_id on the <button> itself; other components on their wrapper."""
    return page.locator(f"button#{elem_id}, #{elem_id} button").first


def textarea(page: Page, elem_id: str):  # noqa: ANN201
    return page.locator(f"#{elem_id} textarea").first


def number_box(page: Page, elem_id: str):  # noqa: ANN201
    return page.locator(f"#{elem_id} input[type=number]").first


def dropdown_input(page: Page, elem_id: str):  # noqa: ANN201
    return page.locator(f"#{elem_id} input").first


_TEXT_OF = """([id]) => {
    const root = document.getElementById(id);
    if (!root) return null;
    const field = root.querySelector('textarea, input:not([type=file]):not([type=range]):not([type=checkbox])');
    return field ? field.value : root.innerText;
}"""


def text_of(page: Page, elem_id: str) -> str | None:
    """What a text component shows: a textbox's value, or the rendered text of a Markdown/HTML block."""
    return page.evaluate(_TEXT_OF, [elem_id])


def wait_for_text(page: Page, elem_id: str, pattern: str, timeout_ms: float = 60_000) -> str:
    """Wait until the component's shown text matches `pattern` (re.search); return that text."""
    check = """([id, pattern]) => {
        const root = document.getElementById(id);
        if (!root) return false;
        const field = root.querySelector('textarea, input:not([type=file]):not([type=range]):not([type=checkbox])');
        const text = field ? field.value : root.innerText;
        return new RegExp(pattern).test(text);
    }"""
    try:
        page.wait_for_function(check, arg=[elem_id, pattern], timeout=timeout_ms, polling=100)
    except Exception as error:  # noqa: BLE001 - re-raised as an assertion with what the user saw
        raise AssertionError(f"#{elem_id} never matched /{pattern}/; it shows {text_of(page, elem_id)!r}") from error
    return text_of(page, elem_id) or ""


def fill_text(page: Page, elem_id: str, text: str) -> None:
    box = textarea(page, elem_id)
    box.fill(text)
    expect(box).to_have_value(text)


def set_number(page: Page, elem_id: str, value: float | int) -> None:
    """Type into a slider's (or gr.Number's) number box and commit it, as a user does."""
    box = number_box(page, elem_id)
    box.fill(str(value))
    box.press("Enter")
    box.blur()
    expect(box).to_have_value(str(value))


def choose(page: Page, elem_id: str, option: str) -> None:
    """Open a dropdown and click the option whose text starts with `option`."""
    field = dropdown_input(page, elem_id)
    field.click()
    page.get_by_role("option", name=re.compile(rf"^{re.escape(option)}")).first.click()
    expect(field).to_have_value(re.compile(rf"^{re.escape(option)}"))


def open_tab(page: Page, name: str) -> None:
    tab = page.get_by_role("tab", name=name, exact=True)
    tab.click()
    expect(tab).to_have_attribute("aria-selected", "true")


def expect_tab_selected(page: Page, name: str) -> None:
    expect(page.get_by_role("tab", name=name, exact=True)).to_have_attribute("aria-selected", "true")


_QUEUE_JOIN = "/gradio_api/queue/join"
_TRACKERS_IDLE = """() => [...document.querySelectorAll('[data-testid=status-tracker]')]
    .every(tracker => tracker.classList.contains('hide'))"""


def _wait_until_settled(page: Page) -> None:
    """After the page's load events were sent, wait until no component shows a pending status any more.

    The UI restores the browser-kept controls in a load event; typing before it lands gets overwritten."""
    expect(textarea(page, "txt2img_prompt")).to_be_visible()
    expect(page).to_have_title("Stable Diffusion")
    page.wait_for_function(_TRACKERS_IDLE, polling=50)


def _is_queue_join(request) -> bool:  # noqa: ANN001 - playwright Request
    return request.method == "POST" and _QUEUE_JOIN in request.url


def open_ui(page: Page, server: WebuiServer) -> Page:
    with page.expect_request(_is_queue_join):
        page.goto(server.url)
    _wait_until_settled(page)
    return page


def reload_ui(page: Page) -> None:
    with page.expect_request(_is_queue_join):
        page.reload()
    _wait_until_settled(page)


def wait_for_images_decoded(page: Page) -> None:
    page.wait_for_function("() => [...document.images].every(img => img.complete)")


def screenshot(page: Page, name: str) -> Path:
    wait_for_images_decoded(page)
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOT_DIR / name
    page.screenshot(path=str(path), full_page=True)
    return path


def set_small_job(page: Page, steps: int, batch_count: int = 1) -> None:
    set_number(page, "txt2img_width", SMALL)
    set_number(page, "txt2img_height", SMALL)
    set_number(page, "txt2img_steps", steps)
    set_number(page, "txt2img_batch_count", batch_count)
    set_number(page, "txt2img_batch_size", 1)


def ensure_checkpoint(page: Page, stem: str) -> str | None:
    """Select `<stem>.safetensors` in the top bar unless it is already selected; after a swap, wait for the load and
    return the status text. The wait accepts any spelling of "Loaded <stem> [...]": the tests about the status line
    check its exact form themselves, so one wrong spelling fails those tests only, and at once."""
    if re.match(rf"{re.escape(stem)}\.safetensors", dropdown_input(page, "ckpt_dropdown").input_value()):
        return None
    choose(page, "ckpt_dropdown", f"{stem}.safetensors")
    return wait_for_text(page, "ckpt_status", rf"Loaded {re.escape(stem)}(?:\.safetensors)? \[", JOB_TIMEOUT_MS).strip()


def generate_and_wait(page: Page, expect_images: int = 1) -> str:
    """Click Generate, wait for "Done" and the images; return the infotext of the selected (first) result."""
    button(page, "txt2img_generate").click()
    wait_for_text(page, "txt2img_progress", r"^Done\b|\bDone:", JOB_TIMEOUT_MS)
    expect(page.locator("#txt2img_gallery img")).to_have_count(expect_images)
    return textarea(page, "txt2img_infotext").input_value()


def image_sizes(page: Page, selector: str) -> list[list[int]]:
    wait_for_images_decoded(page)
    return page.locator(selector).evaluate_all("imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")


def infotext_on_disk(path: Path) -> str | None:
    """The `parameters` text of a PNG, or the EXIF UserComment of a JPEG/WebP, read without the app's code."""
    with Image.open(path) as image:
        if "parameters" in image.info:
            return str(image.info["parameters"])
        exif = image.info.get("exif")
    if not exif:
        return None
    comment = piexif.load(exif).get("Exif", {}).get(piexif.ExifIFD.UserComment)
    return piexif.helper.UserComment.load(comment) if comment else None


def new_images(server: WebuiServer, before: list[Path]) -> list[Path]:
    known = set(before)
    return [path for path in server.output_images() if path not in known]


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def page(new_context: Callable[[], Any], webui: WebuiServer) -> Page:
    return open_ui(new_context().new_page(), webui)


# ---------------------------------------------------------------- tests


def test_generate_shows_the_image_and_its_infotext(page: Page, webui: WebuiServer) -> None:
    ensure_checkpoint(page, "tiny")
    prompt = "a watercolor fox in the snow"
    fill_text(page, "txt2img_prompt", prompt)
    fill_text(page, "txt2img_neg_prompt", "ugly")
    set_small_job(page, steps=4)
    before = webui.output_images()

    infotext = generate_and_wait(page)

    assert infotext.splitlines()[0] == prompt
    assert "Negative prompt: ugly" in infotext
    assert re.search(r"\bSteps: 4,", infotext)
    assert re.search(r"\bModel: tiny(,|$)", infotext), infotext
    assert "Size: 64x64" in infotext
    assert image_sizes(page, "#txt2img_gallery img") == [[SMALL, SMALL]]
    saved = new_images(webui, before)
    assert len(saved) == 1, saved
    with Image.open(saved[0]) as image:
        assert image.size == (SMALL, SMALL)
        assert any(low < high for low, high in image.convert("RGB").getextrema()), "the saved image is one flat colour"
    assert infotext_on_disk(saved[0]) == infotext
    expect(page.locator("#txt2img_preview")).to_be_attached()
    screenshot(page, "txt2img.png")
    # After the job the top bar names the loaded model; the hash is the one written into the infotext.
    status = wait_for_text(page, "ckpt_status", r"Loaded tiny(?:\.safetensors)? \[", timeout_ms=15_000).strip()
    assert re.fullmatch(rf"Loaded tiny \[{HASH10}\]", status), f"top bar status reads {status!r}"
    assert f"Model hash: {status[-11:-1]}" in infotext


def test_ctrl_enter_in_the_prompt_generates(page: Page) -> None:
    fill_text(page, "txt2img_prompt", "a lantern made of paper")
    set_small_job(page, steps=2)
    textarea(page, "txt2img_prompt").press("Control+Enter")
    wait_for_text(page, "txt2img_progress", r"\bDone\b", JOB_TIMEOUT_MS)
    expect(textarea(page, "txt2img_infotext")).to_have_value(re.compile(r"^a lantern made of paper\n"))


def test_seed_and_size_buttons(page: Page) -> None:
    fill_text(page, "txt2img_prompt", "a copper kettle")
    set_small_job(page, steps=2)
    set_number(page, "txt2img_seed", -1)
    infotext = generate_and_wait(page)
    used_seed = re.search(r"\bSeed: (\d+)", infotext).group(1)

    button(page, "txt2img_reuse_seed").click()
    expect(number_box(page, "txt2img_seed")).to_have_value(used_seed)
    button(page, "txt2img_random_seed").click()
    expect(number_box(page, "txt2img_seed")).to_have_value("-1")

    set_number(page, "txt2img_height", 96)
    button(page, "txt2img_swap_size").click()
    expect(number_box(page, "txt2img_width")).to_have_value("96")
    expect(number_box(page, "txt2img_height")).to_have_value(str(SMALL))


def test_interrupt_stops_a_long_run_within_a_step(page: Page, webui: WebuiServer) -> None:
    fill_text(page, "txt2img_prompt", "an endless staircase")
    set_small_job(page, steps=150, batch_count=20)
    before = webui.output_images()

    button(page, "txt2img_generate").click()
    running = wait_for_text(page, "txt2img_progress", r"Batch \d+ of 20 · step \d+/150", JOB_TIMEOUT_MS)
    batch_seen = int(re.search(r"Batch (\d+) of 20", running).group(1))
    button(page, "txt2img_interrupt").click()
    wait_for_text(page, "txt2img_progress", r"Interrupted", JOB_TIMEOUT_MS)
    after_interrupt = new_images(webui, before)
    # Images of the batches that had finished, plus at most the one being sampled when Interrupt was clicked.
    assert len(after_interrupt) <= batch_seen, (batch_seen, after_interrupt)
    assert len(after_interrupt) < 20

    # Nothing of the interrupted job lands later: the next job (one image) is the only new file.
    fill_text(page, "txt2img_prompt", "a short run after the interrupt")
    set_small_job(page, steps=2, batch_count=1)
    infotext = generate_and_wait(page)
    assert infotext.startswith("a short run after the interrupt\n")
    later = new_images(webui, before)
    assert len(later) == len(after_interrupt) + 1, later
    assert infotext_on_disk(sorted(set(later) - set(after_interrupt))[0]).startswith("a short run after the interrupt\n")


def test_gallery_image_sent_to_txt2img_fills_every_control(
    page: Page, webui: WebuiServer, engine_images: EngineImages
) -> None:
    open_tab(page, "Gallery")
    fill_text(page, "gallery_search", "lighthouse")
    textarea(page, "gallery_search").press("Enter")
    button(page, "gallery_refresh").click()
    wait_for_text(page, "gallery_page_info", r"Page 1 of 1 · 1 images?\b")
    expect(page.locator("#gallery_gallery img")).to_have_count(1)
    page.locator("#gallery_gallery img").first.click()
    expect(textarea(page, "gallery_infotext")).to_have_value(re.compile(rf"^{re.escape(engine_images.gallery_prompt)}\n"))
    expect(textarea(page, "gallery_infotext")).to_have_value(re.compile(r"Model: tiny(,|$)"))
    screenshot(page, "gallery.png")

    button(page, "gallery_send_to_txt2img").click()

    expect_tab_selected(page, "txt2img")
    expect(textarea(page, "txt2img_prompt")).to_have_value(engine_images.gallery_prompt)
    expect(textarea(page, "txt2img_neg_prompt")).to_have_value(engine_images.negative_prompt)
    expect(number_box(page, "txt2img_steps")).to_have_value(engine_images.settings["steps"])
    expect(dropdown_input(page, "txt2img_sampling")).to_have_value(engine_images.settings["sampler"])
    expect(dropdown_input(page, "txt2img_scheduler")).to_have_value(engine_images.settings["scheduler"])
    expect(number_box(page, "txt2img_cfg_scale")).to_have_value(engine_images.settings["cfg_scale"])
    expect(number_box(page, "txt2img_seed")).to_have_value(engine_images.settings["seed"])
    expect(number_box(page, "txt2img_width")).to_have_value(engine_images.settings["width"])
    expect(number_box(page, "txt2img_height")).to_have_value(engine_images.settings["height"])
    expect(number_box(page, "clip_skip")).to_have_value(engine_images.settings["clip_skip"])
    set_number(page, "clip_skip", 1)


def test_gallery_delete_asks_first_then_removes_the_file(page: Page, webui: WebuiServer) -> None:
    fill_text(page, "txt2img_prompt", "a doomed porcelain teacup")
    set_small_job(page, steps=2)
    before = webui.output_images()
    generate_and_wait(page)
    (made,) = new_images(webui, before)

    open_tab(page, "Gallery")
    fill_text(page, "gallery_search", "porcelain teacup")
    textarea(page, "gallery_search").press("Enter")
    button(page, "gallery_refresh").click()
    wait_for_text(page, "gallery_page_info", r"Page 1 of 1 · 1 images?\b")
    page.locator("#gallery_gallery img").first.click()
    expect(textarea(page, "gallery_infotext")).to_have_value(re.compile(r"^a doomed porcelain teacup\n"))

    button(page, "gallery_delete").click()
    button(page, "gallery_delete_cancel").click()
    assert made.exists(), "Cancel deleted the file"
    expect(page.locator("#gallery_gallery img")).to_have_count(1)

    button(page, "gallery_delete").click()
    button(page, "gallery_delete_confirm").click()
    wait_for_text(page, "gallery_page_info", r"\b0 images\b")
    expect(page.locator("#gallery_gallery img")).to_have_count(0)
    assert not made.exists(), f"{made} is still on disk"


def test_png_info_round_trip_with_an_engine_jpeg(page: Page, engine_images: EngineImages) -> None:
    jpeg = engine_images.jpeg
    written = infotext_on_disk(jpeg)
    assert written and written.startswith(engine_images.jpeg_prompt)
    open_tab(page, "PNG Info")

    page.locator("#pnginfo_image input[type=file]").set_input_files(str(jpeg))

    shown = textarea(page, "pnginfo_infotext")
    expect(shown).to_have_value(written)
    assert "Steps: 7, Sampler: DDIM, Schedule type: Karras, CFG scale: 5.5, Seed: 1234, Size: 96x64" in written
    screenshot(page, "pnginfo.png")

    button(page, "pnginfo_send_to_txt2img").click()

    expect_tab_selected(page, "txt2img")
    expect(textarea(page, "txt2img_prompt")).to_have_value(engine_images.jpeg_prompt)
    expect(textarea(page, "txt2img_neg_prompt")).to_have_value(engine_images.negative_prompt)
    expect(number_box(page, "txt2img_steps")).to_have_value("7")
    expect(dropdown_input(page, "txt2img_sampling")).to_have_value("DDIM")
    expect(number_box(page, "txt2img_seed")).to_have_value("1234")
    expect(number_box(page, "txt2img_width")).to_have_value("96")
    set_number(page, "clip_skip", 1)


def test_checkpoint_swap_from_the_dropdown(page: Page) -> None:
    ensure_checkpoint(page, "tiny")
    fill_text(page, "txt2img_prompt", "a brass telescope")
    set_small_job(page, steps=2)
    try:
        status_b = ensure_checkpoint(page, "tiny_b")
        infotext = generate_and_wait(page)
        assert re.search(r"\bModel: tiny_b(,|$)", infotext), infotext
        hash_b = re.search(rf"\[({HASH10})\]", status_b).group(1)
        assert f"Model hash: {hash_b}" in infotext
    finally:
        ensure_checkpoint(page, "tiny")
    fill_text(page, "txt2img_prompt", "a brass telescope, again")
    button(page, "txt2img_generate").click()
    expect(textarea(page, "txt2img_infotext")).to_have_value(re.compile(r"^a brass telescope, again\n"),
                                                              timeout=JOB_TIMEOUT_MS)
    expect(textarea(page, "txt2img_infotext")).to_have_value(re.compile(r"\bModel: tiny(,|$)"))
    assert re.fullmatch(rf"Loaded tiny_b \[{HASH10}\]", status_b), f"top bar status read {status_b!r} after the swap"


def test_prompt_and_controls_survive_a_page_refresh(page: Page) -> None:
    fill_text(page, "txt2img_prompt", "a lighthouse keeper's cat")
    fill_text(page, "txt2img_neg_prompt", "text, watermark")
    _wait_until_settled(page)
    # The controls are kept in the browser's localStorage by an event after each change: wait until the
    # stored value changes after the last edit, so the reload cannot race the save.
    stored_before = page.evaluate("key => localStorage.getItem(key)", BROWSER_STATE_KEY)
    set_number(page, "txt2img_steps", 13)
    page.wait_for_function(
        "([key, before]) => localStorage.getItem(key) !== before", arg=[BROWSER_STATE_KEY, stored_before]
    )
    _wait_until_settled(page)

    reload_ui(page)

    expect(textarea(page, "txt2img_prompt")).to_have_value("a lighthouse keeper's cat")
    expect(textarea(page, "txt2img_neg_prompt")).to_have_value("text, watermark")
    expect(number_box(page, "txt2img_steps")).to_have_value("13")


def test_two_browsers_generating_at_once_each_get_their_own_images(
    new_context: Callable[[], Any], webui: WebuiServer
) -> None:
    pages = [open_ui(new_context().new_page(), webui) for _ in range(2)]
    prompts = ["first visitor: a yellow submarine", "second visitor: a purple umbrella"]
    for page, prompt in zip(pages, prompts, strict=True):
        fill_text(page, "txt2img_prompt", prompt)
        set_small_job(page, steps=8, batch_count=2)
    for page in pages:
        button(page, "txt2img_generate").click()
    for page in pages:
        wait_for_text(page, "txt2img_progress", r"\bDone\b", JOB_TIMEOUT_MS)
    for page, prompt, other in zip(pages, prompts, reversed(prompts), strict=True):
        expect(page.locator("#txt2img_gallery img")).to_have_count(2)
        infotext = textarea(page, "txt2img_infotext").input_value()
        assert infotext.startswith(prompt + "\n"), infotext
        assert other not in infotext
    sources = [set(p.locator("#txt2img_gallery img").evaluate_all("imgs => imgs.map(i => i.src)")) for p in pages]
    assert not sources[0] & sources[1], "both visitors were shown the same image files"


def test_token_counters_count_clip_tokens(page: Page) -> None:
    fill_text(page, "txt2img_prompt", " ".join(["cat"] * 80))
    wait_for_text(page, "txt2img_token_counter", r"\b80/150\b")
    fill_text(page, "txt2img_neg_prompt", "a photo of a dog")
    wait_for_text(page, "txt2img_neg_token_counter", r"\b5/75\b")


def test_a_prompt_beyond_the_chunk_limit_is_refused_with_the_limit(page: Page, webui: WebuiServer) -> None:
    before = webui.output_images()
    fill_text(page, "txt2img_prompt", "cat, " * 3000)  # 6,000 tokens, more than 32 chunks of 75
    set_small_job(page, steps=2)
    button(page, "txt2img_generate").click()
    shown = wait_for_text(page, "txt2img_progress", r"Error: prompt: must be at most 32 chunks of 75 tokens")
    assert "Settings tab" in shown
    assert new_images(webui, before) == []


def test_settings_change_the_saved_file_format(page: Page, webui: WebuiServer) -> None:
    open_tab(page, "Settings")
    for elem_id in ("settings_outdir", "settings_format", "settings_filename_pattern", "settings_preview_every"):
        expect(page.locator(f"#{elem_id}")).to_be_visible()
    choose(page, "settings_format", "jpg")
    button(page, "settings_apply").click()
    wait_for_text(page, "settings_result", r"Saved\.")
    screenshot(page, "settings.png")
    try:
        reload_ui(page)
        open_tab(page, "Settings")
        expect(dropdown_input(page, "settings_format")).to_have_value("jpg")

        open_tab(page, "txt2img")
        fill_text(page, "txt2img_prompt", "a paper boat on a puddle")
        set_small_job(page, steps=2)
        before = webui.output_images()
        infotext = generate_and_wait(page)
        saved = new_images(webui, before)
        assert [path.suffix for path in saved] == [".jpg"], saved
        assert infotext_on_disk(saved[0]) == infotext
    finally:
        reload_ui(page)
        open_tab(page, "Settings")
        choose(page, "settings_format", "png")
        button(page, "settings_apply").click()
        wait_for_text(page, "settings_result", r"Saved\.")


def test_vae_dropdown_lists_vae_files_and_the_choice_reaches_the_image(page: Page, webui: WebuiServer) -> None:
    from tests.fixtures.vae_files import build_tiny_vae_file

    vae_file = build_tiny_vae_file(webui.data_dir / "models" / "VAE" / "tiny-ft.safetensors", seed=7)
    ensure_checkpoint(page, "tiny")
    fill_text(page, "txt2img_prompt", "a paper boat")
    set_small_job(page, steps=2)
    try:
        button(page, "ckpt_refresh").click()
        choose(page, "vae_dropdown", "tiny-ft.safetensors")
        wait_for_text(page, "ckpt_status", r"VAE tiny-ft\.safetensors is used from the next generation on", JOB_TIMEOUT_MS)
        infotext = generate_and_wait(page)
        assert re.search(r"\bVAE: tiny-ft\.safetensors(,|$)", infotext), infotext
        # The choice is remembered (A1111's sd_vae) for pages opened later.
        reload_ui(page)
        expect(dropdown_input(page, "vae_dropdown")).to_have_value("tiny-ft.safetensors")
    finally:
        choose(page, "vae_dropdown", "Automatic")
        wait_for_text(page, "ckpt_status", r"VAE Automatic is used", JOB_TIMEOUT_MS)
        vae_file.unlink()
    assert "VAE:" not in generate_and_wait(page)
