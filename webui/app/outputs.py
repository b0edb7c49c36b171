"""Output images on disk: A1111's folder layout and numbering, atomic saves with infotext, reading it back.
Must not import torch, gradio or fastapi; beyond the standard library only webui.core, PIL and piexif."""

from __future__ import annotations

import datetime
import io
import os
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import piexif
import piexif.helper
from PIL import Image, PngImagePlugin

TXT2IMG_FOLDER = "txt2img-images"
# A1111's pnginfo_section_name for generated images.
PNGINFO_KEY = "parameters"
# A1111's defaults: jpeg_quality 80 (also used for WebP), webp_lossless False.
LOSSY_QUALITY = 80
# A1111 tries this many numbers past the scanned maximum before giving up on a folder.
MAX_NAME_ATTEMPTS = 500
# A JPEG segment length is a 16-bit count that includes its own two bytes.
_JPEG_MAX_SEGMENT_PAYLOAD = 0xFFFF - 2
# A1111 scales 16-bit greyscale to 8 bits before lossy saves.
_SIXTEEN_TO_EIGHT_BIT = 255 / 65535


@dataclass(frozen=True, slots=True)
class _ImageFormat:
    """One supported file format: its extension, Pillow's name for it, and its largest side."""

    extension: str
    pil_name: str
    max_side: int | None


_PNG = _ImageFormat("png", "PNG", None)
_FORMATS: dict[str, _ImageFormat] = {
    "png": _PNG,
    "jpg": _ImageFormat("jpg", "JPEG", 65535),
    "jpeg": _ImageFormat("jpg", "JPEG", 65535),
    "webp": _ImageFormat("webp", "WEBP", 16383),
}


@dataclass(frozen=True, slots=True)
class SavedImage:
    """Where an image was written and the infotext stored in it."""

    path: Path
    infotext: str


@dataclass(slots=True)
class _FolderCounter:
    """The next free number of one folder, valid while the folder's mtime is what we last saw."""

    next_number: int
    folder_mtime_ns: int


def _choose_format(image: Image.Image, image_format: str) -> _ImageFormat:
    chosen = _FORMATS.get(image_format.lower().lstrip("."))
    if chosen is None:
        raise ValueError(f"image_format: unsupported format {image_format!r}; choose one of png, jpg, webp")
    # A1111 falls back to PNG when the image is larger than the format can store.
    if chosen.max_side is not None and max(image.size) > chosen.max_side:
        return _PNG
    return chosen


def _prepare_for_lossy(image: Image.Image, chosen: _ImageFormat) -> Image.Image:
    # The same conversions A1111 applies before JPEG and WebP saves.
    if image.mode == "RGBA":
        return image.convert("RGB")
    if image.mode == "I;16":
        scaled = image.point(lambda value: value * _SIXTEEN_TO_EIGHT_BIT)
        return scaled.convert("RGB" if chosen.pil_name == "WEBP" else "L")
    return image


def _user_comment_exif(infotext: str) -> bytes:
    comment = piexif.helper.UserComment.dump(infotext, encoding="unicode")
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})


def _encode(image: Image.Image, infotext: str, chosen: _ImageFormat) -> bytes:
    buffer = io.BytesIO()
    if chosen.pil_name == "PNG":
        pnginfo = PngImagePlugin.PngInfo()
        # Pillow writes tEXt for Latin-1 text and iTXt (UTF-8) otherwise, as in A1111.
        pnginfo.add_text(PNGINFO_KEY, infotext)
        image.save(buffer, format="PNG", pnginfo=pnginfo)
        return buffer.getvalue()

    lossy_ready = _prepare_for_lossy(image, chosen)
    lossy_ready.save(buffer, format=chosen.pil_name, quality=LOSSY_QUALITY, lossless=False)
    exif_bytes = _user_comment_exif(infotext)
    if chosen.pil_name == "JPEG" and len(exif_bytes) > _JPEG_MAX_SEGMENT_PAYLOAD:
        raise ValueError(
            f"infotext: {len(infotext)} characters do not fit in JPEG EXIF (64 KiB); save as png or webp"
        )
    with_exif = io.BytesIO()
    piexif.insert(exif_bytes, buffer.getvalue(), with_exif)
    return with_exif.getvalue()


def encode_image_with_infotext(image: Image.Image, infotext: str, image_format: str) -> bytes:
    """The bytes of `image` in `image_format` ("png", "jpg"/"jpeg", "webp") carrying `infotext`.

    Identical to the file Outputs.save writes. An image too large for JPEG or WebP is encoded as
    PNG, as A1111 does.
    """
    return _encode(image, infotext, _choose_format(image, image_format))


def next_sequence_number(folder: Path) -> int:
    """A1111's get_next_sequence_number with no basename: highest leading number + 1, 0 if none.

    The leading number is the part of the name (extension removed) before the first '-'.
    """
    highest = -1
    with os.scandir(folder) as entries:
        for entry in entries:
            leading_part = os.path.splitext(entry.name)[0].split("-")[0]
            try:
                highest = max(highest, int(leading_part))
            except ValueError:
                continue
    return highest + 1


def _write_atomically(final_path: Path, data: bytes) -> None:
    # The dot prefix keeps the temp name out of A1111's numbering scan and out of image listings.
    temp_path = final_path.with_name(f".{final_path.name}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask decide permissions, like a plain open() (mkstemp forces 0600).
    descriptor = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            # Without fsync a crash right after the rename can leave an empty file under the final name.
            os.fsync(stream.fileno())
        os.replace(temp_path, final_path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


class Outputs:
    """The outputs folder: saves numbered images per day (A1111 layout) with their infotext."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # One lock for naming and renaming, so that two threads never pick the same number.
        self._lock = threading.Lock()
        self._counters: dict[Path, _FolderCounter] = {}

    def txt2img_dir(self, day: datetime.date) -> Path:
        """root / "txt2img-images" / "YYYY-MM-DD" (A1111's default [date] sub-folder)."""
        return self.root / TXT2IMG_FOLDER / day.isoformat()

    def save(
        self,
        image: Image.Image,
        infotext: str,
        seed: int,
        image_format: str = "png",
        when: datetime.datetime | None = None,
    ) -> SavedImage:
        """Write `image` as "{number:05}-{seed}.{ext}" in the day's folder, atomically, with infotext.

        A failure leaves neither a partial file under the final name nor a temp file.
        """
        moment = when if when is not None else datetime.datetime.now()
        chosen = _choose_format(image, image_format)
        # Encoding is the slow part and needs no lock; a failure here touches nothing on disk.
        data = _encode(image, infotext, chosen)
        folder = self.txt2img_dir(moment.date())
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            number, final_path = self._free_name(folder, seed, chosen.extension)
            _write_atomically(final_path, data)
            self._counters[folder] = _FolderCounter(number + 1, folder.stat().st_mtime_ns)
        return SavedImage(path=final_path, infotext=infotext)

    def _free_name(self, folder: Path, seed: int, extension: str) -> tuple[int, Path]:
        counter = self._counters.get(folder)
        # A changed folder mtime means someone else added or removed files: trust a fresh scan.
        # Listing only then keeps N saves from costing N full listings.
        if counter is not None and counter.folder_mtime_ns == folder.stat().st_mtime_ns:
            number = counter.next_number
        else:
            number = next_sequence_number(folder)
        for _attempt in range(MAX_NAME_ATTEMPTS):
            candidate = folder / f"{number:05}-{seed}.{extension}"
            if not os.path.lexists(candidate):
                return number, candidate
            # Taken although our count said free (a change within one mtime tick): rescan.
            number = max(number + 1, next_sequence_number(folder))
        raise FileExistsError(f"no free file name in {folder} after {MAX_NAME_ATTEMPTS} attempts")


def _exif_user_comment(exif_data: bytes) -> str | None:
    try:
        exif = piexif.load(exif_data)
    except Exception:
        # Malformed EXIF from other software raises several different error types in piexif;
        # it only means there is no infotext to read.
        return None
    raw_comment = exif.get("Exif", {}).get(piexif.ExifIFD.UserComment, b"")
    if not isinstance(raw_comment, bytes):
        return None
    try:
        return piexif.helper.UserComment.load(raw_comment)
    except ValueError:
        # A1111's fallback for comments without a valid character-code prefix.
        return raw_comment.decode("utf-8", errors="ignore")


def _infotext_from_info(info: Mapping[str, object]) -> str | None:
    parameters = info.get(PNGINFO_KEY)
    if isinstance(parameters, str) and parameters:
        return parameters
    exif_data = info.get("exif")
    if isinstance(exif_data, bytes):
        comment = _exif_user_comment(exif_data)
        if comment:
            return comment
    other_comment = info.get("comment")
    if isinstance(other_comment, bytes):
        other_comment = other_comment.decode("utf-8", errors="ignore")
    if isinstance(other_comment, str) and other_comment:
        return other_comment
    return None


def read_infotext(source: Path | Image.Image) -> str | None:
    """The infotext of an image file or opened image; None when it carries none.

    Looks where A1111 writes it: PNG text "parameters", then EXIF UserComment (JPEG, WebP), then a
    GIF comment. Raises OSError (e.g. FileNotFoundError, PIL.UnidentifiedImageError) for a file that
    cannot be opened as an image.
    """
    if isinstance(source, Image.Image):
        return _infotext_from_info(source.info)
    with Image.open(source) as image:
        return _infotext_from_info(image.info)
