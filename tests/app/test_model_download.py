"""Downloading a checkpoint from a real HTTP server on 127.0.0.1: resume, restart, redirects, sha256, disk space, cancel.
Free disk space is the one simulated part (an injected function): a full disk cannot be made safely on a shared machine."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from tests.fixtures.range_http_server import RangeFileServer, ServedFiles
from webui.app.model_download import (
    FREE_SPACE_MARGIN_BYTES,
    BackgroundDownload,
    ChecksumMismatchError,
    DownloadCancelledError,
    DownloadError,
    DownloadState,
    NotEnoughDiskSpaceError,
    TextProgressBar,
    download_model,
    download_spec,
)
from webui.core.params import ParamError

NAME = "model.safetensors"
SMALL_CHUNK = 16 * 1024


@pytest.fixture(scope="module")
def checkpoint_bytes() -> bytes:
    """A real (random-weight) safetensors file of about 400 KB."""
    rng = np.random.default_rng(0)
    tensors = {"model.diffusion_model.weight": rng.standard_normal((320, 320), dtype=np.float32)}
    return save_safetensors(tensors, metadata={"format": "pt"})


@pytest.fixture()
def served(checkpoint_bytes: bytes) -> ServedFiles:
    return ServedFiles(files={f"/files/{NAME}": checkpoint_bytes},
                       redirects={f"/resolve/{NAME}": f"/files/{NAME}"})


@pytest.fixture()
def server(served: ServedFiles) -> Iterator[RangeFileServer]:
    with RangeFileServer(served) as running:
        yield running


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def plenty_of_space(folder: Path) -> int:
    return 10**12


def test_download_follows_the_redirect_and_leaves_only_the_verified_file(
    server: RangeFileServer, checkpoint_bytes: bytes, tmp_path: Path
) -> None:
    folder = tmp_path / "models" / "Stable-diffusion"
    seen_progress: list[tuple[int, int | None]] = []
    spec = download_spec(server.url(f"/resolve/{NAME}"), sha256(checkpoint_bytes))
    path = download_model(spec, folder, progress=lambda done, total: seen_progress.append((done, total)),
                          free_bytes=plenty_of_space, chunk_bytes=SMALL_CHUNK)
    assert path == folder / NAME
    assert sorted(p.name for p in folder.iterdir()) == [NAME]
    assert path.read_bytes() == checkpoint_bytes
    assert set(load_safetensors(path.read_bytes())) == {"model.diffusion_model.weight"}
    assert [(s.path, s.status) for s in server.seen()] == [(f"/resolve/{NAME}", 302), (f"/files/{NAME}", 200)]
    assert seen_progress[0] == (0, len(checkpoint_bytes))
    assert seen_progress[-1] == (len(checkpoint_bytes), len(checkpoint_bytes))


def test_an_interrupted_transfer_keeps_the_part_and_the_next_attempt_resumes_it(
    server: RangeFileServer, served: ServedFiles, checkpoint_bytes: bytes, tmp_path: Path
) -> None:
    cut = 100_003
    served.drop_after_bytes = cut
    spec = download_spec(server.url(f"/resolve/{NAME}"), sha256(checkpoint_bytes))
    with pytest.raises(DownloadError, match=f"closed after {cut} of {len(checkpoint_bytes)} bytes"):
        download_model(spec, tmp_path, free_bytes=plenty_of_space)
    part = tmp_path / f"{NAME}.part"
    assert part.read_bytes() == checkpoint_bytes[:cut]
    assert not (tmp_path / NAME).exists()

    path = download_model(spec, tmp_path, free_bytes=plenty_of_space)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256(checkpoint_bytes)
    assert not part.exists()
    # The Range header survived the redirect to the "CDN" path, which answered with the rest only.
    resumed = [s for s in server.seen() if s.path == f"/files/{NAME}"][-1]
    assert (resumed.range, resumed.status) == (f"bytes={cut}-", 206)


def test_a_server_that_ignores_range_restarts_from_the_first_byte(
    server: RangeFileServer, served: ServedFiles, checkpoint_bytes: bytes, tmp_path: Path
) -> None:
    served.ignore_range = True
    # A leftover .part whose bytes are wrong: had they been kept, the sha256 check would fail.
    (tmp_path / f"{NAME}.part").write_bytes(b"\xff" * 5000)
    spec = download_spec(server.url(f"/files/{NAME}"), sha256(checkpoint_bytes))
    path = download_model(spec, tmp_path, free_bytes=plenty_of_space)
    assert path.read_bytes() == checkpoint_bytes
    assert [(s.range, s.status) for s in server.seen()] == [("bytes=5000-", 200)]


def test_a_wrong_sha256_leaves_nothing_in_the_model_folder(
    server: RangeFileServer, checkpoint_bytes: bytes, tmp_path: Path
) -> None:
    wrong = "0" * 64
    spec = download_spec(server.url(f"/files/{NAME}"), wrong)
    with pytest.raises(ChecksumMismatchError) as raised:
        download_model(spec, tmp_path, free_bytes=plenty_of_space)
    assert f"expected {wrong}, got {sha256(checkpoint_bytes)}" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_space_is_refused_before_any_byte_is_written(
    server: RangeFileServer, checkpoint_bytes: bytes, tmp_path: Path
) -> None:
    spec = download_spec(server.url(f"/files/{NAME}"), sha256(checkpoint_bytes))
    needed = len(checkpoint_bytes) + FREE_SPACE_MARGIN_BYTES
    with pytest.raises(NotEnoughDiskSpaceError) as raised:
        download_model(spec, tmp_path, free_bytes=lambda folder: needed - 1)
    assert f"needs {needed} bytes" in str(raised.value)
    assert f"only {needed - 1} bytes" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_the_space_check_counts_only_what_the_part_file_still_lacks(
    server: RangeFileServer, checkpoint_bytes: bytes, tmp_path: Path
) -> None:
    have = 300_000
    (tmp_path / f"{NAME}.part").write_bytes(checkpoint_bytes[:have])
    spec = download_spec(server.url(f"/files/{NAME}"), sha256(checkpoint_bytes))
    needed = len(checkpoint_bytes) - have + FREE_SPACE_MARGIN_BYTES
    with pytest.raises(NotEnoughDiskSpaceError, match=f"needs {needed} bytes"):
        download_model(spec, tmp_path, free_bytes=lambda folder: needed - 1)
    assert (tmp_path / f"{NAME}.part").stat().st_size == have
    path = download_model(spec, tmp_path, free_bytes=lambda folder: needed)
    assert path.read_bytes() == checkpoint_bytes


def test_cancel_keeps_the_part_for_a_later_resume(
    server: RangeFileServer, checkpoint_bytes: bytes, tmp_path: Path
) -> None:
    cancel = threading.Event()
    cancelled_at: list[int] = []

    def cancel_after_two_chunks(done: int, total: int | None) -> None:
        if done >= 2 * SMALL_CHUNK and not cancel.is_set():
            cancelled_at.append(done)
            cancel.set()

    spec = download_spec(server.url(f"/files/{NAME}"), sha256(checkpoint_bytes))
    with pytest.raises(DownloadCancelledError):
        download_model(spec, tmp_path, progress=cancel_after_two_chunks, cancel=cancel,
                       free_bytes=plenty_of_space, chunk_bytes=SMALL_CHUNK)
    kept = (tmp_path / f"{NAME}.part").read_bytes()
    assert kept == checkpoint_bytes[: cancelled_at[0]]
    assert not (tmp_path / NAME).exists()
    assert download_model(spec, tmp_path, free_bytes=plenty_of_space).read_bytes() == checkpoint_bytes
    assert server.seen()[-1].range == f"bytes={len(kept)}-"


def test_a_whole_part_left_by_a_crash_before_the_rename_is_verified_not_fetched_again(
    server: RangeFileServer, checkpoint_bytes: bytes, tmp_path: Path
) -> None:
    (tmp_path / f"{NAME}.part").write_bytes(checkpoint_bytes)
    spec = download_spec(server.url(f"/files/{NAME}"), sha256(checkpoint_bytes))
    assert download_model(spec, tmp_path, free_bytes=plenty_of_space).read_bytes() == checkpoint_bytes
    assert [s.status for s in server.seen()] == [416]


def test_an_existing_file_is_never_overwritten(server: RangeFileServer, checkpoint_bytes: bytes, tmp_path: Path) -> None:
    (tmp_path / NAME).write_bytes(b"the user's own file")
    spec = download_spec(server.url(f"/files/{NAME}"), sha256(checkpoint_bytes))
    with pytest.raises(DownloadError, match="already exists"):
        download_model(spec, tmp_path, free_bytes=plenty_of_space)
    assert (tmp_path / NAME).read_bytes() == b"the user's own file"
    assert server.seen() == []


def test_a_redirect_to_another_scheme_is_refused(server: RangeFileServer, served: ServedFiles, tmp_path: Path) -> None:
    served.redirects["/elsewhere.safetensors"] = "ftp://127.0.0.1/model.safetensors"
    spec = download_spec(server.url("/elsewhere.safetensors"), "a" * 64)
    with pytest.raises(DownloadError, match="refusing a redirect .* to ftp://127.0.0.1/model.safetensors"):
        download_model(spec, tmp_path, free_bytes=plenty_of_space)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_file_is_a_clear_error(server: RangeFileServer, tmp_path: Path) -> None:
    spec = download_spec(server.url("/files/other.safetensors"), "a" * 64)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_model(spec, tmp_path, free_bytes=plenty_of_space)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url, sha, field, reason",
    [
        ("http://127.0.0.1:9/model.ckpt", "a" * 64, "url", "plain *.safetensors file name"),
        ("http://127.0.0.1:9/a/..%2F..%2Fevil.safetensors", "a" * 64, "url", "plain *.safetensors file name"),
        ("http://127.0.0.1:9/.safetensors", "a" * 64, "url", "plain *.safetensors file name"),
        ("file:///etc/model.safetensors", "a" * 64, "url", "http:// or https://"),
        ("http://127.0.0.1:9/model.safetensors", "abc", "sha256", "64 hexadecimal characters"),
    ],
)
def test_unusable_urls_and_hashes_name_the_field(url: str, sha: str, field: str, reason: str) -> None:
    with pytest.raises(ParamError) as raised:
        download_spec(url, sha)
    assert raised.value.field == field
    assert reason in raised.value.reason


def test_the_file_name_comes_from_the_url_path_without_the_query() -> None:
    spec = download_spec("https://example.invalid/x/v1-5-pruned-emaonly.safetensors?download=true", "A" * 64)
    assert (spec.file_name, spec.sha256) == ("v1-5-pruned-emaonly.safetensors", "a" * 64)


def test_background_download_reports_progress_and_hands_over_the_file(
    server: RangeFileServer, checkpoint_bytes: bytes, tmp_path: Path
) -> None:
    handed_over: list[Path] = []
    spec = download_spec(server.url(f"/resolve/{NAME}"), sha256(checkpoint_bytes))
    download = BackgroundDownload(spec, tmp_path, on_done=handed_over.append, free_bytes=plenty_of_space)
    assert download.status().state == DownloadState.IDLE
    assert download.start()
    final = download.wait(timeout_s=120)
    assert final.state == DownloadState.DONE, final.error
    assert (final.done_bytes, final.total_bytes, final.fraction) == (len(checkpoint_bytes), len(checkpoint_bytes), 1.0)
    assert handed_over == [tmp_path / NAME]
    assert (tmp_path / NAME).read_bytes() == checkpoint_bytes


def test_background_download_failure_is_reported_not_raised(server: RangeFileServer, tmp_path: Path) -> None:
    spec = download_spec(server.url(f"/files/{NAME}"), "0" * 64)
    handed_over: list[Path] = []
    download = BackgroundDownload(spec, tmp_path, on_done=handed_over.append, free_bytes=plenty_of_space)
    download.start()
    final = download.wait(timeout_s=120)
    assert final.state == DownloadState.FAILED
    assert "sha256 mismatch" in final.error
    assert handed_over == []
    assert list(tmp_path.iterdir()) == []


def test_text_progress_bar_in_a_log_writes_one_line_per_tenth() -> None:
    stream = io.StringIO()
    bar = TextProgressBar(stream)
    for done in range(0, 1001, 5):
        bar(done, 1000)
    bar.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11
    assert lines[0].startswith("[------------------------------]   0%")
    assert lines[-1] == "[##############################] 100%  1.0 kB / 1.0 kB"
