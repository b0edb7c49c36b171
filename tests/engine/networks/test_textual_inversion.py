"""Textual inversion as A1111 does it: embedding files in their real layouts under an embeddings folder, refused
pickles, family fit, token counting and chunking, and images: an embedding equal to some words' token embeddings
gives exactly the image of those words (tiny SD 1.x and SDXL)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.cpu_models import load_on_cpu
from tests.fixtures.images import pixels
from webui.app.token_counter import TokenCounter
from webui.core.infotext import parse_infotext
from webui.core.params import GenerationParams
from webui.engine.clip_tokenizer import ClipTokenizer
from webui.engine.conditioning import CHUNK_LENGTH, ChunkFix, tokenize_prompt
from webui.engine.families import SD1, SDXL
from webui.engine.generate import GeneratedImage, PromptConditioning, generate
from webui.engine.model_manager import LoadedModel
from webui.engine.networks.textual_inversion import EmbeddingDatabase, EmbeddingLookup

VERSION = "webui-test"
SMALL = dict(width=64, height=64, steps=3, sampler="Euler a")
# Real model widths: SD 1.x CLIP-L 768, SDXL CLIP-L 768 + OpenCLIP-bigG 1280.
SD1_WIDTH, CLIP_G_WIDTH = 768, 1280


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def sd1(tiny_model_dir: Path) -> LoadedModel:
    return load_on_cpu(tiny_model_dir, "tiny")


@pytest.fixture(scope="module")
def sdxl(tiny_sd2_sdxl_dir: Path) -> LoadedModel:
    return load_on_cpu(tiny_sd2_sdxl_dir, "sdxl")


def vectors(count: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def save_a1111_pt(path: Path, tensor: torch.Tensor, step: int = 500) -> Path:
    """A1111's Embedding.save layout exactly (textual_inversion.py), the tensor still requiring grad."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": tensor.clone().requires_grad_(True)},
            "name": path.stem,
            "step": step,
            "sd_checkpoint": "81761151",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
        },
        path,
    )
    return path


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def bump_mtime(folder: Path) -> None:
    """Move the folder's mtime on by a second: a file added within the same clock tick keeps it unchanged."""
    stat = folder.stat()
    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


# --- formats -----------------------------------------------------------------------------------------------------


def test_every_format_loads_with_a1111s_fields(tmp_path: Path, tokenizer: ClipTokenizer) -> None:
    root = tmp_path / "embeddings"
    a1111 = save_a1111_pt(root / "a1111-style.pt", vectors(4, SD1_WIDTH))
    concept = root / "concepts" / "learned_embeds.bin"  # diffusers' textual-inversion output, in a subfolder
    concept.parent.mkdir(parents=True)
    torch.save({"<cat-toy>": vectors(1, SD1_WIDTH)[0]}, concept)
    kohya = save_safetensors(root / "kohya.safetensors", {"emb_params": vectors(2, SD1_WIDTH)})
    xl = save_safetensors(
        root / "xl-neg.safetensors", {"clip_l": vectors(3, SD1_WIDTH), "clip_g": vectors(3, CLIP_G_WIDTH, seed=1)}
    )

    database = EmbeddingDatabase([root])
    database.refresh(SD1, tokenizer)
    assert list(database.loaded) == ["a1111-style", "kohya", "learned_embeds"]  # sorted by name
    assert database.loaded["a1111-style"].api_fields() == {
        "step": 500, "sd_checkpoint": "81761151", "sd_checkpoint_name": "v1-5-pruned-emaonly",
        "shape": SD1_WIDTH, "vectors": 4,
    }
    assert database.loaded["learned_embeds"].api_fields() == {
        "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": SD1_WIDTH, "vectors": 1,
    }
    assert database.loaded["kohya"].vectors == 2
    torch.testing.assert_close(database.loaded["kohya"].vectors_for(None), vectors(2, SD1_WIDTH), rtol=0, atol=0)
    assert {name: embedding.short_hash for name, embedding in database.loaded.items()} == {
        "a1111-style": sha12(a1111), "kohya": sha12(kohya), "learned_embeds": sha12(concept),
    }
    assert list(database.skipped) == ["xl-neg"] and database.errors == {}

    database.refresh(SDXL, tokenizer)
    assert list(database.loaded) == ["xl-neg"]
    xl_embedding = database.loaded["xl-neg"]
    assert (xl_embedding.shape, xl_embedding.vectors, xl_embedding.short_hash) == (2048, 3, sha12(xl))
    torch.testing.assert_close(xl_embedding.vectors_for("clip_g"), vectors(3, CLIP_G_WIDTH, seed=1), rtol=0, atol=0)
    assert sorted(database.skipped) == ["a1111-style", "kohya", "learned_embeds"]


def test_pickles_that_need_full_unpickling_are_refused_and_the_rest_still_load(
    tmp_path: Path, tokenizer: ClipTokenizer
) -> None:
    root = tmp_path / "embeddings"
    root.mkdir()
    # The original textual-inversion repo's format: string_to_param is a torch.nn.ParameterDict.
    parameter_dict = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors(2, SD1_WIDTH))})
    torch.save({"string_to_param": parameter_dict, "step": 3000}, root / "old-repo.pt")
    # A pickle that would run code: loading it fully would create this folder.
    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.mkdir, (str(marker),)

    torch.save({"string_to_param": {"*": vectors(1, SD1_WIDTH)}, "extra": RunsCode()}, root / "evil.pt")
    save_a1111_pt(root / "good.pt", vectors(2, SD1_WIDTH))

    database = EmbeddingDatabase([root])
    database.refresh(SD1, tokenizer)
    assert list(database.loaded) == ["good"]
    assert set(database.errors) == {"old-repo.pt", "evil.pt"}
    assert "ParameterDict" in database.errors["old-repo.pt"] and "full unpickling" in database.errors["old-repo.pt"]
    assert "mkdir" in database.errors["evil.pt"] and "full unpickling" in database.errors["evil.pt"]
    assert not marker.exists()


def test_empty_files_other_files_and_unknown_contents(tmp_path: Path, tokenizer: ClipTokenizer) -> None:
    root = tmp_path / "embeddings"
    root.mkdir()
    (root / "downloading.safetensors").write_bytes(b"")  # 0 bytes: skipped without a word, as in A1111
    (root / "good.preview.png").write_bytes(b"\x89PNG")  # a card preview, not an embedding
    save_safetensors(root / "two-terms.safetensors", {"a": vectors(1, SD1_WIDTH), "b": vectors(1, SD1_WIDTH)})
    torch.save({"step": 10}, root / "no-tensor.bin")
    (root / "garbage.pt").write_bytes(b"not a torch file at all")
    save_safetensors(root / "good.safetensors", {"emb_params": vectors(1, SD1_WIDTH)})

    database = EmbeddingDatabase([root, tmp_path / "missing-folder"])
    database.refresh(SD1, tokenizer)
    assert list(database.loaded) == ["good"]
    assert sorted(database.errors) == ["garbage.pt", "no-tensor.bin", "two-terms.safetensors"]
    assert "not an embedding" in database.errors["two-terms.safetensors"]


def test_an_embedding_of_another_family_is_skipped_with_a_note(tmp_path: Path, tokenizer: ClipTokenizer) -> None:
    root = tmp_path / "embeddings"
    save_safetensors(root / "sd2-style.safetensors", {"emb_params": vectors(2, 1024)})
    save_safetensors(root / "sd1-style.safetensors", {"emb_params": vectors(2, SD1_WIDTH)})
    database = EmbeddingDatabase([root])
    database.refresh(SD1, tokenizer)
    assert list(database.loaded) == ["sd1-style"] and list(database.skipped) == ["sd2-style"]
    assert database.skipped["sd2-style"].api_fields()["shape"] == 1024
    assert "another model family" in database.skip_notes["sd2-style"] and "768" in database.skip_notes["sd2-style"]
    lookup = database.lookup
    assert lookup is not None
    # A skipped embedding is not matched: its name stays text.
    assert tokenize_prompt("sd2-style", tokenizer, embeddings=lookup).embeddings_used == ()
    assert tokenize_prompt("sd1-style", tokenizer, embeddings=lookup).embeddings_used == ("sd1-style",)


def test_rescan_when_the_folder_changes_and_hash_follows_the_file(tmp_path: Path, tokenizer: ClipTokenizer) -> None:
    root = tmp_path / "embeddings"
    first = save_safetensors(root / "first.safetensors", {"emb_params": vectors(1, SD1_WIDTH)})
    database = EmbeddingDatabase([root])
    assert database.refresh_if_changed(SD1, tokenizer) is True
    assert database.refresh_if_changed(SD1, tokenizer) is False
    save_safetensors(root / "second.safetensors", {"emb_params": vectors(1, SD1_WIDTH)})
    bump_mtime(root)
    assert database.refresh_if_changed(SD1, tokenizer) is True
    assert list(database.loaded) == ["first", "second"]
    assert database.refresh_if_changed(SDXL, tokenizer) is True  # another family: refit without a rescan
    assert list(database.skipped) == ["first", "second"]

    old_hash = database.skipped["first"].short_hash
    save_safetensors(first, {"emb_params": vectors(2, SD1_WIDTH, seed=5)})
    database.refresh(SD1, tokenizer)  # forced: sees the changed file although the folder's mtime did not move
    assert database.loaded["first"].vectors == 2
    assert database.loaded["first"].short_hash == sha12(first) != old_hash


# --- tokens ---------------------------------------------------------------------------------------------------


def lookup_with(tmp_path: Path, tokenizer: ClipTokenizer, **counts: int) -> EmbeddingLookup:
    root = tmp_path / "embeddings"
    for name, count in counts.items():
        save_safetensors(root / f"{name.replace('_', '-')}.safetensors", {"emb_params": vectors(count, SD1_WIDTH)})
    database = EmbeddingDatabase([root])
    database.refresh(SD1, tokenizer)
    assert database.lookup is not None
    return database.lookup


def test_each_vector_counts_as_one_token_with_the_fragments_weight(tmp_path: Path, tokenizer: ClipTokenizer) -> None:
    lookup = lookup_with(tmp_path, tokenizer, badhands=3)
    assert len(tokenizer.encode("badhands")) == 2  # the name is two tokens, the embedding three vectors
    result = tokenize_prompt("a (badhands:1.5) cat", tokenizer, embeddings=lookup)
    assert result.token_count == 1 + 3 + 1
    chunk = result.chunks[0]
    assert chunk.tokens[1:6] == [tokenizer.encode("a")[0], 0, 0, 0, tokenizer.encode("cat")[0]]
    assert chunk.multipliers[1:6] == pytest.approx([1.0, 1.5, 1.5, 1.5, 1.0])
    assert chunk.fixes == [ChunkFix(1, lookup.embeddings["badhands"])]
    assert result.embeddings_used == ("badhands",)
    # Matching is on CLIP tokens, so case does not matter; without the lookup the name is plain text.
    assert tokenize_prompt("BadHands", tokenizer, embeddings=lookup).token_count == 3
    assert tokenize_prompt("badhands", tokenizer).token_count == 2

    counter = TokenCounter(lambda: lookup)
    assert counter.count("a badhands cat, [badhands:dog:5]", steps=20) == (1 + 3 + 1 + 1 + 3, 75)
    assert TokenCounter().count("a badhands cat", steps=20) == (4, 75)
    assert TokenCounter(lambda: None).count("a badhands cat", steps=20) == (4, 75)


def test_longest_name_wins(tmp_path: Path, tokenizer: ClipTokenizer) -> None:
    lookup = lookup_with(tmp_path, tokenizer, style=1, style_v2=2)  # files style.safetensors, style-v2.safetensors
    assert tokenize_prompt("style-v2", tokenizer, embeddings=lookup).embeddings_used == ("style-v2",)
    both = tokenize_prompt("style, style-v2", tokenizer, embeddings=lookup)
    assert both.embeddings_used == ("style", "style-v2") and both.token_count == 1 + 1 + 2


def test_an_embedding_is_never_split_across_chunks(tmp_path: Path, tokenizer: ClipTokenizer) -> None:
    lookup = lookup_with(tmp_path, tokenizer, badhands=3)
    cat = tokenizer.encode("cat")[0]
    fits = tokenize_prompt(" ".join(["cat"] * 72) + " badhands", tokenizer, embeddings=lookup)
    assert len(fits.chunks) == 1 and fits.token_count == 75
    assert fits.chunks[0].fixes[0].offset == 72

    moved = tokenize_prompt(" ".join(["cat"] * 73) + " badhands cat", tokenizer, embeddings=lookup)
    first, second = moved.chunks
    assert first.tokens[1:74] == [cat] * 73 and first.tokens[74:] == [tokenizer.eos_id] * 3 and first.fixes == []
    assert second.tokens[1:5] == [0, 0, 0, cat] and [fix.offset for fix in second.fixes] == [0]
    assert moved.token_count == CHUNK_LENGTH + 4


def test_comma_backtracking_moves_an_embedding_with_its_tokens(tmp_path: Path, tokenizer: ClipTokenizer) -> None:
    lookup = lookup_with(tmp_path, tokenizer, badhands=3)
    # 70 cats, a comma, the 3 vectors, one more cat fills the chunk; the next cat moves everything after the comma.
    result = tokenize_prompt(" ".join(["cat"] * 70) + ", badhands cat cat", tokenizer, embeddings=lookup)
    first, second = result.chunks
    assert first.fixes == [] and first.tokens[71] == tokenizer.comma_id
    assert second.tokens[1:6] == [0, 0, 0, tokenizer.encode("cat")[0], tokenizer.encode("cat")[0]]
    assert second.fixes == [ChunkFix(0, lookup.embeddings["badhands"])]


# --- images --------------------------------------------------------------------------------------------------------


def token_rows(encoder: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return encoder.get_input_embeddings().weight[ids].detach().clone()


def run(model: LoadedModel, lookup: EmbeddingLookup | None, **changes: object) -> list[GeneratedImage]:
    params = GenerationParams(**{**SMALL, **changes})
    return [image for batch in generate(model, params, 1234, VERSION, embeddings=lookup) for image in batch]


def test_an_embedding_of_words_gives_exactly_the_image_of_those_words_sd1(
    sd1: LoadedModel, tmp_path: Path, tokenizer: ClipTokenizer
) -> None:
    words = tokenizer.encode("red car")
    root = tmp_path / "embeddings"
    save_a1111_pt(root / "my-car.pt", token_rows(sd1.text_encoder, words))
    database = EmbeddingDatabase([root])
    database.refresh_for_model(sd1, force=True)
    assert list(database.loaded) == ["my-car"]
    lookup = database.lookup

    plain = run(sd1, None, prompt="a photo of a (red car:1.2)", negative_prompt="blurry red car")[0]
    embedded = run(sd1, lookup, prompt="a photo of a (my-car:1.2)", negative_prompt="blurry my-car")[0]
    assert np.array_equal(pixels(embedded), pixels(plain))
    assert parse_infotext(embedded.infotext).prompt == "a photo of a (my-car:1.2)"
    # The name as plain text is another picture: the embedding really was used.
    as_text = run(sd1, None, prompt="a photo of a (my-car:1.2)", negative_prompt="blurry my-car")[0]
    assert not np.array_equal(pixels(as_text), pixels(plain))

    with torch.inference_mode():
        cond = PromptConditioning(sd1, "prompt", "[a cat:a my-car:2]", 4, 1, "Original", embeddings=lookup)
        negative = PromptConditioning(sd1, "negative_prompt", "my-car", 4, 1, "Original", negative=True,
                                      embeddings=lookup)
    assert cond.used_embeddings == ("my-car",) and negative.used_embeddings == ("my-car",)


def test_an_embedding_of_words_gives_exactly_the_image_of_those_words_sdxl(
    sdxl: LoadedModel, tmp_path: Path, tokenizer: ClipTokenizer
) -> None:
    assert sdxl.text_encoder_2 is not None
    words = tokenizer.encode("red car")
    root = tmp_path / "embeddings"
    save_safetensors(root / "xl-car.safetensors", {
        "clip_l": token_rows(sdxl.text_encoder, words), "clip_g": token_rows(sdxl.text_encoder_2, words),
    })
    # An SD 1.x embedding as wide as the tiny CLIP-L: SDXL needs both tensors, so it does not fit.
    save_safetensors(root / "l-only.safetensors", {"emb_params": token_rows(sdxl.text_encoder, words)})
    database = EmbeddingDatabase([root])
    database.refresh_for_model(sdxl, force=True)
    assert list(database.loaded) == ["xl-car"] and list(database.skipped) == ["l-only"]

    plain = run(sdxl, None, prompt="a photo of a red car", negative_prompt="red car")[0]
    embedded = run(sdxl, database.lookup, prompt="a photo of a xl-car", negative_prompt="xl-car")[0]
    assert np.array_equal(pixels(embedded), pixels(plain))
    assert not np.array_equal(pixels(run(sdxl, None, prompt="a photo of a xl-car", negative_prompt="xl-car")[0]),
                              pixels(plain))
