"""Output images on disk: A1111's folders, numbering and name patterns, atomic saves with infotext, reading it back.
Must not import torch, gradio or fastapi; beyond the standard library only webui.core, PIL and piexif."""

from __future__ import annotations

import datetime
import io
import os
import re
import string
import threading
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import piexif
import piexif.helper
from PIL import Image, PngImagePlugin

from webui.core import samplers
from webui.core.files import write_file_atomically
from webui.core.params import GenerationParams

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

# A1111's samples_filename_pattern default when images go into per-day folders.
DEFAULT_FILENAME_PATTERN = "[seed]"
# A1111's sanitize_filename_part: these become '_', leading spaces and trailing " ." are stripped,
# and each substituted value is cut to --filenames-max-length (128).
_INVALID_FILENAME_CHARS = '#<>:"/\\|?*\n\r\t'
_INVALID_FILENAME_TRANSLATION: Mapping[int, str] = MappingProxyType(
    {ord(character): "_" for character in _INVALID_FILENAME_CHARS}
)
MAX_FILENAME_PART_LENGTH = 128
# A1111's directories_max_prompt_words default, used by [prompt_words].
PROMPT_WORDS_COUNT = 8
# A1111's FilenameGenerator.default_time_format for [datetime].
DEFAULT_DATETIME_FORMAT = "%Y%m%d%H%M%S"
# A tag is [name] or [name<arg>...] with no brackets inside; anything else is literal text.
_TAG_PATTERN = re.compile(r"\[([^\[\]]+)\]")
_TAG_ARGUMENT_PATTERN = re.compile(r"(.*)<([^>]*)>$")
# [prompt_words] splits on runs of whitespace and ASCII punctuation, as A1111's re_nonletters.
_NON_LETTERS_PATTERN = re.compile(r"[\s" + re.escape(string.punctuation) + r"]+")
# Most file systems limit one name to 255 bytes; used where os.statvfs cannot say.
_FALLBACK_NAME_MAX = 255
# Room the name must leave: the atomic write's temp name adds "." and ".xxxxxxxx.tmp", and the
# sequence number may grow past five digits ("NNNNNNN-").
_TEMP_NAME_OVERHEAD = len(".") + len(".00000000.tmp")
_NUMBER_PREFIX_ROOM = len("0000000-")


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


def sanitize_filename_part(text: str, replace_spaces: bool = True) -> str:
    """A1111's sanitize_filename_part: a value made safe to stand inside one file name.

    Spaces become '_' unless `replace_spaces` is False; each of #<>:"/\\|?* and newline, carriage
    return and tab becomes '_'; leading spaces go, the text is cut to 128 characters, then trailing
    spaces and dots go.
    """
    if replace_spaces:
        text = text.replace(" ", "_")
    text = text.translate(_INVALID_FILENAME_TRANSLATION)
    text = text.lstrip(" ")[:MAX_FILENAME_PART_LENGTH]
    return text.rstrip(" .")


def _prompt_words(prompt: str) -> str:
    words = [word for word in _NON_LETTERS_PATTERN.split(prompt) if word]
    # A1111 names the folder or file "empty" rather than leaving a gap for a prompt without words.
    chosen = words[:PROMPT_WORDS_COUNT] if words else ["empty"]
    return sanitize_filename_part(" ".join(chosen), replace_spaces=False)


def _formatted_datetime(iso_moment: str, arguments: list[str]) -> str | None:
    try:
        moment = datetime.datetime.fromisoformat(iso_moment)
    except ValueError:
        return None
    time_format = arguments[0] if arguments and arguments[0] != "" else DEFAULT_DATETIME_FORMAT
    time_zone: zoneinfo.ZoneInfo | None = None
    if len(arguments) > 1:
        try:
            time_zone = zoneinfo.ZoneInfo(arguments[1])
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            # A1111 ignores an unknown time zone and uses local time.
            time_zone = None
    # astimezone(None) reads a naive moment as local time, as A1111's datetime.now() is.
    zoned = moment.astimezone(time_zone)
    try:
        formatted = zoned.strftime(time_format)
    except (ValueError, TypeError):
        formatted = zoned.strftime(DEFAULT_DATETIME_FORMAT)
    return sanitize_filename_part(formatted, replace_spaces=False)


# Tags whose text is the field of the same name, sanitised without replacing spaces (as A1111 does
# for sampler and model name).
_PLAIN_TAGS = frozenset(
    {"seed", "steps", "cfg", "width", "height", "sampler", "scheduler", "model_name", "model_hash",
     "clip_skip", "date"}
)


def _tag_value(tag: str, arguments: list[str], fields: Mapping[str, str]) -> str | None:
    """The text for one tag, or None to keep the tag literally (unknown, or its field is absent)."""
    if tag == "none":
        # A1111's [none]: an empty decoration, so the name is the sequence number alone.
        return ""
    if tag == "prompt_words":
        return _prompt_words(fields.get("prompt", ""))
    if tag == "datetime":
        iso_moment = fields.get("datetime")
        return None if iso_moment is None else _formatted_datetime(iso_moment, arguments)
    if tag == "prompt":
        prompt = fields.get("prompt")
        return None if prompt is None else sanitize_filename_part(prompt, replace_spaces=True)
    if tag == "prompt_spaces":
        prompt = fields.get("prompt")
        return None if prompt is None else sanitize_filename_part(prompt, replace_spaces=False)
    if tag in _PLAIN_TAGS:
        value = fields.get(tag)
        # A1111 leaves numbers and hashes as they are; sanitising them too costs nothing and means
        # no caller-supplied value can ever put a path separator into a name.
        return None if value is None else sanitize_filename_part(value, replace_spaces=False)
    return None


def apply_filename_pattern(pattern: str, fields: Mapping[str, str]) -> str:
    """A1111's FilenameGenerator.apply for the tags this program knows, over precomputed `fields`.

    `fields` holds raw values keyed by tag name ("seed", "steps", "cfg", "width", "height",
    "sampler", "scheduler", "model_name", "model_hash", "prompt", "clip_skip", "date") plus
    "datetime" as an ISO moment, which [datetime] and [datetime<format>] / [datetime<format><zone>]
    format. Tags are case-insensitive. A tag that is unknown, or whose field is missing, stays in
    the result as "[name]" (A1111 drops its <arguments> there too). Text outside tags is kept as
    written.
    """
    pieces: list[str] = []
    position = 0
    for match in _TAG_PATTERN.finditer(pattern):
        pieces.append(pattern[position:match.start()])
        position = match.end()
        tag = match.group(1)
        arguments: list[str] = []
        while (argument_match := _TAG_ARGUMENT_PATTERN.match(tag)) is not None:
            tag, argument = argument_match.groups()
            arguments.insert(0, argument)
        value = _tag_value(tag.lower(), arguments, fields)
        pieces.append(f"[{tag}]" if value is None else value)
    pieces.append(pattern[position:])
    return "".join(pieces)


def _number_text(value: float) -> str:
    # The same spelling as the infotext's "CFG scale": 7, not 7.0.
    return str(int(value)) if float(value).is_integer() else str(value)


def filename_fields_for(
    params: GenerationParams,
    seed: int,
    model_name: str | None,
    model_hash: str | None,
) -> dict[str, str]:
    """The apply_filename_pattern fields of one image, except "date" and "datetime".

    Outputs.save adds those from the moment of saving. A missing model leaves [model_name] and
    [model_hash] literal, as A1111 does when it has no value.
    """
    try:
        sampler, schedule = params.sampler_and_schedule()
        sampler_name = sampler.name
        schedule_label = samplers.resolved_schedule_label(sampler, schedule)
    except samplers.UnknownSamplerError:
        # Naming a file is no place to reject parameters; the job validated them already.
        sampler_name, schedule_label = params.sampler, params.scheduler
    fields = {
        "seed": str(seed),
        "steps": str(params.steps),
        "cfg": _number_text(params.cfg_scale),
        "width": str(params.width),
        "height": str(params.height),
        "sampler": sampler_name,
        "scheduler": schedule_label,
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "clip_skip": str(params.clip_skip),
    }
    if model_name:
        fields["model_name"] = model_name
    if model_hash:
        fields["model_hash"] = model_hash
    return fields


def _name_max(folder: Path) -> int:
    try:
        return os.statvfs(folder).f_namemax
    except (AttributeError, OSError):
        # os.statvfs does not exist on Windows.
        return _FALLBACK_NAME_MAX


def _fit_decoration(decoration: str, folder: Path, extension: str) -> str:
    # As A1111, an over-long name is cut rather than refused; the budget is in bytes because
    # that is what file systems count.
    budget = _name_max(folder) - _TEMP_NAME_OVERHEAD - _NUMBER_PREFIX_ROOM - len(f".{extension}")
    encoded = decoration.encode("utf-8")
    if len(encoded) <= budget:
        return decoration
    return encoded[:max(budget, 0)].decode("utf-8", errors="ignore")


def _check_decoration(decoration: str) -> None:
    # Substituted values are sanitised; only literal pattern text can carry these, and a file
    # name must never become a path.
    for forbidden in ("/", "\\", "\0", os.sep):
        if forbidden in decoration:
            raise ValueError(f"pattern: the file name {decoration!r} may not contain {forbidden!r}")


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
        *,
        filename_fields: Mapping[str, str] | None = None,
        pattern: str = DEFAULT_FILENAME_PATTERN,
    ) -> SavedImage:
        """Write `image` as "{number:05}-{decoration}.{ext}" in the day's folder, atomically, with infotext.

        The decoration is `pattern` (A1111's samples_filename_pattern) applied to `filename_fields`
        (see filename_fields_for); "seed", "date" and "datetime" are filled in from `seed` and
        `when` unless given. The default "[seed]" keeps the name "{number:05}-{seed}.{ext}"; an
        empty decoration (e.g. "[none]") gives "{number:05}.{ext}". A pattern whose literal text
        holds a path separator raises ValueError before anything is written. A failure leaves
        neither a partial file under the final name nor a temp file.
        """
        moment = when if when is not None else datetime.datetime.now()
        chosen = _choose_format(image, image_format)
        fields = dict(filename_fields or {})
        fields.setdefault("seed", str(seed))
        fields.setdefault("date", moment.date().isoformat())
        fields.setdefault("datetime", moment.isoformat())
        decoration = apply_filename_pattern(pattern, fields)
        _check_decoration(decoration)
        # Encoding is the slow part and needs no lock; a failure here touches nothing on disk.
        data = _encode(image, infotext, chosen)
        folder = self.txt2img_dir(moment.date())
        folder.mkdir(parents=True, exist_ok=True)
        decoration = _fit_decoration(decoration, folder, chosen.extension)
        with self._lock:
            number, final_path = self._free_name(folder, decoration, chosen.extension)
            write_file_atomically(final_path, data)
            self._counters[folder] = _FolderCounter(number + 1, folder.stat().st_mtime_ns)
        return SavedImage(path=final_path, infotext=infotext)

    def _free_name(self, folder: Path, decoration: str, extension: str) -> tuple[int, Path]:
        counter = self._counters.get(folder)
        # A changed folder mtime means someone else added or removed files: trust a fresh scan.
        # Listing only then keeps N saves from costing N full listings.
        if counter is not None and counter.folder_mtime_ns == folder.stat().st_mtime_ns:
            number = counter.next_number
        else:
            number = next_sequence_number(folder)
        for _attempt in range(MAX_NAME_ATTEMPTS):
            name = f"{number:05}-{decoration}" if decoration else f"{number:05}"
            candidate = folder / f"{name}.{extension}"
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
