"""Tests of config.json persistence on real files: defaults, round trip, validation, atomic writes, corruption recovery.
Must not import torch, gradio or fastapi."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest

from webui.app import settings_store as settings_module
from webui.app.settings_store import (
    DEFAULT_UI_DEFAULTS,
    SETTING_NOTES,
    SettingsStore,
    UserSettings,
)
from webui.core.params import ParamError


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return tmp_path / "data" / "config.json"


def read_json(path: Path) -> dict[str, object]:
    return json.loads(path.read_text(encoding="utf-8"))


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- defaults and round trip -------------------------------------------------------------------------


def test_missing_file_gives_defaults_and_creates_nothing(config: Path) -> None:
    store = SettingsStore(config)
    assert store.load() == UserSettings()
    assert store.current.ui_defaults == dict(DEFAULT_UI_DEFAULTS)
    assert store.current.preview_every_n_steps == 10 and store.current.filename_pattern == "[seed]"
    assert not config.parent.exists()


def test_update_round_trips_through_a_flat_a1111_style_file(config: Path) -> None:
    store = SettingsStore(config)
    settings, notes = store.update({
        "outdir": "/srv/pictures",
        "samples_format": "webp",
        "filename_pattern": "[seed]-[prompt_words]",
        "preview_every_n_steps": 0,
        "sd_model_checkpoint": "dreamshaper_8.safetensors [879db523c3]",
        "ui_defaults": {"steps": 30, "negative_prompt": "flou, ünïcödé", "cfg_scale": 5},
    })

    assert notes[0] == "Saved."
    assert settings.ui_defaults["steps"] == 30 and settings.ui_defaults["cfg_scale"] == 5.0
    assert settings.ui_defaults["sampler"] == "DPM++ 2M"  # untouched keys keep their value
    text = config.read_text(encoding="utf-8")
    assert "ünïcödé" in text  # ensure_ascii=False, as A1111
    assert text.startswith('{\n    "outdir": "/srv/pictures",')  # indent=4
    on_disk = read_json(config)
    assert on_disk["samples_format"] == "webp" and on_disk["preview_every_n_steps"] == 0
    assert on_disk["ui_defaults"] == dict(settings.ui_defaults)
    assert SettingsStore(config).load() == settings


def test_notes_say_when_each_changed_setting_applies(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SettingsStore(config)
    _, notes = store.update({"preview_every_n_steps": 5, "ui_defaults": {"width": 768}, "outdir": ""})
    assert notes == [
        "Saved.",
        "preview_every_n_steps: applied now",
        "ui_defaults: applies when the page is reloaded",
    ]
    assert SETTING_NOTES["preview_every_n_steps"] == "applied now"

    monkeypatch.setattr(settings_module, "RESTART_REQUIRED", frozenset({"outdir"}))
    _, notes = store.update({"outdir": "elsewhere"})
    assert notes == ["Saved.", "outdir: needs a restart"]


def test_an_update_that_changes_nothing_writes_nothing(config: Path) -> None:
    store = SettingsStore(config)
    settings, notes = store.update({"preview_every_n_steps": 10, "ui_defaults": {"steps": 20}})
    assert settings == UserSettings()
    assert notes == ["Nothing to save: no setting changed."]
    assert not config.exists()


def test_integral_floats_from_number_boxes_are_accepted(config: Path) -> None:
    settings, _ = SettingsStore(config).update({"preview_every_n_steps": 20.0, "ui_defaults": {"steps": 25.0}})
    assert settings.preview_every_n_steps == 20 and isinstance(settings.preview_every_n_steps, int)
    assert settings.ui_defaults["steps"] == 25 and isinstance(settings.ui_defaults["steps"], int)


def test_user_settings_cannot_be_changed_in_place() -> None:
    given = {"steps": 5}
    settings = UserSettings(ui_defaults=given)
    given["steps"] = 99
    assert settings.ui_defaults["steps"] == 5
    with pytest.raises(TypeError):
        settings.ui_defaults["steps"] = 6  # type: ignore[index]
    assert hash(settings) == hash(UserSettings(ui_defaults={"steps": 7}))  # ui_defaults is not hashed


# --- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"preview_every_n_steps": 151}, "preview_every_n_steps: must be between 0 and 150"),
        ({"preview_every_n_steps": -1}, "preview_every_n_steps: must be between 0 and 150"),
        ({"preview_every_n_steps": 2.5}, "preview_every_n_steps: must be an integer"),
        ({"preview_every_n_steps": True}, "preview_every_n_steps: must be an integer"),
        ({"preview_every_n_steps": "10"}, "preview_every_n_steps: must be an integer"),
        ({"samples_format": "bmp"}, "samples_format: must be one of png, jpg, webp"),
        ({"filename_pattern": ""}, "filename_pattern: must not be empty"),
        ({"filename_pattern": "  "}, "filename_pattern: must not be empty"),
        ({"filename_pattern": "[date]/[seed]"}, "filename_pattern: must not contain the path separator '/'"),
        ({"filename_pattern": "a\\b"}, "filename_pattern: must not contain the path separator"),
        ({"outdir": 5}, "outdir: must be text"),
        ({"sd_model_checkpoint": None}, "sd_model_checkpoint: must be text"),
        ({"ui_defaults": {"steps": 0}}, "ui_defaults.steps: must be between 1 and 150"),
        ({"ui_defaults": {"width": 500}}, "ui_defaults.width: must be a multiple of 8"),
        ({"ui_defaults": {"cfg_scale": 31}}, "ui_defaults.cfg_scale: must be between 1 and 30"),
        ({"ui_defaults": {"sampler": "Nope"}}, "ui_defaults.sampler: unknown sampler"),
        ({"ui_defaults": {"scheduler": "Nope"}}, "ui_defaults.scheduler: unknown schedule type"),
        ({"ui_defaults": {"batch_size": "2"}}, "ui_defaults.batch_size: must be an integer"),
        ({"ui_defaults": {"bogus": 1}}, "ui_defaults.bogus: unknown control"),
        ({"ui_defaults": "steps=20"}, "ui_defaults: must be an object"),
        ({"no_such_setting": 1}, "no_such_setting: unknown setting"),
    ],
)
def test_invalid_values_name_the_key_and_write_nothing(
    config: Path, changes: dict[str, object], message: str
) -> None:
    store = SettingsStore(config)
    store.update({"outdir": "before"})
    before = config.read_bytes()

    with pytest.raises(ParamError) as raised:
        store.update({"outdir": "after", **changes})

    assert str(raised.value).startswith(message)
    assert config.read_bytes() == before
    assert store.current.outdir == "before"


# --- atomic writes and backup -------------------------------------------------------------------------


def test_a_failed_rename_leaves_the_old_file_and_no_temp(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SettingsStore(config)
    store.update({"outdir": "first"})
    store.update({"outdir": "second"})
    before = {name: (config.parent / name).read_bytes() for name in files_in(config.parent)}

    def refuse_replace(source: object, destination: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(settings_module.os, "replace", refuse_replace)
    with pytest.raises(OSError, match="disk full"):
        store.update({"outdir": "third"})
    monkeypatch.undo()

    assert {name: (config.parent / name).read_bytes() for name in files_in(config.parent)} == before
    assert store.current.outdir == "second"
    assert SettingsStore(config).load().outdir == "second"


def test_failure_on_the_final_rename_keeps_the_old_file(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SettingsStore(config)
    store.update({"outdir": "first"})
    before = config.read_bytes()
    real_replace = os.replace

    def refuse_config(source: str, destination: str) -> None:
        if Path(destination) == config:
            raise OSError("power cut")
        real_replace(source, destination)

    monkeypatch.setattr(settings_module.os, "replace", refuse_config)
    with pytest.raises(OSError, match="power cut"):
        store.update({"outdir": "second"})
    monkeypatch.undo()

    assert config.read_bytes() == before
    assert files_in(config.parent) == ["config.json", "config.json.bak"]


def test_the_previous_file_is_kept_as_bak(config: Path) -> None:
    store = SettingsStore(config)
    store.update({"outdir": "first"})
    assert not config.with_name("config.json.bak").exists()
    first_bytes = config.read_bytes()
    store.update({"outdir": "second"})
    assert config.with_name("config.json.bak").read_bytes() == first_bytes
    assert read_json(config)["outdir"] == "second"


def test_concurrent_updates_leave_a_valid_file(config: Path) -> None:
    store = SettingsStore(config)
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for step in range(15):
                store.update({"preview_every_n_steps": offset + step})
        except BaseException as error:  # re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(offset,)) for offset in (0, 50, 100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert read_json(config)["preview_every_n_steps"] == store.current.preview_every_n_steps
    assert [name for name in files_in(config.parent) if name.endswith(".tmp")] == []


# --- damaged files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["", "{\"outdir\": \"x\",", "[1, 2, 3]", "\x00\x00\x00\x00"])
def test_corrupt_file_is_quarantined_and_defaults_used(
    config: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    config.parent.mkdir(parents=True)
    config.write_text(damage, encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger=settings_module.__name__):
        settings = SettingsStore(config).load()

    assert settings == UserSettings()
    quarantined = [name for name in files_in(config.parent) if name.startswith("config.json.corrupt-")]
    assert len(quarantined) == 1
    assert (config.parent / quarantined[0]).read_text(encoding="utf-8") == damage
    assert not config.exists()
    assert "corrupt" in caplog.text


def test_corrupt_file_falls_back_to_the_bak_and_restores_it(config: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SettingsStore(config)
    store.update({"outdir": "good"})
    store.update({"outdir": "newer"})  # .bak now holds "good"
    config.write_bytes(b"{\"outdir\": \"newer\", \"samples_f")  # a crash mid-write by another program

    with caplog.at_level(logging.WARNING, logger=settings_module.__name__):
        settings = SettingsStore(config).load()

    assert settings.outdir == "good"
    assert read_json(config)["outdir"] == "good"
    assert "restored" in caplog.text
    assert SettingsStore(config).load().outdir == "good"


def test_corrupt_file_and_corrupt_bak_give_defaults(config: Path) -> None:
    config.parent.mkdir(parents=True)
    config.write_text("{oops", encoding="utf-8")
    config.with_name("config.json.bak").write_text("also broken", encoding="utf-8")
    assert SettingsStore(config).load() == UserSettings()


def test_two_corruptions_keep_both_quarantined_files(config: Path) -> None:
    config.parent.mkdir(parents=True)
    for damage in ("first damage", "second damage"):
        config.write_text(damage, encoding="utf-8")
        SettingsStore(config).load()
    quarantined = [name for name in files_in(config.parent) if name.startswith("config.json.corrupt-")]
    contents = sorted((config.parent / name).read_text(encoding="utf-8") for name in quarantined)
    assert contents == ["first damage", "second damage"]


def test_wrong_types_fall_back_per_key_with_a_warning(config: Path, caplog: pytest.LogCaptureFixture) -> None:
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({
        "outdir": ["not", "text"],
        "samples_format": "jpg",
        "preview_every_n_steps": "often",
        "filename_pattern": "[seed]-[steps]",
        "ui_defaults": {"steps": "many", "width": 640, "sampler": "Euler a", "height": 100000},
    }), encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger=settings_module.__name__):
        settings = SettingsStore(config).load()

    assert settings.outdir == "" and settings.preview_every_n_steps == 10
    assert settings.samples_format == "jpg" and settings.filename_pattern == "[seed]-[steps]"
    assert settings.ui_defaults["steps"] == 20 and settings.ui_defaults["height"] == 512
    assert settings.ui_defaults["width"] == 640 and settings.ui_defaults["sampler"] == "Euler a"
    for key in ("outdir", "preview_every_n_steps", "ui_defaults.steps", "ui_defaults.height"):
        assert key in caplog.text
    assert config.exists()  # a bad value is not a corrupt file


def test_unknown_keys_are_kept_and_written_back(config: Path) -> None:
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({
        "outdir": "x",
        "sd_vae": "Automatic",
        "some_extension_setting": [1, {"nested": True}],
        "ui_defaults": {"steps": 30, "hires_steps": 12},
    }), encoding="utf-8")
    store = SettingsStore(config)
    assert store.load().outdir == "x"

    store.update({"preview_every_n_steps": 3, "ui_defaults": {"width": 1024}})

    on_disk = read_json(config)
    assert on_disk["sd_vae"] == "Automatic"
    assert on_disk["some_extension_setting"] == [1, {"nested": True}]
    assert on_disk["ui_defaults"] == {**DEFAULT_UI_DEFAULTS, "steps": 30, "width": 1024, "hires_steps": 12}
    assert "hires_steps" not in store.current.ui_defaults
    assert on_disk["preview_every_n_steps"] == 3
