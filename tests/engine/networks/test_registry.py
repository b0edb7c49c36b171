"""LoraRegistry over real folders: A1111's names, aliases and walk order, metadata read from headers, addnet hashes,
broken files, the <stem>.json sidecar and preview files. Real safetensors files in A1111's models/Lora layout."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from webui.engine.model_registry import FileHasher
from webui.engine.networks.registry import (
    SDXL,
    LoraRegistry,
    NetworkFile,
    UserMetadata,
    addnet_hash,
    effective_sd_version,
    preview_path,
    read_safetensors_metadata,
    read_user_metadata,
    write_user_metadata,
)

KOHYA_KEYS = ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight")


def write_lora(path: Path, metadata: dict[str, str] | None = None, seed: int = 0) -> Path:
    """A small kohya-layout LoRA file with the given `__metadata__`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {key: rng.standard_normal((4, 4)).astype(np.float32) for key in KOHYA_KEYS}
    save_file(tensors, str(path), metadata=metadata)
    return path


def independent_addnet_hash(path: Path) -> str:
    """sha256 of the bytes after the 8-byte length and the header, computed here from the raw file."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + length:]).hexdigest()


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "webui"


def lora_dir(data_dir: Path) -> Path:
    return data_dir / "models" / "Lora"


def registry_for(data_dir: Path, hasher: FileHasher | None = None) -> LoraRegistry:
    return LoraRegistry([data_dir / "models" / "Lora", data_dir / "models" / "LyCORIS"], hasher)


# -- discovery and names ---------------------------------------------------------------------------------------------


def test_scan_lists_safetensors_in_lora_and_lycoris_recursively_with_names_folders_and_metadata(data_dir: Path) -> None:
    write_lora(lora_dir(data_dir) / "detail.safetensors", {
        "ss_output_name": "add_detail", "ss_network_module": "networks.lora", "ss_sd_model_name": "v1-5.ckpt",
        "ss_tag_frequency": json.dumps({"img": {"1girl": 12, "solo": 7}}), "ss_resolution": "(512, 512)",
    })
    write_lora(lora_dir(data_dir) / "styles" / "anime" / "ink.safetensors")
    write_lora(data_dir / "models" / "LyCORIS" / "loha_thing.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    # Listed by A1111 but never loadable here: not offered.
    (lora_dir(data_dir) / "old.pt").write_bytes(b"\x80\x02}q\x00.")
    (lora_dir(data_dir) / "detail.png").write_bytes(b"not really a png")

    files = {file.name: file for file in registry_for(data_dir).scan()}

    assert sorted(files) == ["detail", "ink", "loha_thing"]
    detail = files["detail"]
    assert detail.alias == "add_detail"
    assert detail.path == (lora_dir(data_dir) / "detail.safetensors").resolve()
    assert detail.folder == "" and files["ink"].folder == "styles/anime"
    # JSON-looking strings are decoded; A1111's key order puts the model name and resolution first.
    assert detail.metadata["ss_tag_frequency"] == {"img": {"1girl": 12, "solo": 7}}
    assert detail.metadata["ss_resolution"] == "(512, 512)"
    assert list(detail.metadata)[:2] == ["ss_sd_model_name", "ss_resolution"]
    assert detail.sd_version == "SD1" and detail.error is None
    assert files["ink"].alias == "ink" and files["ink"].metadata == {} and files["ink"].sd_version == "Unknown"
    assert files["loha_thing"].sd_version == SDXL
    assert detail.size == detail.path.stat().st_size


@pytest.mark.parametrize(("metadata", "version"), [
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "SDXL"),
    ({"ss_v2": "True", "ss_base_model_version": "sd_v2"}, "SD2"),
    ({"ss_v2": "False"}, "SD1"),
    ({"modelspec.title": "x"}, "SD1"),
    (None, "Unknown"),
])
def test_sd_version_is_detected_from_training_metadata(data_dir: Path, metadata: dict[str, str] | None,
                                                       version: str) -> None:
    write_lora(lora_dir(data_dir) / "net.safetensors", metadata)
    (file,) = registry_for(data_dir).scan()
    assert file.sd_version == version


def test_sidecar_sd_version_overrides_the_files_own(data_dir: Path) -> None:
    write_lora(lora_dir(data_dir) / "net.safetensors", {"ss_v2": "False"})
    (file,) = registry_for(data_dir).scan()
    assert effective_sd_version(file, UserMetadata(sd_version="SDXL")) == "SDXL"
    assert effective_sd_version(file, UserMetadata(sd_version="")) == "SD1"
    assert effective_sd_version(file, UserMetadata(sd_version="garbage")) == "SD1"


def test_same_stem_in_two_folders_the_later_in_walk_order_wins(data_dir: Path) -> None:
    first = write_lora(lora_dir(data_dir) / "a" / "same.safetensors", {"ss_output_name": "from_a"})
    second = write_lora(lora_dir(data_dir) / "b" / "same.safetensors", {"ss_output_name": "from_b"})
    registry = registry_for(data_dir)
    files = registry.scan()
    assert [file.path for file in files] == [second.resolve()]
    assert registry.resolve("same").path == second.resolve()
    assert first.exists()


def test_walk_order_is_natural_folders_then_files(data_dir: Path) -> None:
    for name in ("net10", "net2", "Net1"):
        write_lora(lora_dir(data_dir) / f"{name}.safetensors")
    write_lora(lora_dir(data_dir) / "sub10" / "x.safetensors", {"ss_output_name": "in_sub10"})
    write_lora(lora_dir(data_dir) / "sub9" / "x.safetensors", {"ss_output_name": "in_sub9"})
    registry = registry_for(data_dir)
    assert [file.name for file in registry.scan()] == ["Net1", "net2", "net10", "x"]
    # sub9 is walked before sub10, so sub10's x is the one that stays.
    assert registry.resolve("x").alias == "in_sub10"


def test_a_file_reached_twice_is_listed_once_and_a_link_loop_does_not_hang(data_dir: Path) -> None:
    write_lora(lora_dir(data_dir) / "deep" / "net.safetensors")
    os.symlink(lora_dir(data_dir), lora_dir(data_dir) / "deep" / "loop")
    registry = LoraRegistry([lora_dir(data_dir), lora_dir(data_dir) / "deep"])
    assert [file.name for file in registry.scan()] == ["net"]


def test_resolve_by_stem_then_alias_case_sensitively(data_dir: Path) -> None:
    write_lora(lora_dir(data_dir) / "detail_v2.safetensors", {"ss_output_name": "AddDetail"})
    registry = registry_for(data_dir)
    assert registry.resolve("detail_v2").name == "detail_v2"
    assert registry.resolve("AddDetail").name == "detail_v2"
    assert registry.resolve("adddetail") is None
    assert registry.resolve("Detail_v2") is None
    assert registry.preferred_name(registry.resolve("detail_v2")) == "AddDetail"
    assert registry.preferred_name(registry.resolve("detail_v2"), use_filename=True) == "detail_v2"


def test_a_shared_alias_is_forbidden_and_those_names_resolve_by_file_name_only(data_dir: Path) -> None:
    write_lora(lora_dir(data_dir) / "one.safetensors", {"ss_output_name": "style"})
    write_lora(lora_dir(data_dir) / "two.safetensors", {"ss_output_name": "style"})
    write_lora(lora_dir(data_dir) / "style.safetensors")
    write_lora(lora_dir(data_dir) / "three.safetensors", {"ss_output_name": "Two"})
    registry = registry_for(data_dir)
    registry.scan()
    # "style" is ambiguous: only the file called style.safetensors answers to it.
    assert registry.resolve("style").path.name == "style.safetensors"
    assert registry.is_alias_forbidden("STYLE")
    assert registry.preferred_name(registry.resolve("one")) == "one"
    # An alias differing from a stem only in case is no clash (lookups are case-sensitive).
    assert registry.resolve("Two").name == "three" and registry.resolve("two").name == "two"


def test_none_is_looked_up_by_file_name_only(data_dir: Path) -> None:
    write_lora(lora_dir(data_dir) / "empty_net.safetensors", {"ss_output_name": "none"})
    registry = registry_for(data_dir)
    assert registry.resolve("none") is None
    assert registry.resolve("empty_net") is not None


def test_a_name_not_found_rescans_the_folders_once(data_dir: Path) -> None:
    write_lora(lora_dir(data_dir) / "first.safetensors")
    registry = registry_for(data_dir)
    assert [file.name for file in registry.files()] == ["first"]
    write_lora(lora_dir(data_dir) / "later" / "added.safetensors", {"ss_output_name": "added_alias"})
    found = registry.resolve_all(["first", "added", "added_alias", "missing"])
    assert found["added"] is not None and found["added"].folder == "later"
    assert found["added_alias"] is found["added"] or found["added_alias"].path == found["added"].path
    assert found["missing"] is None and found["first"] is not None
    assert [file.name for file in registry.files()] == ["first", "added"]


def test_refresh_sees_removed_and_changed_files(data_dir: Path) -> None:
    path = write_lora(lora_dir(data_dir) / "net.safetensors", {"ss_output_name": "old"})
    gone = write_lora(lora_dir(data_dir) / "gone.safetensors")
    registry = registry_for(data_dir)
    assert {file.alias for file in registry.scan()} == {"old", "gone"}
    gone.unlink()
    write_lora(path, {"ss_output_name": "new_name_of_a_longer_length"})
    assert [file.alias for file in registry.refresh()] == ["new_name_of_a_longer_length"]
    assert registry.resolve("old") is None


# -- broken files ----------------------------------------------------------------------------------------------------


def test_broken_files_are_listed_with_the_reason_and_never_stop_the_scan(data_dir: Path) -> None:
    folder = lora_dir(data_dir)
    good = write_lora(folder / "b_good.safetensors", {"ss_output_name": "good"})
    folder.joinpath("a_empty.safetensors").write_bytes(b"")
    folder.joinpath("c_pickle.safetensors").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    folder.joinpath("d_not_json.safetensors").write_bytes(struct.pack("<Q", 6) + b"{oops}")
    truncated = folder / "e_truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-20])
    folder.joinpath("f_huge_header.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")

    files = {file.name: file for file in registry_for(data_dir).scan()}

    assert sorted(files) == ["a_empty", "b_good", "c_pickle", "d_not_json", "e_truncated", "f_huge_header"]
    assert files["b_good"].error is None and files["b_good"].alias == "good"
    assert "empty" in files["a_empty"].error
    assert "pickle" in files["c_pickle"].error
    assert "not a valid safetensors" in files["d_not_json"].error
    assert "truncated" in files["e_truncated"].error
    assert "header length" in files["f_huge_header"].error
    for name in ("a_empty", "c_pickle", "d_not_json", "e_truncated"):
        assert files[name].metadata == {} and files[name].sd_version == "Unknown" and files[name].alias == name


def test_metadata_is_read_from_the_header_alone(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "net.safetensors", {"ss_output_name": "x", "ss_bucket_info": "{not json"})
    metadata = read_safetensors_metadata(path)
    # A string that only looks like JSON stays a string, as in A1111.
    assert metadata == {"ss_output_name": "x", "ss_bucket_info": "{not json"}


# -- hashes ----------------------------------------------------------------------------------------------------------


def test_short_hash_is_a1111s_addnet_hash_and_ignores_metadata_edits(data_dir: Path) -> None:
    path = write_lora(lora_dir(data_dir) / "net.safetensors", {"ss_output_name": "a"}, seed=3)
    expected = independent_addnet_hash(path)
    assert addnet_hash(path) == expected
    registry = registry_for(data_dir)
    (file,) = registry.scan()
    assert registry.cached_short_hash(file) is None
    assert registry.short_hash(file) == expected[:12]
    assert registry.cached_short_hash(file) == expected[:12]
    write_lora(path, {"ss_output_name": "renamed", "ss_comment": "more metadata, longer header"}, seed=3)
    (edited,) = registry.refresh()
    assert registry.short_hash(edited) == expected[:12]


def test_sshs_model_hash_from_the_metadata_is_used_without_reading_the_file(data_dir: Path) -> None:
    embedded = "ABCDEF0123456789" + "0" * 48
    write_lora(lora_dir(data_dir) / "net.safetensors", {"sshs_model_hash": embedded})
    registry = registry_for(data_dir)
    (file,) = registry.scan()
    assert registry.cached_short_hash(file) == "abcdef012345"
    assert registry.by_short_hash("abcdef012345", compute_missing=False) is file


def test_hashes_are_cached_on_disk_per_file_version(data_dir: Path) -> None:
    path = write_lora(lora_dir(data_dir) / "net.safetensors", seed=1)
    cache = data_dir / "cache" / "lora-hashes.json"
    first = registry_for(data_dir, FileHasher(cache, digest=addnet_hash))
    (file,) = first.scan()
    short = first.short_hash(file)
    assert cache.is_file()
    # A new process (a fresh registry on the same cache file) knows it without hashing.
    second = registry_for(data_dir, FileHasher(cache, digest=addnet_hash))
    (again,) = second.scan()
    assert second.cached_short_hash(again) == short
    # Another version of the file is not taken for the old one.
    write_lora(path, seed=2)
    (changed,) = second.refresh()
    assert second.cached_short_hash(changed) is None
    assert second.short_hash(changed) == independent_addnet_hash(path)[:12] != short


def test_by_short_hash_finds_a_file_under_any_name(data_dir: Path) -> None:
    paths = [write_lora(lora_dir(data_dir) / f"net{index}.safetensors", seed=index) for index in range(3)]
    registry = registry_for(data_dir)
    wanted = independent_addnet_hash(paths[2])[:12]
    # Never hashed yet: found only when hashing is allowed.
    assert registry.by_short_hash(wanted, compute_missing=False) is None
    found = registry.by_short_hash(wanted.upper())
    assert found is not None and found.name == "net2"
    assert registry.by_short_hash(wanted, compute_missing=False).name == "net2"
    assert registry.by_short_hash("0123456789ab") is None
    assert registry.by_short_hash("") is None


# -- sidecars and previews -------------------------------------------------------------------------------------------


def lora_file(data_dir: Path, name: str = "net") -> NetworkFile:
    write_lora(lora_dir(data_dir) / f"{name}.safetensors")
    return registry_for(data_dir).resolve(name)


def test_user_metadata_defaults_without_a_sidecar(data_dir: Path) -> None:
    meta = read_user_metadata(lora_file(data_dir))
    assert meta == UserMetadata()


def test_user_metadata_round_trips_in_a1111s_layout_and_keeps_other_keys(data_dir: Path) -> None:
    file = lora_file(data_dir)
    sidecar = lora_dir(data_dir) / "net.json"
    sidecar.write_text(json.dumps({"description": "old", "notes": "n", "made by": "another editor"}), "utf-8")
    meta = read_user_metadata(file)
    assert meta.description == "old" and meta.notes == "n" and meta.extra == {"made by": "another editor"}
    written = write_user_metadata(file, UserMetadata(
        description="Adds détail", sd_version="SD1", activation_text="detailed, intricate", preferred_weight=0.7,
        negative_text="blurry", notes="from civitai", extra=meta.extra,
    ))
    assert written == sidecar
    on_disk = json.loads(sidecar.read_text("utf-8"))
    assert on_disk == {
        "description": "Adds détail", "notes": "from civitai", "made by": "another editor", "sd version": "SD1",
        "activation text": "detailed, intricate", "preferred weight": 0.7, "negative text": "blurry",
    }
    assert "détail" in sidecar.read_text("utf-8")  # UTF-8 text, not \u escapes (A1111's ensure_ascii=False)
    again = read_user_metadata(file)
    assert (again.activation_text, again.preferred_weight, again.sd_version) == ("detailed, intricate", 0.7, "SD1")
    # Atomic write: only the sidecar is left beside the network, no temp file.
    assert sorted(path.name for path in lora_dir(data_dir).iterdir()) == ["net.json", "net.safetensors"]


def test_a_broken_sidecar_gives_defaults_with_the_reason(data_dir: Path) -> None:
    file = lora_file(data_dir)
    (lora_dir(data_dir) / "net.json").write_text("{broken", "utf-8")
    meta = read_user_metadata(file)
    assert meta.activation_text == "" and meta.preferred_weight == 0.0
    assert meta.error is not None and "net.json" in meta.error
    (lora_dir(data_dir) / "net.json").write_text('["a list"]', "utf-8")
    assert "not a JSON object" in read_user_metadata(file).error
    (lora_dir(data_dir) / "net.json").write_text('{"preferred weight": "0.5", "activation text": 3}', "utf-8")
    meta = read_user_metadata(file)
    assert meta.preferred_weight == 0.5 and meta.activation_text == "" and meta.error is None


def test_description_falls_back_to_a_text_file(data_dir: Path) -> None:
    file = lora_file(data_dir)
    (lora_dir(data_dir) / "net.description.txt").write_text("from the txt", "utf-8")
    assert read_user_metadata(file).description == "from the txt"
    (lora_dir(data_dir) / "net.txt").write_text("plain txt first", "utf-8")
    assert read_user_metadata(file).description == "plain txt first"
    (lora_dir(data_dir) / "net.json").write_text(json.dumps({"description": "sidecar wins"}), "utf-8")
    assert read_user_metadata(file).description == "sidecar wins"


def test_preview_follows_a1111s_order(data_dir: Path) -> None:
    file = lora_file(data_dir, "my.net")
    folder = lora_dir(data_dir)
    assert preview_path(file) is None
    folder.joinpath("my.net.jpg").write_bytes(b"jpg")
    assert preview_path(file) == folder / "my.net.jpg"
    folder.joinpath("my.net.preview.png").write_bytes(b"png")
    assert preview_path(file) == folder / "my.net.preview.png"  # png before jpg, whatever the form
    folder.joinpath("my.net.png").write_bytes(b"png")
    assert preview_path(file) == folder / "my.net.png"  # <stem>.png before <stem>.preview.png
    other = lora_file(data_dir, "other")
    folder.joinpath("other.preview.avif").write_bytes(b"avif")
    assert preview_path(other) is None
    assert preview_path(other, extra_extensions=("avif",)) == folder / "other.preview.avif"
