"""Tests of the gallery index over real image files: incremental refresh, memory-only paging, filters, cache, delete.
Must not import torch, gradio or fastapi."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image

from webui.app import gallery as gallery_module
from webui.app.gallery import GalleryEntry, GalleryIndex, GalleryPage
from webui.app.outputs import Outputs, encode_image_with_infotext, read_infotext

# A fixed base time (2023-11-14) so that ordering follows the mtimes the tests set.
BASE_NS = 1_700_000_000 * 1_000_000_000
SECOND_NS = 1_000_000_000
DAY = "2024-07-27"


def infotext_for(prompt: str, negative: str = "", model: str | None = None, seed: int = 1) -> str:
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    model_part = f", Model: {model}" if model else ""
    return f"{prompt}{negative_line}\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: {seed}, Size: 8x8{model_part}"


def write_image(path: Path, infotext: str | None, mtime_ns: int, image_format: str = "png") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.new("RGB", (8, 8))
    if infotext is None:
        picture.save(path, format="PNG" if image_format == "png" else "JPEG")
    else:
        path.write_bytes(encode_image_with_infotext(picture, infotext, image_format))
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def write_many(root: Path, count: int) -> list[Path]:
    """`count` tiny PNGs in one day folder; image i is i seconds newer than image 0."""
    folder = root / "txt2img-images" / DAY
    folder.mkdir(parents=True)
    picture = Image.new("RGB", (8, 8))
    paths: list[Path] = []
    for number in range(count):
        path = folder / f"{number:05}-{number}.png"
        model = f"model{number % 3}"
        path.write_bytes(encode_image_with_infotext(picture, infotext_for(f"picture {number}", model=model), "png"))
        os.utime(path, ns=(BASE_NS + number * SECOND_NS,) * 2)
        paths.append(path)
    return paths


class CountingReader:
    """Stands in for read_infotext and counts the files it was asked to read."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def __call__(self, source: Path) -> str | None:
        self.paths.append(Path(source))
        return read_infotext(source)


def refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("the disk was touched")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "outputs"
    folder.mkdir()
    return folder


def names(page: GalleryPage) -> list[str]:
    return [entry.path.name for entry in page.entries]


# --- paging from memory -------------------------------------------------------------------------------


def test_one_refresh_then_fifty_pages_never_touch_the_disk(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_many(root, 2000)
    reader = CountingReader()
    monkeypatch.setattr(gallery_module, "read_infotext", reader)
    index = GalleryIndex(root)
    index.refresh()
    assert len(reader.paths) == 2000

    # From here on reading or listing fails loudly, and the files are gone anyway.
    shutil.rmtree(root / "txt2img-images")
    seen: list[str] = []
    with monkeypatch.context() as patch:
        patch.setattr(gallery_module, "read_infotext", refuse)
        patch.setattr(gallery_module.os, "scandir", refuse)
        for number in range(50):
            page = index.page(number, page_size=40)
            assert page.page == number and page.page_count == 50 and page.total == 2000
            seen.extend(names(page))
    expected_newest_first = [path.name for path in reversed(paths)]
    assert seen == expected_newest_first


def test_entries_carry_path_day_prompt_model_and_infotext(root: Path) -> None:
    infotext = infotext_for("a red cat", negative="blurry", model="dreamshaper_8")
    path = write_image(root / "txt2img-images" / DAY / "00000-1.png", infotext, BASE_NS)
    index = GalleryIndex(root)
    index.refresh()
    (entry,) = index.page(0).entries
    assert entry == GalleryEntry(
        path=path.resolve(), mtime=BASE_NS / 1e9, day=DAY, prompt="a red cat", negative_prompt="blurry",
        model="dreamshaper_8", infotext=infotext,
    )
    assert index.entry(path) == entry


def test_equal_mtimes_put_the_higher_number_first(root: Path) -> None:
    for number in range(3):
        write_image(root / "txt2img-images" / DAY / f"{number:05}-9.png", infotext_for("x"), BASE_NS)
    index = GalleryIndex(root)
    index.refresh()
    assert names(index.page(0)) == ["00002-9.png", "00001-9.png", "00000-9.png"]


def test_pages_clamp_into_range(root: Path) -> None:
    for number in range(5):
        write_image(root / f"{number}.png", infotext_for(f"p{number}"), BASE_NS + number * SECOND_NS)
    index = GalleryIndex(root)
    index.refresh()
    assert index.page(-3, page_size=2).page == 0
    last = index.page(99, page_size=2)
    assert (last.page, last.page_count, last.total, names(last)) == (2, 3, 5, ["0.png"])
    with pytest.raises(ValueError, match="page_size"):
        index.page(0, page_size=0)


def test_an_empty_folder_gives_an_empty_first_page(tmp_path: Path) -> None:
    index = GalleryIndex(tmp_path / "not-created-yet")
    index.refresh()
    assert index.page(5) == GalleryPage(entries=(), page=0, page_count=0, total=0)
    assert index.days() == [] and index.models() == []


# --- filters ------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_index(root: Path) -> GalleryIndex:
    images = root / "txt2img-images"
    write_image(images / "2024-07-26" / "00000-1.png", infotext_for("A Red CAT", model="alpha"), BASE_NS)
    write_image(images / "2024-07-27" / "00000-2.png", infotext_for("a dog", negative="cat ears", model="beta"),
                BASE_NS + SECOND_NS)
    write_image(images / "2024-07-27" / "00001-3.jpg", infotext_for("a bird", model="alpha"), BASE_NS + 2 * SECOND_NS,
                image_format="jpg")
    # Not a date folder: the day comes from the file's own time.
    write_image(root / "favourites" / "old.webp", infotext_for("catalogue"), BASE_NS + 3 * SECOND_NS,
                image_format="webp")
    index = GalleryIndex(root)
    index.refresh()
    return index


def test_search_is_case_insensitive_over_prompt_and_negative_prompt(mixed_index: GalleryIndex) -> None:
    assert names(mixed_index.page(0, search="cAt")) == ["old.webp", "00000-2.png", "00000-1.png"]
    assert names(mixed_index.page(0, search="RED cat")) == ["00000-1.png"]
    assert names(mixed_index.page(0, search="zebra")) == []
    assert mixed_index.page(0, search="   ").total == 4


def test_day_and_model_filters_combine_with_search(mixed_index: GalleryIndex) -> None:
    mtime_day = datetime.date.fromtimestamp((BASE_NS + 3 * SECOND_NS) / 1e9).isoformat()
    assert mixed_index.days() == sorted({"2024-07-26", "2024-07-27", mtime_day}, reverse=True)
    assert mixed_index.models() == ["alpha", "beta"]
    assert names(mixed_index.page(0, day="2024-07-27")) == ["00001-3.jpg", "00000-2.png"]
    assert names(mixed_index.page(0, model="alpha")) == ["00001-3.jpg", "00000-1.png"]
    assert names(mixed_index.page(0, day="2024-07-27", model="alpha", search="bird")) == ["00001-3.jpg"]
    assert names(mixed_index.page(0, day=mtime_day)) == ["old.webp"]
    assert mixed_index.page(0, day=None, model=None).total == 4


# --- incremental refresh --------------------------------------------------------------------------------


def test_refresh_reads_only_new_and_changed_files_and_drops_vanished_ones(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_many(root, 20)
    index = GalleryIndex(root)
    index.refresh()
    reader = CountingReader()
    monkeypatch.setattr(gallery_module, "read_infotext", reader)

    index.refresh()
    assert reader.paths == []

    new_file = write_image(paths[0].parent / "00020-20.png", infotext_for("brand new"), BASE_NS + 30 * SECOND_NS)
    write_image(paths[5], infotext_for("rewritten prompt"), BASE_NS + 5 * SECOND_NS + 1)
    paths[7].unlink()
    index.refresh()

    assert sorted(path.name for path in reader.paths) == sorted([new_file.name, paths[5].name])
    assert index.page(0).total == 20
    assert index.entry(paths[5]).prompt == "rewritten prompt"
    with pytest.raises(KeyError):
        index.entry(paths[7])
    assert names(index.page(0, page_size=1)) == ["00020-20.png"]


def test_only_images_are_indexed_and_damaged_ones_have_no_text(root: Path) -> None:
    folder = root / "txt2img-images" / DAY
    write_image(folder / "00000-1.png", infotext_for("kept"), BASE_NS)
    write_image(folder / "00001-2.png", None, BASE_NS + SECOND_NS)
    (folder / "00002-3.png").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("text")
    (folder / ".00003-4.png.abcd1234.tmp").write_bytes(b"half written")
    (folder / ".hidden.png").write_bytes(b"")
    (root / ".cache").mkdir()
    write_image(root / ".cache" / "thumb.png", infotext_for("thumbnail"), BASE_NS)
    outside = write_image(root.parent / "elsewhere.png", infotext_for("outside"), BASE_NS)
    (folder / "00004-5.png").symlink_to(outside)

    index = GalleryIndex(root)
    index.refresh()

    page = index.page(0)
    assert names(page) == ["00002-3.png", "00001-2.png", "00000-1.png"]
    assert [(entry.prompt, entry.infotext) for entry in page.entries[:2]] == [("", None), ("", None)]


# --- add ----------------------------------------------------------------------------------------------


def test_add_shows_a_saved_image_without_any_rescan(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = Outputs(root)
    first = outputs.save(Image.new("RGB", (8, 8)), infotext_for("first"), seed=1)
    index = GalleryIndex(root)
    index.refresh()

    second = outputs.save(Image.new("RGB", (8, 8)), infotext_for("second one", model="m"), seed=2)
    monkeypatch.setattr(gallery_module.os, "scandir", refuse)
    monkeypatch.setattr(gallery_module, "read_infotext", refuse)
    index.add(second.path, second.infotext)

    page = index.page(0)
    assert [entry.path for entry in page.entries] == [second.path.resolve(), first.path.resolve()]
    assert page.entries[0].prompt == "second one" and page.entries[0].model == "m"
    assert index.models() == ["m"]


def test_add_reads_the_infotext_when_not_given(root: Path) -> None:
    path = write_image(root / "a.png", infotext_for("read back"), BASE_NS)
    index = GalleryIndex(root)
    index.add(path)
    assert index.entry(path).prompt == "read back"


def test_add_refuses_files_outside_the_root(root: Path) -> None:
    outside = write_image(root.parent / "outside.png", infotext_for("x"), BASE_NS)
    index = GalleryIndex(root)
    with pytest.raises(ValueError, match="not inside"):
        index.add(outside)
    assert index.page(0).total == 0


def test_adds_and_deletes_during_a_refresh_are_not_undone(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doomed = write_image(root / "doomed.png", infotext_for("doomed"), BASE_NS)
    write_image(root / "stays.png", infotext_for("stays"), BASE_NS + SECOND_NS)
    index = GalleryIndex(root)
    real_scan = gallery_module._scan

    def scan_then_race(folder: Path) -> dict[str, object]:
        listed = real_scan(folder)  # still lists doomed.png and not fresh.png
        fresh = write_image(root / "fresh.png", infotext_for("fresh"), BASE_NS + 2 * SECOND_NS)
        index.add(fresh)
        index.delete(doomed)
        return listed  # type: ignore[return-value]

    monkeypatch.setattr(gallery_module, "_scan", scan_then_race)
    index.refresh()

    assert names(index.page(0)) == ["fresh.png", "stays.png"]


def test_pages_stay_consistent_while_another_thread_adds(root: Path) -> None:
    folder = root / "txt2img-images" / DAY
    paths = [write_image(folder / f"{n:05}-{n}.png", infotext_for(f"p{n}"), BASE_NS + n * SECOND_NS)
             for n in range(100)]
    index = GalleryIndex(root)
    errors: list[BaseException] = []

    def add_all() -> None:
        try:
            for path in paths:
                index.add(path, infotext_for(path.stem))
        except BaseException as error:  # re-raised in the main thread below
            errors.append(error)

    worker = threading.Thread(target=add_all)
    worker.start()
    while worker.is_alive():
        page = index.page(0, page_size=10)
        assert len(page.entries) == min(10, page.total)
    worker.join()
    assert errors == []
    assert index.page(0).total == 100


# --- delete ---------------------------------------------------------------------------------------------


def test_delete_removes_the_file_and_its_entry(root: Path) -> None:
    keep = write_image(root / "txt2img-images" / DAY / "00000-1.png", infotext_for("keep"), BASE_NS)
    gone = write_image(root / "txt2img-images" / DAY / "00001-2.png", infotext_for("gone"), BASE_NS + SECOND_NS)
    index = GalleryIndex(root)
    index.refresh()

    index.delete(gone)

    assert not gone.exists() and keep.exists()
    assert names(index.page(0)) == ["00000-1.png"]
    with pytest.raises(KeyError):
        index.entry(gone)
    index.delete(gone)  # a second click is harmless


def test_delete_refuses_paths_that_escape_the_root(root: Path, tmp_path: Path) -> None:
    victim = write_image(tmp_path / "victim.png", infotext_for("precious"), BASE_NS)
    elsewhere = tmp_path / "elsewhere"
    write_image(elsewhere / "other.png", infotext_for("other"), BASE_NS)
    (root / "txt2img-images").mkdir()
    (root / "link.png").symlink_to(victim)
    (root / "linked-folder").symlink_to(elsewhere, target_is_directory=True)
    config = root / "notes.txt"
    config.write_text("not an image")
    index = GalleryIndex(root)
    index.refresh()

    escapes = [
        root / "txt2img-images" / ".." / ".." / "victim.png",
        victim,
        root / "link.png",
        root / "linked-folder" / "other.png",
        root,
        config,
    ]
    for path in escapes:
        with pytest.raises(ValueError):
            index.delete(path)
    assert victim.exists() and (elsewhere / "other.png").exists() and config.exists()


# --- cache file -------------------------------------------------------------------------------------------


def test_cache_lets_a_new_index_skip_reading_unchanged_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "outputs"
    paths = write_many(root, 30)
    cache = tmp_path / "cache" / "gallery.json"
    first = GalleryIndex(root, cache_file=cache)
    first.refresh()
    assert json.loads(cache.read_text(encoding="utf-8"))["version"] == gallery_module.CACHE_VERSION

    write_image(paths[3], infotext_for("changed since"), BASE_NS + 3 * SECOND_NS + 5)
    reader = CountingReader()
    monkeypatch.setattr(gallery_module, "read_infotext", reader)
    second = GalleryIndex(root, cache_file=cache)
    second.refresh()

    assert [path.name for path in reader.paths] == [paths[3].name]
    assert second.page(0, page_size=30) == GalleryPage(
        entries=tuple(first.entry(path) if path != paths[3] else second.entry(path) for path in reversed(paths)),
        page=0, page_count=1, total=30,
    )
    assert second.entry(paths[3]).prompt == "changed since"
    assert second.models() == ["model0", "model1", "model2"]


def test_unchanged_folder_does_not_rewrite_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "outputs"
    write_many(root, 5)
    cache = tmp_path / "gallery.json"
    GalleryIndex(root, cache_file=cache).refresh()
    monkeypatch.setattr(gallery_module, "write_file_atomically", refuse)
    GalleryIndex(root, cache_file=cache).refresh()


def test_added_entries_reach_the_cache_at_the_next_refresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "outputs"
    cache = tmp_path / "gallery.json"
    index = GalleryIndex(root, cache_file=cache)
    index.refresh()
    added = write_image(root / "a.png", infotext_for("added"), BASE_NS)
    index.add(added, infotext_for("added"))
    index.refresh()
    monkeypatch.setattr(gallery_module, "read_infotext", refuse)
    restarted = GalleryIndex(root, cache_file=cache)
    restarted.refresh()
    assert restarted.entry(added).prompt == "added"


@pytest.mark.parametrize("content", ["{broken", '{"version": 999, "entries": []}', '[1, 2]',
                                     '{"version": 1, "root": "/somewhere/else", "entries": []}'])
def test_unusable_cache_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str) -> None:
    root = tmp_path / "outputs"
    write_many(root, 4)
    cache = tmp_path / "gallery.json"
    cache.write_text(content, encoding="utf-8")
    reader = CountingReader()
    monkeypatch.setattr(gallery_module, "read_infotext", reader)
    index = GalleryIndex(root, cache_file=cache)
    index.refresh()
    assert len(reader.paths) == 4
    assert index.page(0).total == 4
    assert json.loads(cache.read_text(encoding="utf-8"))["root"] == str(root.resolve())
