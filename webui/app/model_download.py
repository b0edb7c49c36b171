"""Downloading a checkpoint into a model folder: free-space check, resumable `.part` file, sha256 check, atomic rename.
Standard library (urllib) and webui.core only; must not import torch, gradio, fastapi or webui.engine/ui/api."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

from webui.core.params import ParamError

# A1111's default model (modules/sd_models.py downloads the same file and checks the same hash).
DEFAULT_MODEL_URL = (
    "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors"
)
DEFAULT_MODEL_SHA256 = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
DEFAULT_MODEL_TITLE = "SD 1.5 (4.3 GB)"

PART_SUFFIX = ".part"
MODEL_SUFFIX = ".safetensors"
CHUNK_BYTES = 1024 * 1024
# Left free after the download, so the disk is not filled to the last byte (outputs, config, caches still need room).
FREE_SPACE_MARGIN_BYTES = 256 * 1024 * 1024
# Per socket operation (connect, each read): a stalled server fails the download instead of hanging it.
SOCKET_TIMEOUT_S = 60.0
USER_AGENT = "webui-model-download/1"
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE_PATTERN = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

ProgressCallback = Callable[[int, "int | None"], None]
FreeBytes = Callable[[Path], int]


class DownloadError(RuntimeError):
    """A download that did not produce a verified file; the message says what happened and what to do."""


class NotEnoughDiskSpaceError(DownloadError):
    """The model folder's disk has less free space than the download needs (checked before writing)."""


class ChecksumMismatchError(DownloadError):
    """The downloaded bytes do not have the expected sha256; the `.part` file was deleted."""


class DownloadCancelledError(DownloadError):
    """Cancelled by the user; the `.part` file is kept so the next attempt resumes."""


def disk_free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def human_bytes(count: int) -> str:
    """1234567 → '1.2 MB' (decimal units, as download sizes are usually quoted)."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class DownloadSpec:
    """What to download and how to check it: `file_name` is the last part of the URL's path."""

    url: str
    sha256: str
    file_name: str

    @property
    def title(self) -> str:
        """How the offer names the file: A1111's default model by its usual name, anything else by its file name."""
        return DEFAULT_MODEL_TITLE if self.sha256 == DEFAULT_MODEL_SHA256 else self.file_name


def download_spec(url: str, sha256: str, url_field: str = "url", sha256_field: str = "sha256") -> DownloadSpec:
    """A checked DownloadSpec; ParamError names the flag when the URL or hash cannot be used."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ParamError(url_field, f"must be an http:// or https:// URL, got {url!r}")
    file_name = unquote(parts.path.rsplit("/", 1)[-1])
    if (
        not file_name.endswith(MODEL_SUFFIX)
        or file_name == MODEL_SUFFIX
        or file_name.startswith(".")
        or any(separator in file_name for separator in ("/", "\\", "\0"))
    ):
        raise ParamError(url_field, f"must end in a plain *{MODEL_SUFFIX} file name, got {file_name!r}")
    digest = sha256.strip().lower()
    if not _SHA256_PATTERN.match(digest):
        raise ParamError(sha256_field, f"must be 64 hexadecimal characters, got {sha256!r}")
    return DownloadSpec(url=url.strip(), sha256=digest, file_name=file_name)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects (Hugging Face sends files from a CDN) but never to another scheme such as ftp: or file:."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
        if urlsplit(newurl).scheme not in ("http", "https"):
            raise DownloadError(f"refusing a redirect from {req.full_url} to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(url: str, start: int) -> http.client.HTTPResponse | None:
    """The response to a GET from byte `start`; None when the server says nothing is left after `start` (416)."""
    # Environment proxies (HTTPS_PROXY, NO_PROXY) are honoured, as every other download tool does.
    opener = urllib.request.build_opener(_HttpOnlyRedirects())
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    try:
        return opener.open(urllib.request.Request(url, headers=headers), timeout=SOCKET_TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and start > 0:
            error.close()
            return None
        raise DownloadError(f"download of {url} failed: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(f"could not connect to download {url}: {reason}") from error


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


def _hash_prefix(path: Path, length: int) -> hashlib._Hash:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        remaining = length
        while remaining > 0 and (block := file.read(min(CHUNK_BYTES, remaining))):
            digest.update(block)
            remaining -= len(block)
    return digest


def _finish(part: Path, final: Path, digest: str, spec: DownloadSpec) -> Path:
    if digest != spec.sha256:
        part.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"sha256 mismatch for {spec.file_name}: expected {spec.sha256}, got {digest}; "
            "the download was deleted (is the expected sha256 right, or does the URL serve another file?)"
        )
    os.replace(part, final)
    _sync_folder(final.parent)
    return final


def _sync_folder(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk (POSIX); other systems have no folder fsync.
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def download_model(
    spec: DownloadSpec,
    folder: Path,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    free_bytes: FreeBytes = disk_free_bytes,
    chunk_bytes: int = CHUNK_BYTES,
) -> Path:
    """Download `spec` into `folder` and return the final path.

    Bytes go to `<file_name>.part`, resumed with a Range request when it exists (a server answering
    200 instead of 206 restarts it from the first byte). The sha256 covers the whole file and is
    checked before the `.part` is renamed, so the model folder only ever holds a verified file. An
    interrupted or cancelled download keeps the `.part` for the next attempt; a wrong hash deletes it.
    Free space is checked when the server gives the size (Content-Length or Content-Range), before any
    byte is written.
    """
    final = folder / spec.file_name
    if final.exists():
        raise DownloadError(f"{final} already exists")
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / (spec.file_name + PART_SUFFIX)
    have = part.stat().st_size if part.is_file() else 0
    response = _open(spec.url, have)
    if response is None:
        # Nothing left after `have`: the .part is whole (a crash before the rename) or longer than the file.
        if _hash_prefix(part, have).hexdigest() == spec.sha256:
            return _finish(part, final, spec.sha256, spec)
        part.unlink()
        return download_model(spec, folder, progress, cancel, free_bytes, chunk_bytes)
    with response:
        start, total = _where_response_starts(response, have)
        if total is not None:
            needed = total - start + FREE_SPACE_MARGIN_BYTES
            free = free_bytes(folder)
            if free < needed:
                raise NotEnoughDiskSpaceError(
                    f"not enough free disk space in {folder}: the download needs {needed} bytes "
                    f"({human_bytes(needed)}, including {human_bytes(FREE_SPACE_MARGIN_BYTES)} to spare) "
                    f"but only {free} bytes ({human_bytes(free)}) are free"
                )
        digest = _hash_prefix(part, start) if start > 0 else hashlib.sha256()
        with part.open("r+b" if start > 0 else "wb") as file:
            file.seek(start)
            file.truncate()
            done = _copy_body(response, file, digest, start, total, progress, cancel, chunk_bytes, spec)
            file.flush()
            os.fsync(file.fileno())
    if total is not None and done != total:
        raise DownloadError(
            f"the connection closed after {done} of {total} bytes; {part.name} is kept and the next attempt resumes it"
        )
    return _finish(part, final, digest.hexdigest(), spec)


def _where_response_starts(response: http.client.HTTPResponse, have: int) -> tuple[int, int | None]:
    """(offset the body starts at, full file size if known) for a 200 or 206 answer to a request from `have`."""
    if response.status == 206:
        match = _CONTENT_RANGE_PATTERN.match(response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != have:
            raise DownloadError(
                f"the server answered the resume request with an unexpected range "
                f"{response.headers.get('Content-Range')!r}; delete the .part file to start again"
            )
        total = int(match.group(3)) if match.group(3) != "*" else None
        return have, total
    if response.status == 200:
        # A server that ignores Range sends the whole file: start over from the first byte.
        return 0, _content_length(response)
    raise DownloadError(f"unexpected HTTP status {response.status} from {response.geturl()}")


def _copy_body(
    response: http.client.HTTPResponse, file: IO[bytes], digest: hashlib._Hash, start: int, total: int | None,
    progress: ProgressCallback | None, cancel: threading.Event | None, chunk_bytes: int, spec: DownloadSpec,
) -> int:
    done = start
    if progress is not None:
        progress(done, total)
    while True:
        if cancel is not None and cancel.is_set():
            raise DownloadCancelledError(
                f"download of {spec.file_name} cancelled at {done} bytes; the next attempt resumes from there"
            )
        try:
            # read1: whatever has arrived (up to chunk_bytes), so progress and Cancel stay responsive on slow links.
            block = response.read1(chunk_bytes)
        except (OSError, http.client.HTTPException) as error:
            file.flush()
            raise DownloadError(
                f"the download of {spec.file_name} broke off after {done} bytes ({error}); the next attempt resumes it"
            ) from error
        if not block:
            return done
        file.write(block)
        digest.update(block)
        done += len(block)
        if progress is not None:
            progress(done, total)


class DownloadState(Enum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class DownloadStatus:
    """A snapshot for the UI: bytes so far, total when known, and the error or final path."""

    state: DownloadState
    done_bytes: int = 0
    total_bytes: int | None = None
    error: str = ""
    path: Path | None = None
    cancelling: bool = False  # Cancel was pressed; the download stops after the block it is reading

    @property
    def running(self) -> bool:
        return self.state == DownloadState.DOWNLOADING

    @property
    def fraction(self) -> float:
        if self.state == DownloadState.DONE:
            return 1.0
        if not self.total_bytes:
            return 0.0
        return min(1.0, self.done_bytes / self.total_bytes)


class BackgroundDownload:
    """One download at a time on a thread of its own (never the generation queue), polled by the UI.

    `on_done(path)` runs on that thread once the verified file is in place (main.py queues the load).
    """

    def __init__(
        self, spec: DownloadSpec, folder: Path, on_done: Callable[[Path], None] | None = None,
        free_bytes: FreeBytes = disk_free_bytes,
    ) -> None:
        self.spec = spec
        self.folder = folder
        self._on_done = on_done
        self._free_bytes = free_bytes
        self._lock = threading.Lock()
        self._status = DownloadStatus(DownloadState.IDLE)
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def status(self) -> DownloadStatus:
        with self._lock:
            return self._status

    def start(self) -> bool:
        """Start downloading; False when a download is already running."""
        with self._lock:
            if self._status.running:
                return False
            self._cancel = threading.Event()
            self._status = DownloadStatus(DownloadState.DOWNLOADING)
            self._thread = threading.Thread(target=self._run, args=(self._cancel,), name="model-download", daemon=True)
            self._thread.start()
        return True

    def cancel(self) -> None:
        with self._lock:
            self._cancel.set()
            if self._status.running:
                self._status = dataclasses.replace(self._status, cancelling=True)

    def wait(self, timeout_s: float | None = None) -> DownloadStatus:
        """Block until the running download ends (tests and the CLI); returns the final status."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        return self.status()

    def _set(self, status: DownloadStatus) -> None:
        with self._lock:
            self._status = status

    def _run(self, cancel: threading.Event) -> None:
        def report(done: int, total: int | None) -> None:
            self._set(DownloadStatus(DownloadState.DOWNLOADING, done, total, cancelling=cancel.is_set()))

        try:
            path = download_model(self.spec, self.folder, report, cancel, self._free_bytes)
        except DownloadCancelledError as error:
            last = self.status()
            self._set(DownloadStatus(DownloadState.CANCELLED, last.done_bytes, last.total_bytes, str(error)))
            return
        except (DownloadError, OSError) as error:
            last = self.status()
            self._set(DownloadStatus(DownloadState.FAILED, last.done_bytes, last.total_bytes, str(error)))
            return
        last = self.status()
        self._set(DownloadStatus(DownloadState.DONE, last.done_bytes, last.total_bytes, path=path))
        if self._on_done is not None:
            self._on_done(path)


class TextProgressBar:
    """A progress callback drawing `[#####-----]  42%  1.8 GB / 4.3 GB` on a text stream (the CLI's stderr).

    On a terminal the line is redrawn in place at each new percent; in a log (not a terminal) a new line
    is written every LOG_STEP_PERCENT, so the log stays short.
    """

    WIDTH = 30
    LOG_STEP_PERCENT = 10
    UNKNOWN_TOTAL_STEP_BYTES = 64 * 1024 * 1024

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._in_place = stream.isatty()
        self._last_mark: int | None = None
        self._drawn = False

    def __call__(self, done: int, total: int | None) -> None:
        if total:
            percent = min(100, done * 100 // total)
            mark = percent if self._in_place else percent - percent % self.LOG_STEP_PERCENT
            filled = self.WIDTH * percent // 100
            line = f"[{'#' * filled}{'-' * (self.WIDTH - filled)}] {percent:3d}%  {human_bytes(done)} / {human_bytes(total)}"
        else:
            mark = done // self.UNKNOWN_TOTAL_STEP_BYTES
            line = f"{human_bytes(done)} downloaded"
        if mark == self._last_mark:
            return
        self._last_mark = mark
        self._stream.write(("\r" + line) if self._in_place else (line + "\n"))
        self._stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """End the in-place line so later messages start on a line of their own."""
        if self._in_place and self._drawn:
            self._stream.write("\n")
            self._stream.flush()
        self._drawn = False
