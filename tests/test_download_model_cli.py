"""`python -m webui download-model` and the start-up offer, run as a user runs them, against a real HTTP server on 127.0.0.1.
Checks exit codes, what is printed (path on stdout, progress and errors on stderr) and the files in the model folder."""

from __future__ import annotations

import hashlib
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from tests.fixtures.range_http_server import RangeFileServer, ServedFiles

ROOT = Path(__file__).resolve().parent.parent
NAME = "downloaded.safetensors"
# Hang guard for a slow shared machine, never a timing check.
PROCESS_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def checkpoint_bytes() -> bytes:
    rng = np.random.default_rng(1)
    return save_safetensors({"weight": rng.standard_normal((256, 256), dtype=np.float32)})


@pytest.fixture()
def served(checkpoint_bytes: bytes) -> ServedFiles:
    return ServedFiles(files={f"/{NAME}": checkpoint_bytes})


@pytest.fixture()
def server(served: ServedFiles) -> Iterator[RangeFileServer]:
    with RangeFileServer(served) as running:
        yield running


def loopback_env() -> dict[str, str]:
    """The user's environment, with loopback exempt from any proxy (the test server is local)."""
    return {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def download(data_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "webui", "--data-dir", str(data_dir), "download-model", *flags],
        capture_output=True, text=True, cwd=ROOT, env=loopback_env(), timeout=PROCESS_TIMEOUT_S,
    )


def test_download_model_prints_progress_and_the_path(server: RangeFileServer, checkpoint_bytes: bytes,
                                                     tmp_path: Path) -> None:
    sha = hashlib.sha256(checkpoint_bytes).hexdigest()
    result = download(tmp_path, "--url", server.url(f"/{NAME}"), "--sha256", sha)
    assert result.returncode == 0, result.stderr
    target = tmp_path / "models" / "Stable-diffusion" / NAME
    assert result.stdout.strip() == str(target)
    assert "  0%" in result.stderr and "100%" in result.stderr and f"Verified sha256 {sha}" in result.stderr
    assert target.read_bytes() == checkpoint_bytes
    assert sorted(p.name for p in target.parent.iterdir()) == [NAME]

    again = download(tmp_path, "--url", server.url(f"/{NAME}"), "--sha256", sha)
    assert again.returncode == 0 and "already there" in again.stderr
    assert len(server.seen()) == 1


def test_download_model_resumes_after_a_broken_connection(server: RangeFileServer, served: ServedFiles,
                                                          checkpoint_bytes: bytes, tmp_path: Path) -> None:
    served.drop_after_bytes = 70_000
    sha = hashlib.sha256(checkpoint_bytes).hexdigest()
    first = download(tmp_path, "--url", server.url(f"/{NAME}"), "--sha256", sha)
    assert first.returncode == 1
    assert "the next attempt resumes it" in first.stderr
    folder = tmp_path / "models" / "Stable-diffusion"
    assert [p.name for p in folder.iterdir()] == [f"{NAME}.part"]

    second = download(tmp_path, "--url", server.url(f"/{NAME}"), "--sha256", sha)
    assert second.returncode == 0, second.stderr
    assert (folder / NAME).read_bytes() == checkpoint_bytes
    assert [(s.range, s.status) for s in server.seen()] == [(None, 200), ("bytes=70000-", 206)]


def test_download_model_with_a_wrong_sha256_keeps_nothing(server: RangeFileServer, checkpoint_bytes: bytes,
                                                          tmp_path: Path) -> None:
    wrong = "f" * 64
    result = download(tmp_path, "--url", server.url(f"/{NAME}"), "--sha256", wrong)
    assert result.returncode == 1
    assert f"expected {wrong}, got {hashlib.sha256(checkpoint_bytes).hexdigest()}" in result.stderr
    assert result.stdout == ""
    assert list((tmp_path / "models" / "Stable-diffusion").iterdir()) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--url", "http://127.0.0.1:9/model.ckpt"], "url: must end in a plain *.safetensors file name"),
        (["--sha256", "1234"], "sha256: must be 64 hexadecimal characters"),
    ],
)
def test_download_model_bad_flags_name_the_flag(tmp_path: Path, flags: list[str], message: str) -> None:
    result = download(tmp_path, *flags)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "models").exists()


def read_until(fd: int, wanted: str, deadline: float) -> str:
    seen = b""
    while wanted.encode() not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"never printed {wanted!r}; got {seen.decode(errors='replace')!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, f"output ended before {wanted!r}; got {seen.decode(errors='replace')!r}"
            seen += chunk
    return seen.decode(errors="replace")


def test_starting_the_ui_on_a_terminal_with_no_checkpoint_offers_the_download(
    server: RangeFileServer, checkpoint_bytes: bytes, tmp_path: Path
) -> None:
    sha = hashlib.sha256(checkpoint_bytes).hexdigest()
    folder = tmp_path / "models" / "Stable-diffusion"
    terminal, terminal_side = pty.openpty()  # stdin is a terminal, as when a user runs the command
    process = subprocess.Popen(
        [sys.executable, "-m", "webui", "--data-dir", str(tmp_path), "--port", "9",
         "--default-model-url", server.url(f"/{NAME}"), "--default-model-sha256", sha],
        stdin=terminal_side, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=loopback_env(),
    )
    os.close(terminal_side)
    try:
        assert process.stdout is not None
        shown = read_until(process.stdout.fileno(), "[y/N] ", time.monotonic() + PROCESS_TIMEOUT_S)
        assert f"Download {NAME} into {folder}? [y/N] " in shown
        assert not folder.exists() or list(folder.iterdir()) == []
        os.write(terminal, b"y\n")
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while not (folder / NAME).exists():
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "the download never finished"
            time.sleep(0.05)
        assert (folder / NAME).read_bytes() == checkpoint_bytes
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=PROCESS_TIMEOUT_S)
        os.close(terminal)
    assert "100%" in stderr.decode(errors="replace")
