"""The default-model offer in a real browser: a server with an empty model folder downloads a tiny checkpoint from a
real HTTP server on 127.0.0.1 (standing in for Hugging Face and its CDN redirect), then loads it.
Must not import webui: what is asserted is what a user sees and the files on disk."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from playwright.sync_api import expect

from tests.fixtures.range_http_server import RangeFileServer, ServedFiles
from tests.ui.test_browser import HASH10, JOB_TIMEOUT_MS, button, dropdown_input, open_ui, text_of, wait_for_text

if TYPE_CHECKING:
    from tests.ui.conftest import WebuiServer


def test_download_offer_fetches_verifies_and_loads_the_model(
    start_webui: Callable[..., WebuiServer], tiny_model_dir: Path, new_context: Callable[[], Any]
) -> None:
    checkpoint = (tiny_model_dir / "tiny.safetensors").read_bytes()
    served = ServedFiles(files={"/cdn/tiny.safetensors": checkpoint},
                         redirects={"/resolve/main/tiny.safetensors": "/cdn/tiny.safetensors"})
    with RangeFileServer(served) as files:
        server = start_webui("download-offer", None, [
            "--default-model-url", files.url("/resolve/main/tiny.safetensors"),
            "--default-model-sha256", hashlib.sha256(checkpoint).hexdigest(),
        ])
        folder = server.data_dir / "models" / "Stable-diffusion"
        # Tiny checkpoints need their diffusers config folder beside them to load (a real SD 1.5 file does not);
        # it is not a checkpoint, so the folder still counts as empty and the offer is shown.
        shutil.copytree(tiny_model_dir / "tiny.config", folder / "tiny.config")
        assert "To download tiny.safetensors: python -m webui download-model" in server.stdout_path.read_text()

        page = open_ui(new_context().new_page(), server)
        start = button(page, "model_download_start")
        expect(start).to_be_visible()
        expect(start).to_have_text("Download tiny.safetensors")
        assert "No checkpoint yet" in (text_of(page, "model_download_note") or "")

        # First attempt: the server sends a quarter of the file and stalls, so the page shows that part,
        # the user presses Cancel, and only then does the server go on.
        quarter = len(checkpoint) // 4
        served.stall_after_bytes = quarter
        start.click()
        wait_for_text(page, "model_download_progress", r"^Downloading tiny\.safetensors: 25% \(", JOB_TIMEOUT_MS)
        button(page, "model_download_cancel").click()
        wait_for_text(page, "model_download_progress", r"^Cancelling at", JOB_TIMEOUT_MS)
        served.release.set()
        wait_for_text(page, "model_download_progress", r"^Cancelled at .*; Download resumes from there", JOB_TIMEOUT_MS)
        part = folder / "tiny.safetensors.part"
        kept = part.stat().st_size
        assert quarter <= kept < len(checkpoint)
        assert not (folder / "tiny.safetensors").exists()
        expect(button(page, "model_download_cancel")).to_be_hidden()

        # Second attempt resumes from the kept bytes.
        start.click()
        wait_for_text(page, "model_download_progress", r"^Done: tiny\.safetensors downloaded and verified",
                      JOB_TIMEOUT_MS)
        expect(page.locator("#model_download_progress .webui-progress-bar")).to_have_attribute(
            "style", re.compile(r"width:\s*100(\.0)?%"))
        expect(dropdown_input(page, "ckpt_dropdown")).to_have_value("tiny.safetensors")
        status = wait_for_text(page, "ckpt_status", r"Loaded tiny \[", JOB_TIMEOUT_MS).strip()
        assert re.fullmatch(rf"Loaded tiny \[{HASH10}\]", status), status
        assert status == f"Loaded tiny [{hashlib.sha256(checkpoint).hexdigest()[:10]}]"

        assert sorted(p.name for p in folder.iterdir()) == ["tiny.config", "tiny.safetensors"]
        assert (folder / "tiny.safetensors").read_bytes() == checkpoint
        assert [(seen.path, seen.range, seen.status) for seen in files.seen()] == [
            ("/resolve/main/tiny.safetensors", None, 302), ("/cdn/tiny.safetensors", None, 200),
            ("/resolve/main/tiny.safetensors", f"bytes={kept}-", 302), ("/cdn/tiny.safetensors", f"bytes={kept}-", 206)]

        # A new page now has a checkpoint: no offer any more.
        second = open_ui(new_context().new_page(), server)
        expect(dropdown_input(second, "ckpt_dropdown")).to_have_value("tiny.safetensors")
        expect(button(second, "model_download_start")).to_be_hidden()
        expect(second.locator("#model_download_note")).to_be_hidden()
