"""Text to CLIP embeddings exactly as A1111 does it: 75-token chunks, BREAK, emphasis, clip skip.
Must not import gradio, fastapi or webui.app."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from webui.core.prompt_parser import BREAK_MARKER_WEIGHT, parse_prompt_attention
from webui.engine.clip_tokenizer import ClipTokenizer

CHUNK_LENGTH = 75
# A1111's comma_padding_backtrack default: a chunk that would split within 20 tokens of a comma
# is cut after the comma instead.
COMMA_PADDING_BACKTRACK = 20


@dataclass(slots=True)
class PromptChunk:
    """77 token ids (BOS + 75 + EOS once closed) and the emphasis multiplier of each."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """A prompt split into closed chunks, and A1111's token count (what the UI counter shows)."""

    chunks: tuple[PromptChunk, ...]
    token_count: int


def tokenize_prompt(text: str, tokenizer: ClipTokenizer, emphasis: str = "Original") -> TokenizedPrompt:
    """A1111's tokenize_line: fragments by emphasis, BREAK closes a chunk, comma backtracking."""
    if emphasis == "None":
        fragments = [(text, 1.0)]
    else:
        fragments = parse_prompt_attention(text)
    fragment_tokens = tokenizer.encode_many([fragment for fragment, _ in fragments])

    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1

    def close_chunk(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        # A1111 counts a closed chunk as 75 tokens even when a BREAK left it short.
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        padding = CHUNK_LENGTH - len(chunk.tokens)
        chunk.tokens += [tokenizer.eos_id] * padding
        chunk.multipliers += [1.0] * padding
        chunk.tokens = [tokenizer.bos_id, *chunk.tokens, tokenizer.eos_id]
        chunk.multipliers = [1.0, *chunk.multipliers, 1.0]
        chunks.append(chunk)
        chunk = PromptChunk()
        last_comma = -1

    for tokens, (fragment, weight) in zip(fragment_tokens, fragments, strict=True):
        if fragment == "BREAK" and weight == BREAK_MARKER_WEIGHT:
            close_chunk()
            continue
        for token in tokens:
            if token == tokenizer.comma_id:
                last_comma = len(chunk.tokens)
            elif (
                len(chunk.tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= COMMA_PADDING_BACKTRACK
            ):
                split_at = last_comma + 1
                moved_tokens, moved_multipliers = chunk.tokens[split_at:], chunk.multipliers[split_at:]
                chunk.tokens, chunk.multipliers = chunk.tokens[:split_at], chunk.multipliers[:split_at]
                close_chunk()
                chunk.tokens, chunk.multipliers = moved_tokens, moved_multipliers
            if len(chunk.tokens) == CHUNK_LENGTH:
                close_chunk()
            chunk.tokens.append(token)
            chunk.multipliers.append(weight)
    if chunk.tokens or not chunks:
        close_chunk(is_last=True)
    return TokenizedPrompt(tuple(chunks), token_count)


def empty_chunk(tokenizer: ClipTokenizer) -> PromptChunk:
    """BOS followed by EOS padding: what A1111 encodes for a prompt that has fewer chunks than its batch-mates."""
    return PromptChunk(
        [tokenizer.bos_id] + [tokenizer.eos_id] * (CHUNK_LENGTH + 1), [1.0] * (CHUNK_LENGTH + 2)
    )


def encode_chunk_batch(
    text_encoder: torch.nn.Module,
    tokens: torch.Tensor,
    multipliers: torch.Tensor,
    clip_skip: int,
    emphasis: str,
) -> torch.Tensor:
    """One 77-token chunk per batch row → hidden states, with clip skip and emphasis applied."""
    outputs = text_encoder(input_ids=tokens, output_hidden_states=clip_skip > 1)
    if clip_skip > 1:
        # Clip skip N: hidden state of layer -N, then the final layer norm (A1111 SD 1.x rule).
        hidden = outputs.hidden_states[-clip_skip]
        final_layer_norm = getattr(text_encoder, "final_layer_norm", None) or text_encoder.text_model.final_layer_norm
        z = final_layer_norm(hidden)
    else:
        z = outputs.last_hidden_state
    if emphasis in ("Original", "No norm"):
        # Float32 multipliers promote half-precision states to float32, as in A1111.
        weights = multipliers.unsqueeze(-1)
        if emphasis == "Original":
            # A1111 restores the mean over the whole chunk-batch tensor after weighting.
            original_mean = z.mean()
            z = z * weights
            z = z * (original_mean / z.mean())
        else:
            z = z * weights
    return z


def encode_prompts(
    texts: list[str],
    text_encoder: torch.nn.Module,
    tokenizer: ClipTokenizer,
    clip_skip: int,
    emphasis: str = "Original",
) -> torch.Tensor:
    """A batch of prompts → (B, 77·k, C) embeddings, chunk i of every prompt encoded together (A1111)."""
    tokenized = [tokenize_prompt(text, tokenizer, emphasis).chunks for text in texts]
    chunk_count = max(len(chunks) for chunks in tokenized)
    device = next(text_encoder.parameters()).device
    encoded: list[torch.Tensor] = []
    for index in range(chunk_count):
        batch = [chunks[index] if index < len(chunks) else empty_chunk(tokenizer) for chunks in tokenized]
        tokens = torch.tensor([chunk.tokens for chunk in batch], dtype=torch.long, device=device)
        multipliers = torch.tensor([chunk.multipliers for chunk in batch], dtype=torch.float32, device=device)
        encoded.append(encode_chunk_batch(text_encoder, tokens, multipliers, clip_skip, emphasis))
    return torch.cat(encoded, dim=1)
