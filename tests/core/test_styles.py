"""styles.csv as A1111 reads, applies, extracts and saves it: the worked examples of a1111-spec-wave2 §12.9, old and
broken files, several files with dividers, edits saved atomically with a .bak copy. Real files in tmp."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from webui.core.styles import (
    Style,
    StyleDatabase,
    StyleSaveError,
    extract_style_text_from_prompt,
    merge_prompts,
)

SPEC_CSV = 'name,prompt,negative_prompt\nA,"{prompt}, detailed",\nB,"masterpiece, {prompt}",lowres\nC,best quality,\n'


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture()
def spec_db(tmp_path: Path) -> StyleDatabase:
    return StyleDatabase(write(tmp_path / "styles.csv", SPEC_CSV))


# -- §12.9 -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("style", "prompt", "expected"), [
    ("masterpiece, {prompt}, 8k", "a cat", "masterpiece, a cat, 8k"),
    ("best quality", "a cat ", "a cat, best quality"),
    ("best quality", "", "best quality"),
    ("", "  a cat ", "a cat"),
    ("{prompt} and {prompt}", "x", "x and x"),
])
def test_merge_prompts_vectors(style: str, prompt: str, expected: str) -> None:
    assert merge_prompts(style, prompt) == expected


def test_apply_a_b_c_wraps_in_order(spec_db: StyleDatabase) -> None:
    assert spec_db.apply("cat", "blurry", ["A", "B", "C"]) == ("masterpiece, cat, detailed, best quality",
                                                              "blurry, lowres")


def test_extract_returns_reverse_discovery_order(spec_db: StyleDatabase) -> None:
    assert spec_db.extract("masterpiece, cat, detailed, best quality", "blurry, lowres") == (["A", "C", "B"], "cat",
                                                                                             "blurry")


def test_extract_needs_both_parts(spec_db: StyleDatabase) -> None:
    assert spec_db.extract("masterpiece, dog", "blurry") == ([], "masterpiece, dog", "blurry")
    assert spec_db.extract("masterpiece, dog", "blurry, lowres") == (["B"], "dog", "blurry")
    assert spec_db.extract_styles_from_prompt("masterpiece, dog", "blurry, lowres") == (["B"], "dog", "blurry")


def test_extract_style_text_docstring_examples() -> None:
    assert extract_style_text_from_prompt("masterpiece", "1girl, art by greg, masterpiece") == (True,
                                                                                                "1girl, art by greg")
    assert extract_style_text_from_prompt("masterpiece, {prompt}", "masterpiece, 1girl, art by greg") == (
        True, "1girl, art by greg")
    assert extract_style_text_from_prompt("masterpiece, {prompt}", "exquisite, 1girl") == (False, "exquisite, 1girl")


def test_unknown_style_names_are_ignored(spec_db: StyleDatabase) -> None:
    # A1111 merges an unknown style as an empty text: no error, the prompt comes back stripped.
    assert spec_db.apply(" cat ", "blurry", ["no such style"]) == ("cat", "blurry")
    assert spec_db.apply("cat", "", ["nope", "C"]) == ("cat, best quality", "")


def test_a_style_with_both_texts_empty_never_matches(tmp_path: Path) -> None:
    db = StyleDatabase(write(tmp_path / "styles.csv", "name,prompt,negative_prompt\nEmpty,,\nC,best quality,\n"))
    assert db.extract("cat, best quality", "") == (["C"], "cat", "")


# -- loading ---------------------------------------------------------------------------------------------------------


def test_bom_quotes_comments_unnamed_rows_and_old_text_column(tmp_path: Path) -> None:
    path = write(tmp_path / "styles.csv", 'name, prompt, negative_prompt\n'
                 '# a comment,ignored,ignored\n'
                 ',no name,x\n'
                 'Multi, "line one\nline two",  "lo, res"\n'
                 '\n'
                 'Émoji ✨,"sparkles",\n', encoding="utf-8-sig")
    db = StyleDatabase(path)
    assert [(s.name, s.prompt, s.negative_prompt) for s in db.styles()] == [
        ("Multi", "line one\nline two", "lo, res"), ("Émoji ✨", "sparkles", ""),
    ]
    assert db.errors == []
    old = StyleDatabase(write(tmp_path / "old.csv", "name,text\nOld,old style text\n"))
    assert [(s.name, s.prompt, s.negative_prompt) for s in old.styles()] == [("Old", "old style text", "")]


def test_a_missing_file_is_no_error(tmp_path: Path) -> None:
    db = StyleDatabase(tmp_path / "styles.csv")
    assert db.styles() == [] and db.errors == []


def test_broken_rows_name_file_and_line_while_the_others_load(tmp_path: Path) -> None:
    data = ('name,prompt,negative_prompt\n'
            'Good,"good, prompt",bad\n'
            'TooMany,masterpiece, best quality,lowres\n'
            'TooFew,"only a prompt"\n'.encode()
            + b'Latin1,caf\xe9,\n'
            + b'"Spans\nlines",x,y,z\n'
            + b'Last,last prompt,\n')
    path = tmp_path / "styles.csv"
    path.write_bytes(data)
    db = StyleDatabase(path)
    assert [(s.name, s.prompt) for s in db.styles()] == [("Good", "good, prompt"), ("Last", "last prompt")]
    messages = [str(error) for error in db.errors]
    assert len(messages) == 4
    assert messages[0].startswith(f"{path}: line 3: expected 3 columns") and "found 4" in messages[0]
    assert messages[1].startswith(f"{path}: line 4: expected 3 columns") and "found 2" in messages[1]
    assert messages[2].startswith(f"{path}: line 5: not valid UTF-8")
    assert messages[3].startswith(f"{path}: line 6: expected 3 columns")


def test_a_file_without_the_columns_is_reported_and_never_overwritten(tmp_path: Path) -> None:
    path = write(tmp_path / "styles.csv", "title;text\nA;b\n")
    db = StyleDatabase(path)
    assert db.styles() == []
    assert [str(error) for error in db.errors] == [
        f"{path}: line 1: the first line must name the columns name, prompt, negative_prompt (found title;text)"
    ]
    with pytest.raises(StyleSaveError, match="not overwritten"):
        db.save_style(Style("New", "x", ""))
    assert path.read_text("utf-8") == "title;text\nA;b\n"
    assert db.get("New") is None


def test_several_files_with_wildcards_get_dividers(tmp_path: Path) -> None:
    write(tmp_path / "styles.csv", "name,prompt,negative_prompt\nMain,main,\n")
    write(tmp_path / "more" / "anime.csv", "name,prompt,negative_prompt\nCel,cel shading,photo\n")
    write(tmp_path / "more" / "photo.csv", "name,prompt,negative_prompt\nMain,overridden,\n")
    db = StyleDatabase([tmp_path / "styles.csv", tmp_path / "more" / "*.csv"])
    listed = [(s.name, s.prompt, s.negative_prompt) for s in db.styles()]
    assert listed == [
        ("---------------- STYLES ----------------", None, None),
        ("Main", "overridden", ""),
        ("---------------- ANIME -----------------", None, None),
        ("Cel", "cel shading", "photo"),
        ("---------------- PHOTO -----------------", None, None),
    ]
    # Selecting a divider adds nothing (A1111 would fail on its None texts).
    assert db.apply("cat", "", [listed[0][0], "Cel"]) == ("cat, cel shading", "photo")


# -- saving ----------------------------------------------------------------------------------------------------------


def test_create_edit_delete_save_atomically_with_a_backup(tmp_path: Path) -> None:
    path = write(tmp_path / "styles.csv", "name,prompt,negative_prompt\n# keep me,,\nA,a,\nB,b,bn\n")
    original = path.read_bytes()
    db = StyleDatabase(path)

    db.save_style(Style("New, with comma", 'say "hi", {prompt}', "ugly"))
    assert path.with_name("styles.csv.bak").read_bytes() == original
    text = path.read_bytes().decode("utf-8-sig")
    assert text == ('name,prompt,negative_prompt\r\n# keep me,,\nA,a,\r\nB,b,bn\r\n'
                    '"New, with comma","say ""hi"", {prompt}",ugly\r\n')
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")  # A1111 writes utf-8-sig

    db.save_style(Style("A", "a edited", "an"))
    reloaded = StyleDatabase(path)
    assert [(s.name, s.prompt, s.negative_prompt) for s in reloaded.styles()] == [
        ("A", "a edited", "an"), ("B", "b", "bn"), ("New, with comma", 'say "hi", {prompt}', "ugly"),
    ]
    assert reloaded.apply("cat", "", ["New, with comma"]) == ('say "hi", cat', "ugly")

    assert db.delete_style("B") is True and db.delete_style("B") is False
    assert [s.name for s in StyleDatabase(path).styles()] == ["A", "New, with comma"]
    assert "# keep me" in path.read_bytes().decode("utf-8-sig")
    # No temp file is left behind by the atomic writes.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["styles.csv", "styles.csv.bak"]


def test_saving_keeps_broken_rows_for_the_user_to_fix(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    path.write_bytes(b"name,prompt,negative_prompt\nBroken,a, b,c\nLatin1,caf\xe9,\nOk,ok,\n")
    db = StyleDatabase(path)
    db.save_style(Style("Added", "added", ""))
    data = path.read_bytes()
    assert b"Broken,a, b,c\n" in data and b"Latin1,caf\xe9,\n" in data
    again = StyleDatabase(path)
    assert [s.name for s in again.styles()] == ["Ok", "Added"] and len(again.errors) == 2


def test_new_styles_go_to_the_default_file_and_edits_stay_in_theirs(tmp_path: Path) -> None:
    main = write(tmp_path / "styles.csv", "name,prompt,negative_prompt\nMain,main,\n")
    extra = write(tmp_path / "extra.csv", "name,prompt,negative_prompt\nExtra,extra,\n")
    db = StyleDatabase([main, extra])
    db.save_style(Style("Extra", "extra edited", ""))
    db.save_style(Style("Fresh", "fresh", ""))
    main_text, extra_text = main.read_bytes().decode("utf-8-sig"), extra.read_bytes().decode("utf-8-sig")
    assert "Fresh" in main_text and "Fresh" not in extra_text
    assert "extra edited" in extra_text and "extra edited" not in main_text
    assert "STYLES" not in main_text  # dividers are never saved
    with pytest.raises(ValueError, match="divider"):
        db.save_style(Style("---------------- STYLES ----------------", "x", ""))


def test_a_default_file_that_does_not_exist_yet_is_created(tmp_path: Path) -> None:
    path = tmp_path / "data" / "styles.csv"
    db = StyleDatabase(path)
    db.save_style(Style("First", "first", ""))
    assert path.read_bytes().decode("utf-8-sig") == "name,prompt,negative_prompt\r\nFirst,first,\r\n"
    assert not path.with_name("styles.csv.bak").exists()


@pytest.mark.parametrize("name", ["", "   ", "#comment", "two\nlines"])
def test_bad_style_names_are_refused(tmp_path: Path, name: str) -> None:
    db = StyleDatabase(tmp_path / "styles.csv")
    with pytest.raises(ValueError, match="style name"):
        db.save_style(Style(name, "x", ""))
    assert not (tmp_path / "styles.csv").exists()


def test_concurrent_saves_lose_no_style(tmp_path: Path) -> None:
    db = StyleDatabase(tmp_path / "styles.csv")

    def add(index: int) -> None:
        db.save_style(Style(f"S{index}", f"p{index}", ""))

    threads = [threading.Thread(target=add, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(s.name for s in StyleDatabase(tmp_path / "styles.csv").styles()) == [f"S{i}" for i in range(8)]
