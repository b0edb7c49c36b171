"""Tests of saving images with infotext: real files on disk, A1111 layout, numbering, atomicity, metadata.
Must not import torch, gradio or fastapi."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import piexif
import piexif.helper
import pytest
from PIL import Image, PngImagePlugin

from webui.app import outputs as outputs_module
from webui.app.outputs import (
    Outputs,
    SavedImage,
    apply_filename_pattern,
    encode_image_with_infotext,
    filename_fields_for,
    next_sequence_number,
    read_infotext,
    sanitize_filename_part,
)
from webui.core.params import GenerationParams

WHEN = datetime.datetime(2024, 7, 27, 15, 30, 0)
DAY_FOLDER = Path("txt2img-images") / "2024-07-27"

# Non-Latin-1 characters force PNG iTXt; newlines, quotes, commas and colons exercise quoting.
NON_ASCII_INFOTEXT = (
    'a "cat" 🐱 猫, (smile:1.2), back\\slash\n'
    "second line\n"
    "Negative prompt: lowres, ünïcödé\n"
    'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 32x24, '
    'Model: "model, v2", Version: webui-0.1.0'
)
LATIN1_INFOTEXT = (
    "a café\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 5, Size: 32x24"
)


@pytest.fixture
def outputs(tmp_path: Path) -> Outputs:
    return Outputs(tmp_path / "outputs")


@pytest.fixture
def image() -> Image.Image:
    picture = Image.linear_gradient("L").resize((32, 24)).convert("RGB")
    return picture


def day_folder(outputs: Outputs) -> Path:
    return outputs.root / DAY_FOLDER


def names_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- layout and metadata ----------------------------------------------------------------------------


def test_png_is_saved_in_the_day_folder_with_a1111_name_and_itxt(outputs: Outputs, image: Image.Image) -> None:
    saved = outputs.save(image, NON_ASCII_INFOTEXT, seed=1234, when=WHEN)

    assert saved == SavedImage(path=outputs.root / "txt2img-images" / "2024-07-27" / "00000-1234.png",
                               infotext=NON_ASCII_INFOTEXT)
    assert outputs.txt2img_dir(WHEN.date()) == saved.path.parent
    assert read_infotext(saved.path) == NON_ASCII_INFOTEXT
    with Image.open(saved.path) as reopened:
        assert reopened.format == "PNG"
        assert reopened.info["parameters"] == NON_ASCII_INFOTEXT
    raw = saved.path.read_bytes()
    assert b"iTXtparameters" in raw
    assert b"tEXtparameters" not in raw


def test_latin1_infotext_goes_in_a_text_chunk(outputs: Outputs, image: Image.Image) -> None:
    saved = outputs.save(image, LATIN1_INFOTEXT, seed=5, when=WHEN)
    raw = saved.path.read_bytes()
    assert b"tEXtparameters" in raw
    assert read_infotext(saved.path) == LATIN1_INFOTEXT


@pytest.mark.parametrize(("image_format", "extension", "pil_format"),
                         [("jpg", "jpg", "JPEG"), ("jpeg", "jpg", "JPEG"), ("webp", "webp", "WEBP"),
                          ("PNG", "png", "PNG")])
def test_every_format_reads_back_the_identical_infotext(
    outputs: Outputs, image: Image.Image, image_format: str, extension: str, pil_format: str
) -> None:
    saved = outputs.save(image, NON_ASCII_INFOTEXT, seed=77, image_format=image_format, when=WHEN)
    assert saved.path.name == f"00000-77.{extension}"
    assert read_infotext(saved.path) == NON_ASCII_INFOTEXT
    with Image.open(saved.path) as reopened:
        assert reopened.format == pil_format
        assert reopened.size == image.size
        assert read_infotext(reopened) == NON_ASCII_INFOTEXT


@pytest.mark.parametrize("image_format", ["jpg", "webp"])
def test_lossy_exif_is_a1111s_unicode_user_comment_only(
    outputs: Outputs, image: Image.Image, image_format: str
) -> None:
    saved = outputs.save(image, NON_ASCII_INFOTEXT, seed=1, image_format=image_format, when=WHEN)
    with Image.open(saved.path) as reopened:
        exif_bytes = reopened.info["exif"]
    tiff = exif_bytes.removeprefix(b"Exif\x00\x00")
    assert tiff.startswith(b"MM\x00*")  # big-endian TIFF header, as piexif writes for A1111
    exif = piexif.load(exif_bytes)
    assert set(exif["Exif"]) == {piexif.ExifIFD.UserComment}
    comment = exif["Exif"][piexif.ExifIFD.UserComment]
    assert comment.startswith(b"UNICODE\x00")
    assert comment[8:] == NON_ASCII_INFOTEXT.encode("utf-16-be")


def test_jpeg_exif_segment_header(outputs: Outputs, image: Image.Image) -> None:
    saved = outputs.save(image, LATIN1_INFOTEXT, seed=1, image_format="jpg", when=WHEN)
    raw = saved.path.read_bytes()
    assert raw.startswith(b"\xff\xd8")
    assert b"Exif\x00\x00MM" in raw


def test_rgba_is_converted_for_jpeg_and_webp(outputs: Outputs) -> None:
    transparent = Image.new("RGBA", (16, 16), (10, 20, 30, 128))
    for image_format in ("jpg", "webp"):
        saved = outputs.save(transparent, LATIN1_INFOTEXT, seed=3, image_format=image_format, when=WHEN)
        with Image.open(saved.path) as reopened:
            assert reopened.mode == "RGB"
        assert read_infotext(saved.path) == LATIN1_INFOTEXT


def test_sixteen_bit_greyscale_is_scaled_for_jpeg(outputs: Outputs) -> None:
    deep = Image.new("I;16", (8, 8), 65535)
    saved = outputs.save(deep, LATIN1_INFOTEXT, seed=3, image_format="jpg", when=WHEN)
    with Image.open(saved.path) as reopened:
        assert reopened.mode == "L"
        assert reopened.getpixel((4, 4)) >= 250
    assert read_infotext(saved.path) == LATIN1_INFOTEXT


def test_too_wide_for_webp_falls_back_to_png(outputs: Outputs) -> None:
    wide = Image.new("RGB", (16384, 2))
    saved = outputs.save(wide, LATIN1_INFOTEXT, seed=9, image_format="webp", when=WHEN)
    assert saved.path.name == "00000-9.png"
    assert read_infotext(saved.path) == LATIN1_INFOTEXT


@pytest.mark.parametrize("image_format", ["png", "jpg", "webp"])
def test_encoded_bytes_are_the_saved_file(outputs: Outputs, image: Image.Image, image_format: str) -> None:
    saved = outputs.save(image, NON_ASCII_INFOTEXT, seed=1, image_format=image_format, when=WHEN)
    assert encode_image_with_infotext(image, NON_ASCII_INFOTEXT, image_format) == saved.path.read_bytes()


# --- numbering -------------------------------------------------------------------------------------


def test_counter_continues_after_existing_files(outputs: Outputs, image: Image.Image) -> None:
    folder = day_folder(outputs)
    folder.mkdir(parents=True)
    for name in ("00000-1.png", "00007-5.png", "notes.txt", "grid-0042.png", ".hidden-99.tmp"):
        (folder / name).write_bytes(b"")

    saved = outputs.save(image, LATIN1_INFOTEXT, seed=42, when=WHEN)

    assert saved.path.name == "00008-42.png"


def test_next_sequence_number_follows_a1111(tmp_path: Path) -> None:
    assert next_sequence_number(tmp_path) == 0
    (tmp_path / "00003-1.png").write_bytes(b"")
    (tmp_path / "12.jpg").write_bytes(b"")
    (tmp_path / "00005-x-y.webp").write_bytes(b"")
    assert next_sequence_number(tmp_path) == 13


def test_consecutive_saves_count_up_across_formats(outputs: Outputs, image: Image.Image) -> None:
    names = [
        outputs.save(image, LATIN1_INFOTEXT, seed=seed, image_format=image_format, when=WHEN).path.name
        for seed, image_format in ((10, "png"), (11, "jpg"), (12, "webp"), (13, "png"))
    ]
    assert names == ["00000-10.png", "00001-11.jpg", "00002-12.webp", "00003-13.png"]
    # Only the images themselves: no temp files left behind.
    assert names_in(day_folder(outputs)) == sorted(names)


def test_each_day_has_its_own_folder_and_counter(outputs: Outputs, image: Image.Image) -> None:
    first = outputs.save(image, LATIN1_INFOTEXT, seed=1, when=WHEN)
    second = outputs.save(image, LATIN1_INFOTEXT, seed=1, when=WHEN + datetime.timedelta(days=1))
    assert first.path.relative_to(outputs.root) == DAY_FOLDER / "00000-1.png"
    assert second.path.relative_to(outputs.root) == Path("txt2img-images") / "2024-07-28" / "00000-1.png"


def test_many_saves_list_the_folder_once(
    outputs: Outputs, image: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    listings: list[object] = []
    real_scandir = os.scandir

    def counting_scandir(path: object) -> object:
        listings.append(path)
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(outputs_module.os, "scandir", counting_scandir)
    for seed in range(20):
        outputs.save(image, LATIN1_INFOTEXT, seed=seed, when=WHEN)

    assert len(listings) == 1
    assert len(names_in(day_folder(outputs))) == 20


def test_files_added_from_elsewhere_are_counted(outputs: Outputs, image: Image.Image) -> None:
    outputs.save(image, LATIN1_INFOTEXT, seed=1, when=WHEN)
    folder = day_folder(outputs)
    (folder / "00009-555.png").write_bytes(b"another process")
    # Directory timestamps tick every few milliseconds; make this later change visible as any
    # change made at a later moment would be.
    stat = folder.stat()
    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    saved = outputs.save(image, LATIN1_INFOTEXT, seed=2, when=WHEN)

    assert saved.path.name == "00010-2.png"


def test_a_taken_name_is_never_overwritten(outputs: Outputs, image: Image.Image) -> None:
    outputs.save(image, LATIN1_INFOTEXT, seed=7, when=WHEN)
    folder = day_folder(outputs)
    stat = folder.stat()
    (folder / "00001-7.png").write_bytes(b"another process")
    # The worst case: the other write landed within the same timestamp tick as our last save.
    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    saved = outputs.save(image, LATIN1_INFOTEXT, seed=7, when=WHEN)

    assert saved.path.name == "00002-7.png"
    assert (folder / "00001-7.png").read_bytes() == b"another process"


# --- atomicity -------------------------------------------------------------------------------------


def test_failed_rename_leaves_no_file_and_keeps_the_number(
    outputs: Outputs, image: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse_replace(source: object, destination: object) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(outputs_module.os, "replace", refuse_replace)
        with pytest.raises(OSError, match="disk full"):
            outputs.save(image, NON_ASCII_INFOTEXT, seed=1, when=WHEN)
        assert names_in(day_folder(outputs)) == []

    saved = outputs.save(image, NON_ASCII_INFOTEXT, seed=1, when=WHEN)
    assert saved.path.name == "00000-1.png"
    assert names_in(day_folder(outputs)) == ["00000-1.png"]


def test_failure_while_writing_leaves_no_temp_file(
    outputs: Outputs, image: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(descriptor: int) -> None:
        raise OSError("I/O error")

    monkeypatch.setattr(outputs_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        outputs.save(image, LATIN1_INFOTEXT, seed=1, image_format="jpg", when=WHEN)
    assert names_in(day_folder(outputs)) == []


def test_unencodable_image_writes_nothing(outputs: Outputs) -> None:
    floating_point = Image.new("F", (8, 8))
    with pytest.raises(OSError):
        outputs.save(floating_point, LATIN1_INFOTEXT, seed=1, image_format="jpg", when=WHEN)
    assert not outputs.root.exists() or not any(outputs.root.rglob("*"))


def test_unknown_format_is_refused_before_writing(outputs: Outputs, image: Image.Image) -> None:
    with pytest.raises(ValueError, match="bmp"):
        outputs.save(image, LATIN1_INFOTEXT, seed=1, image_format="bmp", when=WHEN)
    assert not outputs.root.exists()


# --- reading files written by A1111 and others --------------------------------------------------------


def a1111_exif(text: str) -> bytes:
    comment = piexif.helper.UserComment.dump(text, encoding="unicode")
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})


def test_reads_png_written_the_a1111_way(tmp_path: Path, image: Image.Image) -> None:
    path = tmp_path / "00012-1234567890.png"
    pnginfo = PngImagePlugin.PngInfo()
    pnginfo.add_text("parameters", NON_ASCII_INFOTEXT)
    image.save(path, format="PNG", pnginfo=pnginfo)
    assert read_infotext(path) == NON_ASCII_INFOTEXT


@pytest.mark.parametrize(("suffix", "pil_format"), [(".jpg", "JPEG"), (".webp", "WEBP")])
def test_reads_lossy_files_written_the_a1111_way(
    tmp_path: Path, image: Image.Image, suffix: str, pil_format: str
) -> None:
    path = tmp_path / f"00012-1234567890{suffix}"
    # A1111: save the image, then insert the EXIF into the file on disk.
    image.save(path, format=pil_format, quality=80)
    piexif.insert(a1111_exif(NON_ASCII_INFOTEXT), str(path))
    assert read_infotext(path) == NON_ASCII_INFOTEXT


def test_reads_ascii_user_comment_and_undecodable_prefix(tmp_path: Path, image: Image.Image) -> None:
    ascii_path = tmp_path / "ascii.jpg"
    image.save(ascii_path, format="JPEG")
    ascii_comment = piexif.helper.UserComment.dump(LATIN1_INFOTEXT.replace("é", "e"), encoding="ascii")
    piexif.insert(piexif.dump({"Exif": {piexif.ExifIFD.UserComment: ascii_comment}}), str(ascii_path))
    assert read_infotext(ascii_path) == LATIN1_INFOTEXT.replace("é", "e")

    raw_path = tmp_path / "raw.jpg"
    image.save(raw_path, format="JPEG")
    raw_comment = "utf8 text é, no prefix".encode()
    piexif.insert(piexif.dump({"Exif": {piexif.ExifIFD.UserComment: raw_comment}}), str(raw_path))
    assert read_infotext(raw_path) == "utf8 text é, no prefix"


def test_reads_gif_comment(tmp_path: Path) -> None:
    path = tmp_path / "animated.gif"
    Image.new("P", (8, 8)).save(path, format="GIF", comment=LATIN1_INFOTEXT.encode())
    assert read_infotext(path) == LATIN1_INFOTEXT


def test_images_without_infotext_give_none(tmp_path: Path, image: Image.Image) -> None:
    plain_png = tmp_path / "plain.png"
    image.save(plain_png)
    plain_jpeg = tmp_path / "plain.jpg"
    image.save(plain_jpeg, quality=80)
    camera_jpeg = tmp_path / "camera.jpg"
    image.save(camera_jpeg, exif=piexif.dump({"0th": {piexif.ImageIFD.Make: b"Camera"}}))
    assert read_infotext(plain_png) is None
    assert read_infotext(plain_jpeg) is None
    assert read_infotext(camera_jpeg) is None
    assert read_infotext(Image.new("RGB", (4, 4))) is None


def test_reads_in_memory_image_info() -> None:
    picture = Image.new("RGB", (4, 4))
    picture.info["parameters"] = LATIN1_INFOTEXT
    assert read_infotext(picture) == LATIN1_INFOTEXT


# --- file name patterns (A1111's samples_filename_pattern) ---------------------------------------------

PATTERN_FIELDS: dict[str, str] = {
    "seed": "1234",
    "steps": "20",
    "cfg": "7.5",
    "width": "512",
    "height": "768",
    "sampler": "DPM++ 2M",
    "scheduler": "Karras",
    "model_name": "dream shaper_8",
    "model_hash": "879db523c3",
    "prompt": "a cat, (smile:1.2)",
    "clip_skip": "2",
    "date": "2024-07-27",
    "datetime": "2024-07-27T15:30:05",
}


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("[seed]", "1234"),
        ("[steps]", "20"),
        ("[cfg]", "7.5"),
        ("[width]x[height]", "512x768"),
        ("[sampler]", "DPM++ 2M"),  # A1111 keeps spaces in sampler and model names
        ("[scheduler]", "Karras"),
        ("[model_name]", "dream shaper_8"),
        ("[model_hash]", "879db523c3"),
        ("[prompt]", "a_cat,_(smile_1.2)"),
        ("[prompt_spaces]", "a cat, (smile_1.2)"),
        ("[prompt_words]", "a cat smile 1 2"),
        ("[clip_skip]", "2"),
        ("[date]", "2024-07-27"),
        ("[datetime]", "20240727153005"),
        ("[datetime<%Y-%m-%d %H:%M>]", "2024-07-27 15_30"),
        ("[datetime<>]", "20240727153005"),
        ("[none]", ""),
        ("[SEED]-[Steps]", "1234-20"),
        ("run [seed] of [steps]", "run 1234 of 20"),
        ("[[seed]]", "[1234]"),
        ("[unknown_tag]", "[unknown_tag]"),
        ("[unknown<with><args>]", "[unknown]"),  # A1111 drops the arguments of a tag it keeps
        ("[negative_prompt]", "[negative_prompt]"),  # A1111 has no such tag
        ("[seed", "[seed"),
    ],
)
def test_each_pattern_tag(pattern: str, expected: str) -> None:
    assert apply_filename_pattern(pattern, PATTERN_FIELDS) == expected


def test_datetime_with_a_time_zone() -> None:
    fields = {"datetime": "2024-07-27T15:30:05+02:00"}
    assert apply_filename_pattern("[datetime<%H%M><UTC>]", fields) == "1330"
    assert apply_filename_pattern("[datetime<%H%M><Asia/Tokyo>]", fields) == "2230"
    # A1111 ignores a zone it does not know and writes local time.
    local = datetime.datetime.fromisoformat(fields["datetime"]).astimezone().strftime("%H%M")
    assert apply_filename_pattern("[datetime<%H%M><Not/AZone>]", fields) == local


def test_tags_whose_field_is_missing_stay_literal() -> None:
    assert apply_filename_pattern("[model_name]-[model_hash]-[prompt]-[datetime]", {}) == (
        "[model_name]-[model_hash]-[prompt]-[datetime]"
    )
    assert apply_filename_pattern("[prompt_words]", {}) == "empty"  # as A1111 with no prompt


def test_prompt_words_takes_the_first_eight_words() -> None:
    fields = {"prompt": "  one,two;three  four\nfive_six (seven:1.1) eight nine ten"}
    assert apply_filename_pattern("[prompt_words]", fields) == "one two three four five six seven 1"
    assert apply_filename_pattern("[prompt_words]", {"prompt": "((( ,,, )))"}) == "empty"


def test_values_are_sanitised_like_a1111() -> None:
    nasty = '  lead #<>:"/\\|?*\n\r\tend. . '
    # Spaces become '_' first, so with replacement the trailing " . " is no longer stripped.
    assert sanitize_filename_part(nasty) == "__lead_" + "_" * 13 + "end._._"
    assert sanitize_filename_part(nasty, replace_spaces=False) == "lead " + "_" * 13 + "end"
    assert apply_filename_pattern("[prompt_spaces]", {"prompt": nasty}) == "lead " + "_" * 13 + "end"
    assert apply_filename_pattern("[model_name]", {"model_name": "../../etc/passwd"}) == ".._.._etc_passwd"
    long_prompt = "x" * 200 + " ."
    assert apply_filename_pattern("[prompt]", {"prompt": long_prompt}) == "x" * 128
    # The cut comes before the trailing " ." is stripped, as in A1111.
    assert sanitize_filename_part("y" * 126 + " ...", replace_spaces=False) == "y" * 126


def test_filename_fields_for_follows_the_infotext_spelling() -> None:
    params = GenerationParams(prompt="a cat", negative_prompt="dog", sampler="k_euler", steps=30, cfg_scale=7.0,
                              width=640, height=448, clip_skip=2)
    assert filename_fields_for(params, seed=99, model_name="tiny", model_hash="abc123") == {
        "seed": "99", "steps": "30", "cfg": "7", "width": "640", "height": "448", "sampler": "Euler",
        "scheduler": "Automatic", "prompt": "a cat", "negative_prompt": "dog", "clip_skip": "2",
        "model_name": "tiny", "model_hash": "abc123",
    }
    default_params = GenerationParams(cfg_scale=6.5)
    fields = filename_fields_for(default_params, seed=1, model_name=None, model_hash="")
    assert (fields["cfg"], fields["sampler"], fields["scheduler"]) == ("6.5", "DPM++ 2M", "Karras")
    assert "model_name" not in fields and "model_hash" not in fields


def test_default_pattern_keeps_todays_names_with_fields_given(outputs: Outputs, image: Image.Image) -> None:
    fields = filename_fields_for(GenerationParams(prompt="a cat"), seed=777, model_name="m", model_hash="h")
    saved = outputs.save(image, LATIN1_INFOTEXT, seed=777, when=WHEN, filename_fields=fields)
    assert saved.path.name == "00000-777.png"


def test_save_with_a_pattern(outputs: Outputs, image: Image.Image) -> None:
    params = GenerationParams(prompt="a red cat, sitting", steps=25)
    fields = filename_fields_for(params, seed=42, model_name="dreamshaper_8", model_hash=None)
    first = outputs.save(image, LATIN1_INFOTEXT, seed=42, when=WHEN, filename_fields=fields,
                         pattern="[seed]-[prompt_spaces]")
    second = outputs.save(image, LATIN1_INFOTEXT, seed=43, when=WHEN, pattern="[model_name]-[datetime]-[date]")
    third = outputs.save(image, LATIN1_INFOTEXT, seed=44, when=WHEN, filename_fields=fields,
                         pattern="[model_name] [steps] [seed]")
    assert [saved.path.name for saved in (first, second, third)] == [
        "00000-42-a red cat, sitting.png",
        "00001-[model_name]-20240727153000-2024-07-27.png",
        "00002-dreamshaper_8 25 42.png",
    ]
    assert read_infotext(third.path) == LATIN1_INFOTEXT


def test_empty_decoration_gives_the_number_alone(outputs: Outputs, image: Image.Image) -> None:
    first = outputs.save(image, LATIN1_INFOTEXT, seed=1, when=WHEN, pattern="[none]")
    second = outputs.save(image, LATIN1_INFOTEXT, seed=2, when=WHEN)
    third = outputs.save(image, LATIN1_INFOTEXT, seed=3, when=WHEN, pattern="[none]", image_format="jpg")
    assert [saved.path.name for saved in (first, second, third)] == ["00000.png", "00001-2.png", "00002.jpg"]
    assert next_sequence_number(day_folder(outputs)) == 3


@pytest.mark.parametrize("pattern", ["[seed]/[steps]", "..\\[seed]", "a\x00b"])
def test_pattern_that_would_make_a_path_is_refused(outputs: Outputs, image: Image.Image, pattern: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        outputs.save(image, LATIN1_INFOTEXT, seed=1, when=WHEN, pattern=pattern)
    assert not outputs.root.exists()


def test_long_names_are_cut_to_fit_the_file_system(outputs: Outputs, image: Image.Image) -> None:
    fields = {"prompt": "猫" * 200}  # 3 bytes each in UTF-8
    saved = outputs.save(image, LATIN1_INFOTEXT, seed=1, when=WHEN, filename_fields=fields,
                         pattern="[prompt]-[prompt]-[prompt]")
    name_bytes = len(saved.path.name.encode("utf-8"))
    assert name_bytes <= 255 - len(".") - len(".00000000.tmp")
    assert saved.path.name.startswith("00000-" + "猫" * 50)
    assert saved.path.name.endswith(".png")
    assert read_infotext(saved.path) == LATIN1_INFOTEXT
