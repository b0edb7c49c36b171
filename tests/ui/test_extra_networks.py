"""The extra-networks cards without a browser: what each card shows and inserts, built from real files in A1111's
folders (LoRA safetensors with kohya metadata, previews, `<stem>.json` sidecars, embeddings, styles.csv), the sidecar
editor's file on disk, the preview route's refusals, and the paste rules (styles extracted, LoRA names by hash)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.fixtures.network_files import SDXL_METADATA, write_embedding, write_lora, write_preview, write_sidecar
from webui.app.network_cards import CHECKPOINTS, LORA, STYLES, TEXTUAL_INVERSION, NetworkCards
from webui.core.infotext import parse_infotext
from webui.core.params import ParamError
from webui.core.styles import Style, StyleDatabase
from webui.engine.model_registry import ModelRegistry
from webui.engine.networks.registry import LoraRegistry
from webui.ui.extra_networks import PREVIEW_ROUTE, preview_endpoint, preview_url, render_cards
from webui.ui.paste import restore_styles_and_networks

TAGS = {"img/10_fox": {"fox": 12, "snow": 5, "red fur": 3}, "img/5_winter": {"snow": 9, "tree": 2}}


@pytest.fixture()
def data_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A data folder laid out as A1111's: models/Stable-diffusion (tiny SD1 files), models/Lora, embeddings."""
    data = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data / "models" / "Stable-diffusion")
    lora = data / "models" / "Lora"
    fox = write_lora(lora / "fox_style.safetensors", {
        "ss_output_name": "foxy", "ss_sd_model_name": "v1-5-pruned.safetensors", "ss_resolution": "(512, 512)",
        "ss_network_module": "networks.lora", "ss_num_train_images": "40", "ss_tag_frequency": TAGS,
        "ss_training_started_at": "1700000000.5",
    }, seed=1)
    write_preview(lora / "fox_style.preview.png")
    write_sidecar(fox, {"activation text": "fox ears", "preferred weight": 0.7, "negative text": "human",
                        "description": "A red fox look", "notes": "keep me", "custom key": [1, 2]})
    os.utime(fox, (1_000_000, 1_000_000))
    plain = write_lora(lora / "characters" / "anime" / "plain.safetensors", {"ss_sd_model_name": "v1-5"}, seed=2)
    write_preview(lora / "characters" / "anime" / "plain.png", color=(10, 200, 10))
    os.utime(plain, (3_000_000, 3_000_000))
    xl = write_lora(lora / "aaa_xl_detail.safetensors", SDXL_METADATA, seed=3)
    os.utime(xl, (5_000_000, 5_000_000))
    embeddings = data / "embeddings"
    write_embedding(embeddings / "bad_hands.safetensors", width=768)
    write_embedding(embeddings / "sub" / "xl_neg.safetensors", sdxl=True)
    write_preview(embeddings / "bad_hands.preview.png")
    (data / "styles.csv").write_text(
        "name,prompt,negative_prompt\n"
        "Cinematic,\"cinematic still of {prompt}, film grain\",\"cartoon, drawing\"\n"
        "Sharp,\"sharp focus\",\"blurry\"\n",
        encoding="utf-8",
    )
    return data


def make_cards(data_dir: Path, loaded: str | None = "tiny.safetensors",
               misfits: dict[str, str] | None = None) -> NetworkCards:
    models = data_dir / "models"
    return NetworkCards(
        ModelRegistry([models / "Stable-diffusion"]),
        LoraRegistry([models / "Lora", models / "LyCORIS"]),
        [data_dir / "embeddings", models / "embeddings"],
        StyleDatabase(data_dir / "styles.csv"),
        loaded_checkpoint=lambda: (loaded, None) if loaded else None,
        embedding_misfits=lambda: misfits or {},
    )


def by_name(cards: NetworkCards, kind: str) -> dict[str, object]:
    return {card.name: card for card in cards.listing(kind).cards}


def test_lora_cards_insert_the_alias_preferred_weight_activation_and_negative_text(data_dir: Path) -> None:
    cards = by_name(make_cards(data_dir), LORA)
    assert set(cards) == {"fox_style", "plain", "aaa_xl_detail"}
    fox, plain = cards["fox_style"], cards["plain"]
    # ss_output_name is the name the tag uses (A1111's "Alias from file"); the sidecar gives weight and texts.
    assert fox.prompt_text == "<lora:foxy:0.7> fox ears"
    assert fox.negative_text == "(human:1)"
    assert fox.description == "A red fox look"
    # No sidecar: the default multiplier 1, nothing for the negative prompt.
    assert plain.prompt_text == "<lora:plain:1>"
    assert plain.negative_text == ""
    assert plain.folder == "characters/anime"
    assert "fox ears" in fox.search_text and "foxy" in fox.search_text


def test_an_alias_that_names_another_file_is_not_used(data_dir: Path) -> None:
    write_lora(data_dir / "models" / "Lora" / "foxy.safetensors", seed=9)
    cards = by_name(make_cards(data_dir), LORA)
    # "foxy" now is a file of its own: the tag must name fox_style by its stem to find it again.
    assert cards["fox_style"].prompt_text == "<lora:fox_style:0.7> fox ears"
    assert cards["foxy"].prompt_text == "<lora:foxy:1>"


def test_previews_are_found_as_a1111_and_served_from_inside_the_folder_only(data_dir: Path) -> None:
    cards = make_cards(data_dir)
    lora = by_name(cards, LORA)
    assert preview_url(lora["fox_style"]).startswith(f"{PREVIEW_ROUTE}/lora/0/fox_style.preview.png?v=")
    assert preview_url(lora["plain"]).startswith(f"{PREVIEW_ROUTE}/lora/0/characters/anime/plain.png?v=")
    assert preview_url(lora["aaa_xl_detail"]) is None
    assert preview_url(by_name(cards, TEXTUAL_INVERSION)["bad_hands"]).startswith(
        f"{PREVIEW_ROUTE}/textual_inversion/0/bad_hands.preview.png")

    outside = data_dir / "secret.png"
    write_preview(outside)
    (data_dir / "models" / "Lora" / "link.png").symlink_to(outside)
    app = FastAPI()
    app.add_api_route(f"{PREVIEW_ROUTE}/{{kind}}/{{root}}/{{path:path}}", preview_endpoint(cards), methods=["GET"])
    client = TestClient(app)
    good = client.get(f"{PREVIEW_ROUTE}/lora/0/characters/anime/plain.png")
    assert good.status_code == 200
    assert good.headers["content-type"] == "image/png"
    assert good.content == (data_dir / "models" / "Lora" / "characters" / "anime" / "plain.png").read_bytes()
    refused = [
        "lora/0/../../secret.png",           # climbs out of the folder
        "lora/0/%2E%2E/%2E%2E/secret.png",   # the same, encoded
        "lora/0/link.png",                   # a link inside that points outside
        "lora/0/fox_style.json",             # inside, but not a picture
        "lora/0/fox_style.safetensors",
        "lora/7/plain.png",                  # no such folder
        "outputs/0/plain.png",               # no such kind
        "lora/0/missing.png",
    ]
    for path in refused:
        response = client.get(f"{PREVIEW_ROUTE}/{path}")
        assert response.status_code == 404, path
    # HTTP clients may normalise `..` away before sending; the resolver refuses it when a raw request carries it.
    assert cards.preview_file(LORA, 0, "../../secret.png") is None
    assert cards.preview_file(LORA, 0, "characters/../../../secret.png") is None
    assert cards.preview_file(LORA, 0, str(outside)) is None
    assert cards.preview_file(LORA, 0, "plain.png\x00.png") is None


def test_networks_of_another_family_are_marked_and_listed_last(data_dir: Path) -> None:
    cards = make_cards(data_dir, misfits={"xl_neg": "made for another model family than SD 1.x"})
    listing = cards.listing(LORA)
    assert listing.loaded_version == "SD1"
    xl = next(card for card in listing.cards if card.name == "aaa_xl_detail")
    assert xl.sd_version == "SDXL" and not listing.fits(xl)
    # By name "aaa_…" would come first, by date it is the newest: it is last either way.
    assert [card.name for card in listing.order_by_name()] == ["fox_style", "plain", "aaa_xl_detail"]
    assert [card.name for card in listing.order_by_date()] == ["plain", "fox_style", "aaa_xl_detail"]
    page = render_cards(listing)
    marked = re.findall(r'<div class="en-card en-incompatible"[^>]*data-id="([^"]+)"', page)
    assert marked == ["0/aaa_xl_detail.safetensors"]
    assert "1 made for another family than the loaded SD1" in page

    embeddings = cards.listing(TEXTUAL_INVERSION)
    versions = {card.name: (card.sd_version, embeddings.fits(card)) for card in embeddings.cards}
    assert versions == {"bad_hands": ("SD1", True), "xl_neg": ("SDXL", False)}

    # Nothing loaded yet: nothing can be judged, nothing is marked.
    unloaded = make_cards(data_dir, loaded=None).listing(LORA)
    assert all(unloaded.fits(card) for card in unloaded.cards)
    assert "en-incompatible" not in render_cards(unloaded)


def test_the_rendered_grid_carries_sort_ranks_folders_and_escapes_file_texts(data_dir: Path) -> None:
    lora = data_dir / "models" / "Lora"
    hostile = write_lora(lora / 'x"><b>bold.safetensors', seed=5)
    write_sidecar(hostile, {"description": "<script>alert(1)</script>", "activation text": '"><img src=x>'})
    listing = make_cards(data_dir).listing(LORA)
    page = render_cards(listing)
    assert "<b>bold" not in page and "<script>" not in page and "<img src=x>" not in page
    assert "x&quot;&gt;&lt;b&gt;bold" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    cards = re.findall(r'<div class="en-card[^"]*" [^>]*>', page)
    assert len(cards) == 4
    ranks = {re.search(r'title="([^"]+)"', card).group(1): (re.search(r'data-rank-name="(\d+)"', card).group(1),
                                                            re.search(r'data-rank-date="(\d+)"', card).group(1))
             for card in cards}
    assert ranks["aaa_xl_detail"][0] == "3" and ranks["aaa_xl_detail"][1] == "3"
    assert 'data-folder="characters/anime"' in page
    assert listing.folders() == ["characters", "characters/anime"]
    assert 'data-prompt="&lt;lora:foxy:0.7&gt; fox ears" data-negative="(human:1)"' in page


def test_info_view_shows_kohya_training_metadata_and_top_tags(data_dir: Path) -> None:
    cards = make_cards(data_dir)
    details = cards.lora_details("0/fox_style.safetensors")
    training = dict(details.training)
    assert training["Base model"] == "v1-5-pruned.safetensors"
    assert training["Resolution"] == "512x512"
    assert training["Training images"] == "40"
    assert training["Network module"] == "networks.lora"
    assert training["Training started"] == "2023-11-14 22:13 UTC"
    # Counts summed over both dataset folders, most frequent first.
    assert details.top_tags == [("snow", 14), ("fox", 12), ("red fur", 3), ("tree", 2)]
    assert details.alias == "foxy" and details.sd_version == "SD1"
    assert dict(cards.lora_details("0/aaa_xl_detail.safetensors").training)["Base model version"] == "sdxl_base_v1-0"


def test_saving_the_sidecar_writes_the_json_file_and_keeps_other_keys(data_dir: Path) -> None:
    cards = make_cards(data_dir)
    sidecar = data_dir / "models" / "Lora" / "fox_style.json"
    cards.save_lora_metadata("0/fox_style.safetensors", "vulpine, orange", 0.45, "cat ears", "Updated")
    on_disk = json.loads(sidecar.read_text(encoding="utf-8"))
    assert on_disk["activation text"] == "vulpine, orange"
    assert on_disk["preferred weight"] == 0.45
    assert on_disk["negative text"] == "cat ears"
    assert on_disk["description"] == "Updated"
    assert on_disk["notes"] == "keep me" and on_disk["custom key"] == [1, 2]
    assert not [path.name for path in sidecar.parent.iterdir() if path.name.endswith(".tmp")]
    # The card inserts the new texts at once.
    assert by_name(cards, LORA)["fox_style"].prompt_text == "<lora:foxy:0.45> vulpine, orange"

    # A file without a sidecar gets one.
    cards.save_lora_metadata("0/characters/anime/plain.safetensors", "green", 0, "", "")
    assert json.loads((data_dir / "models" / "Lora" / "characters" / "anime" / "plain.json").read_text())[
        "activation text"] == "green"

    before = sidecar.read_bytes()
    with pytest.raises(ParamError, match="preferred weight"):
        cards.save_lora_metadata("0/fox_style.safetensors", "x", float("nan"), "", "")
    with pytest.raises(ParamError, match="no longer in the Lora folders"):
        cards.save_lora_metadata("0/gone.safetensors", "x", 1.0, "", "")
    assert sidecar.read_bytes() == before


def test_checkpoint_embedding_and_style_cards(data_dir: Path) -> None:
    cards = make_cards(data_dir)
    checkpoints = by_name(cards, CHECKPOINTS)
    assert set(checkpoints) == {"tiny", "tiny_b"}
    assert checkpoints["tiny"].id == "tiny.safetensors" and checkpoints["tiny"].sd_version == "SD1"
    assert checkpoints["tiny"].prompt_text == ""  # a checkpoint card switches the model, it inserts nothing
    embeddings = by_name(cards, TEXTUAL_INVERSION)
    assert embeddings["bad_hands"].prompt_text == "bad_hands"
    assert embeddings["xl_neg"].folder == "sub"
    styles = by_name(cards, STYLES)
    assert list(styles) == ["Cinematic", "Sharp"]
    assert styles["Cinematic"].style_prompt == "cinematic still of {prompt}, film grain"

    # A second styles file adds a divider to the database; it is no card.
    (data_dir / "more.csv").write_text("name,prompt,negative_prompt\nMoody,dark,\n", encoding="utf-8")
    two_files = NetworkCards(ModelRegistry([]), LoraRegistry([]), [], StyleDatabase([data_dir / "styles.csv",
                             data_dir / "more.csv"]), loaded_checkpoint=lambda: None)
    assert [card.name for card in two_files.listing(STYLES).cards] == ["Cinematic", "Sharp", "Moody"]


def test_refresh_lists_new_files(data_dir: Path) -> None:
    cards = make_cards(data_dir)
    assert "new_one" not in by_name(cards, LORA)
    write_lora(data_dir / "models" / "Lora" / "new_one.safetensors", seed=11)
    assert "new_one" in {card.name for card in cards.listing(LORA, refresh=True).cards}


def test_pasting_extracts_styles_and_finds_loras_by_hash(data_dir: Path) -> None:
    cards = make_cards(data_dir)
    styles = StyleDatabase(data_dir / "styles.csv")
    registry = LoraRegistry([data_dir / "models" / "Lora"])
    plain_hash = registry.short_hash(next(file for file in registry.files() if file.name == "plain"))
    prompt, negative = styles.apply("<lora:their_name:0.8> a fox", "ugly", ["Sharp", "Cinematic"])
    assert prompt == "cinematic still of <lora:their_name:0.8> a fox, sharp focus, film grain"
    infotext = (f"{prompt}\nNegative prompt: {negative}\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, "
                f'Size: 64x64, Lora hashes: "their_name: {plain_hash}"')

    restored, found = restore_styles_and_networks(parse_infotext(infotext), styles, cards.lora_name_by_hash)

    assert restored.prompt == "<lora:plain:0.8> a fox"
    assert restored.negative_prompt == "ugly"
    # A1111 lists the found styles in reverse discovery order.
    assert found == ["Sharp", "Cinematic"]
    # A hash nobody here has, and no styles: the prompt stays as pasted.
    unknown = parse_infotext('a fox <lora:x:1>\nSteps: 4, Sampler: Euler, Seed: 1, Lora hashes: "x: 0123456789ab"')
    same, none_found = restore_styles_and_networks(unknown, styles, cards.lora_name_by_hash)
    assert same.prompt == "a fox <lora:x:1>" and none_found == []


def test_style_database_edits_round_trip_through_the_file(data_dir: Path) -> None:
    styles = StyleDatabase(data_dir / "styles.csv")
    styles.save_style(Style("Noir", "black and white, {prompt}", "color"))
    assert "Noir,\"black and white, {prompt}\",color" in (data_dir / "styles.csv").read_text(encoding="utf-8-sig")
    assert styles.delete_style("Sharp")
    reread = StyleDatabase(data_dir / "styles.csv")
    assert [style.name for style in reread.styles()] == ["Cinematic", "Noir"]
