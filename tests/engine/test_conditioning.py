"""A1111's text conditioning on the shipped tokenizer and a tiny CLIP: chunking, BREAK, commas, emphasis, clip skip.
Uses the tiny checkpoint's text encoder loaded through the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.cpu_models import load_on_cpu
from webui.engine.clip_tokenizer import ClipTokenizer
from webui.engine.conditioning import CHUNK_LENGTH, encode_prompts, tokenize_prompt
from webui.engine.model_manager import LoadedModel


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    return load_on_cpu(tiny_model_dir, "tiny")


def real_tokens(chunk_tokens: list[int], tokenizer: ClipTokenizer) -> list[int]:
    body = chunk_tokens[1:-1]
    while body and body[-1] == tokenizer.eos_id:
        body.pop()
    return body


def test_short_prompt_is_one_chunk_of_77(tokenizer: ClipTokenizer) -> None:
    result = tokenize_prompt("a photo of a cat", tokenizer)
    assert result.token_count == 5
    assert len(result.chunks) == 1
    chunk = result.chunks[0]
    assert len(chunk.tokens) == CHUNK_LENGTH + 2
    assert chunk.tokens[0] == tokenizer.bos_id and chunk.tokens[-1] == tokenizer.eos_id
    assert real_tokens(chunk.tokens, tokenizer) == tokenizer.encode("a photo of a cat")


def test_long_prompt_makes_a_second_chunk_and_counts_like_a1111(tokenizer: ClipTokenizer) -> None:
    prompt = " ".join(["cat"] * 80)  # "cat" is one token
    result = tokenize_prompt(prompt, tokenizer)
    assert len(result.chunks) == 2
    assert result.token_count == 80  # the UI shows 80/150
    assert real_tokens(result.chunks[0].tokens, tokenizer) == [tokenizer.encode("cat")[0]] * 75
    assert real_tokens(result.chunks[1].tokens, tokenizer) == [tokenizer.encode("cat")[0]] * 5


def test_break_closes_the_chunk_and_counts_as_75(tokenizer: ClipTokenizer) -> None:
    result = tokenize_prompt("a cat BREAK a hat", tokenizer)
    assert len(result.chunks) == 2
    assert result.token_count == 75 + 2
    assert real_tokens(result.chunks[0].tokens, tokenizer) == tokenizer.encode("a cat")
    assert real_tokens(result.chunks[1].tokens, tokenizer) == tokenizer.encode("a hat")


def test_emphasis_none_takes_break_and_brackets_literally(tokenizer: ClipTokenizer) -> None:
    result = tokenize_prompt("a (cat:1.5) BREAK hat", tokenizer, emphasis="None")
    assert len(result.chunks) == 1
    assert real_tokens(result.chunks[0].tokens, tokenizer) == tokenizer.encode("a (cat:1.5) BREAK hat")
    assert set(result.chunks[0].multipliers) == {1.0}


def test_comma_backtracking_moves_the_tail_after_the_last_comma(tokenizer: ClipTokenizer) -> None:
    cat = tokenizer.encode("cat")[0]
    # 70 tokens, a comma at index 70, then 10 more: the 76th token would overflow the chunk,
    # and the last comma is within 20 tokens of the end, so the chunk ends after the comma.
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    result = tokenize_prompt(prompt, tokenizer)
    first, second = (real_tokens(chunk.tokens, tokenizer) for chunk in result.chunks)
    assert first == [cat] * 70 + [tokenizer.comma_id]
    assert second == [tokenizer.encode("dog")[0]] * 10
    assert result.token_count == 75 + 10


def test_comma_too_far_back_does_not_move_tokens(tokenizer: ClipTokenizer) -> None:
    prompt = " ".join(["cat"] * 30) + ", " + " ".join(["dog"] * 60)
    first, second = (real_tokens(chunk.tokens, tokenizer) for chunk in tokenize_prompt(prompt, tokenizer).chunks)
    assert len(first) == 75 and len(second) == 16


def test_emphasis_weights_reach_the_right_tokens(tokenizer: ClipTokenizer) -> None:
    chunk = tokenize_prompt("a (red:1.5) [car]", tokenizer).chunks[0]
    ids = tokenizer.encode("a red car")
    assert chunk.tokens[1:4] == ids
    assert chunk.multipliers[1:4] == pytest.approx([1.0, 1.5, 1 / 1.1])


def test_clip_skip_two_is_the_penultimate_layer_through_the_final_layer_norm(model: LoadedModel) -> None:
    text_encoder = model.text_encoder
    ids = tokenize_prompt("a photo of a cat", model.tokenizer).chunks[0].tokens
    with torch.no_grad():
        outputs = text_encoder(input_ids=torch.tensor([ids]), output_hidden_states=True)
        expected_skip2 = text_encoder.final_layer_norm(outputs.hidden_states[-2])
        ours_skip1 = encode_prompts(["a photo of a cat"], text_encoder, model.tokenizer, 1, "Ignore")
        ours_skip2 = encode_prompts(["a photo of a cat"], text_encoder, model.tokenizer, 2, "Ignore")
    torch.testing.assert_close(ours_skip1, outputs.last_hidden_state)
    torch.testing.assert_close(ours_skip2, expected_skip2)
    assert not torch.allclose(ours_skip1, ours_skip2)


def test_original_emphasis_restores_the_mean(model: LoadedModel) -> None:
    with torch.no_grad():
        plain = encode_prompts(["a red car"], model.text_encoder, model.tokenizer, 1, "Ignore")
        original = encode_prompts(["a (red:1.5) car"], model.text_encoder, model.tokenizer, 1, "Original")
        no_norm = encode_prompts(["a (red:1.5) car"], model.text_encoder, model.tokenizer, 1, "No norm")
    red_position = 2  # BOS, "a", "red"
    torch.testing.assert_close(no_norm[0, red_position], plain[0, red_position] * 1.5)
    assert original.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)
    assert not torch.allclose(original, no_norm)


def test_batch_of_prompts_pads_missing_chunks_and_concatenates(model: LoadedModel) -> None:
    long_prompt = " ".join(["cat"] * 80)
    with torch.no_grad():
        batch = encode_prompts([long_prompt, "a dog"], model.text_encoder, model.tokenizer, 1)
        alone = encode_prompts(["a dog"], model.text_encoder, model.tokenizer, 1)
    hidden = model.text_encoder.config.hidden_size
    assert batch.shape == (2, 154, hidden)
    assert alone.shape == (1, 77, hidden)
