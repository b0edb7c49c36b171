"""Benchmark: the Lora cards tab with hundreds of files. Writes N LoRA files (kohya metadata, a preview picture and a
`<name>.json` sidecar each, in subfolders) into a temporary data folder, starts `python -m webui` on it, and measures
in headless Chromium the time to render the Lora tab and to filter it by search; prints a table. Never a test.
Must not import webui (the server is driven from outside, as a user's browser does)."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.startup import dead_proxy, free_port, quiet_env  # noqa: E402  (one quiet server environment for benches)
from tests.fixtures.network_files import SDXL_METADATA, write_lora, write_preview, write_sidecar  # noqa: E402

READY_TIMEOUT_S = 300.0
WAIT_MS = 120_000
CHROMIUM = "/usr/bin/chromium"
FOLDERS = ("characters", "characters/anime", "styles", "styles/painting", "concepts", "clothing", "poses",
           "backgrounds", "", "")
REOPENS = 5
SEARCHES = 5
WORDS = ("style", "detail", "anime", "portrait", "light", "fabric", "pose", "forest", "city", "ink")


def write_files(lora_dir: Path, count: int) -> None:
    """`count` LoRA files as a Civitai downloader leaves them: preview, sidecar, training metadata; 1 in 10 SDXL."""
    for index in range(count):
        folder = FOLDERS[index % len(FOLDERS)]
        word = WORDS[index % len(WORDS)]
        name = f"lora_{index:04d}_{word}"
        metadata: dict[str, object] = {
            "ss_output_name": name, "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
            "ss_resolution": "(512, 512)", "ss_tag_frequency": {"img/10_x": {word: 10 + index % 7, "1girl": 3}},
        }
        if index % 10 == 9:
            metadata.update(SDXL_METADATA)
        path = write_lora(lora_dir / folder / f"{name}.safetensors", metadata, seed=index, width=16)
        write_preview(path.with_name(f"{name}.preview.png"), color=(index * 37 % 256, index * 91 % 256, 128),
                      size=128)
        write_sidecar(path, {"activation text": f"{word} trigger {index}", "preferred weight": 0.8,
                             "description": f"Card number {index} ({word})"})


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"webui exited with {process.returncode}")
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise SystemExit(f"webui did not answer at {url}")


# In the page: type into the search box as a user does (gradio's change event runs the filter in the page), then
# wait for the count line to show the expected number and for two frames (the browser has laid the grid out).
SEARCH_JS = """async ([query, expected]) => {
  const box = document.querySelector('#lora_search input, #lora_search textarea');
  const count = document.querySelector('#lora_cards .en-count');
  const start = performance.now();
  box.value = query;
  box.dispatchEvent(new Event('input', { bubbles: true }));
  await new Promise((resolve) => {
    const check = () => (count.textContent.startsWith(expected + ' of') ? resolve() : requestAnimationFrame(check));
    check();
  });
  await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
  return performance.now() - start;
}"""
# The filter alone (JS work over every card, no gradio event, no layout).
APPLY_JS = """([query]) => {
  window.webuiExtraNetworks.state.lora = { query, sort: 'Name', folder: 'All' };
  const start = performance.now();
  window.webuiExtraNetworks.apply('lora');
  return performance.now() - start;
}"""
VISIBLE_PREVIEWS_DECODED = """() => {
  const grid = document.querySelector('#lora_cards .en-grid');
  if (!grid) return false;
  const box = grid.getBoundingClientRect();
  const shown = [...grid.querySelectorAll('img')].filter((img) => {
    const r = img.getBoundingClientRect();
    return r.bottom > box.top && r.top < box.bottom && r.top < window.innerHeight;
  });
  return shown.length > 0 && shown.every((img) => img.complete && img.naturalWidth > 0);
}"""


def expected_matches(count: int, query: str) -> int:
    words = query.lower().split()
    matches = 0
    for index in range(count):
        word = WORDS[index % len(WORDS)]
        folder = FOLDERS[index % len(FOLDERS)]
        name = f"lora_{index:04d}_{word}"
        text = " ".join([name, name, folder, f"{word} trigger {index}", f"Card number {index} ({word})"]).lower()
        matches += all(part in text for part in words)
    return matches


def measure(count: int, root: Path) -> dict[str, object]:
    from playwright.sync_api import sync_playwright

    data_dir = root / f"data-{count}"
    (data_dir / "models" / "Stable-diffusion").mkdir(parents=True)
    started = time.perf_counter()
    write_files(data_dir / "models" / "Lora", count)
    written_s = time.perf_counter() - started
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = (root / f"server-{count}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "webui", "--data-dir", str(data_dir), "--port", str(port), "--no-download-sd-model"],
        cwd=root, env=quiet_env(root / f"env-{count}"), stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_ready(url, process)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox", f"--proxy-server={dead_proxy()}"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(WAIT_MS)
            page.goto(url)
            page.wait_for_selector("#txt2img_prompt textarea")
            page.wait_for_function("() => [...document.querySelectorAll('[data-testid=status-tracker]')]"
                                   ".every(t => t.classList.contains('hide'))")
            page.locator("#txt2img_extra_networks").get_by_text("Extra networks", exact=False).first.click()
            page.locator("#txt2img_extra_tabs").get_by_role("tab", name="Checkpoints", exact=True).wait_for()
            # The panel at the top of the window, so the first rows of previews are on screen (they load lazily).
            page.locator("#txt2img_extra_networks").evaluate("e => e.scrollIntoView({ block: 'start' })")
            lora_tab = page.locator("#txt2img_extra_tabs").get_by_role("tab", name="Lora", exact=True)
            other_tab = page.locator("#txt2img_extra_tabs").get_by_role("tab", name="Styles", exact=True)
            rendered = f"() => document.querySelectorAll('#lora_cards .en-card').length === {count}"

            opens: list[float] = []
            previews: list[float] = []
            first_card = data_dir / "models" / "Lora" / FOLDERS[0] / f"lora_0000_{WORDS[0]}.safetensors"
            for attempt in range(1 + REOPENS):
                ready = rendered
                if attempt:
                    other_tab.click()
                    # Each re-open must render anew (an unchanged HTML block is not re-rendered by the page at all):
                    # one sidecar changes, and the wait is for that card's new text.
                    write_sidecar(first_card, {"activation text": "style trigger 0", "preferred weight": 0.8,
                                               "description": f"revision {attempt}"})
                    ready = ("() => { const t = document.querySelector('#lora_cards .en-card .en-text');"
                             f" return !!t && [...document.querySelectorAll('#lora_cards .en-text')]"
                             f".some(e => e.textContent === 'revision {attempt}'); }}")
                start = time.perf_counter()
                lora_tab.click()
                page.wait_for_function(ready, polling="raf")
                page.wait_for_function("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame("
                                       "() => r(true))))")
                opens.append(time.perf_counter() - start)
                page.wait_for_function(VISIBLE_PREVIEWS_DECODED, polling="raf")
                previews.append(time.perf_counter() - start)
                assert page.locator("#lora_cards .en-card").count() == count
            html_bytes = page.evaluate("() => document.querySelector('#lora_cards').innerHTML.length")

            searches: dict[str, list[float]] = {}
            applies: dict[str, list[float]] = {}
            for query in ("lora_0042", "anime", "trigger 1", ""):
                expected = expected_matches(count, query)
                for _ in range(SEARCHES):
                    page.evaluate(SEARCH_JS, ["zz-nothing", 0])
                    searches.setdefault(query, []).append(page.evaluate(SEARCH_JS, [query, expected]) / 1000)
                    applies.setdefault(query, []).append(page.evaluate(APPLY_JS, [query]) / 1000)
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    return {"count": count, "written_s": written_s, "first_open_s": opens[0],
            "reopen_s": statistics.median(opens[1:]), "first_previews_s": previews[0],
            "reopen_previews_s": statistics.median(previews[1:]), "html_kib": html_bytes / 1024,
            "searches": {query: statistics.median(times) for query, times in searches.items()},
            "applies": {query: statistics.median(times) for query, times in applies.items()},
            "matches": {query: expected_matches(count, query) for query in searches}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="500", help="comma-separated card counts (default 500)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-cards-") as temp:
        for count in (int(part) for part in args.counts.split(",")):
            results.append(measure(count, Path(temp)))
    print(f"\nLora tab, headless Chromium, {os.cpu_count()} CPUs; medians of {REOPENS} re-opens / {SEARCHES} searches")
    print("| cards | HTML | first open | re-open | visible previews decoded (first / re-open) |")
    print("|---:|---:|---:|---:|---:|")
    for result in results:
        print(f"| {result['count']} | {result['html_kib']:.0f} KiB | {result['first_open_s'] * 1000:.0f} ms "
              f"| {result['reopen_s'] * 1000:.0f} ms | {result['first_previews_s'] * 1000:.0f} / "
              f"{result['reopen_previews_s'] * 1000:.0f} ms |")
    print("\n| cards | search | matches | typed → grid filtered and laid out | filter function alone |")
    print("|---:|---|---:|---:|---:|")
    for result in results:
        for query, seconds in result["searches"].items():
            print(f"| {result['count']} | {query!r} | {result['matches'][query]} | {seconds * 1000:.1f} ms "
                  f"| {result['applies'][query] * 1000:.2f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
