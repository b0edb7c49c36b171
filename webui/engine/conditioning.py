"""Text to CLIP embeddings exactly as A1111 does it: 75-token chunks, BREAK, emphasis, clip skip; SD 1.x, 2.x, SDXL.
Must not import gradio, fastapi or webui.app."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from webui.core.prompt_parser import BREAK_MARKER_WEIGHT, parse_prompt_attention
from webui.engine.clip_tokenizer import ClipTokenizer
from webui.engine.families import SD1, SD2, SDXL, Family

CHUNK_LENGTH = 75
# A1111's comma_padding_backtrack default: a chunk that would split within 20 tokens of a comma
# is cut after the comma instead.
COMMA_PADDING_BACKTRACK = 20
# OpenCLIP (SD 2.x, SDXL's bigG) pads with id 0 ("!") after the first EOS; CLIP-L pads with EOS itself.
OPEN_CLIP_PAD_ID = 0
# SDXL conditions on the penultimate layer of both encoders, without their final layer norm.
SDXL_HIDDEN_LAYER = -2


@dataclass(frozen=True, slots=True)
class TextConditioning:
    """What the UNet is conditioned on: the cross-attention context (B, 77·k, C) and, for SDXL only,
    the pooled text vector (B, P) that goes into the UNet's added "vector" conditioning."""

    crossattn: torch.Tensor
    pooled: torch.Tensor | None = None

    def zeroed(self) -> TextConditioning:
        pooled = torch.zeros_like(self.pooled) if self.pooled is not None else None
        return TextConditioning(torch.zeros_like(self.crossattn), pooled)


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


def pad_after_first_eos(tokens: list[int], eos_id: int, pad_id: int) -> list[int]:
    """A1111's process_tokens for encoders whose pad differs from EOS: every id after the first EOS is `pad_id`."""
    end = tokens.index(eos_id)
    return tokens[: end + 1] + [pad_id] * (len(tokens) - end - 1)


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
    return apply_emphasis(z, multipliers, emphasis)


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, emphasis: str) -> torch.Tensor:
    """A1111's emphasis on one encoder's chunk batch (B, 77, C): weight each token, "Original" restores the mean."""
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
    device = next(text_encoder.parameters()).device
    encoded: list[torch.Tensor] = []
    for batch in aligned_chunk_batches(texts, tokenizer, emphasis):
        tokens = torch.tensor([chunk.tokens for chunk in batch], dtype=torch.long, device=device)
        multipliers = torch.tensor([chunk.multipliers for chunk in batch], dtype=torch.float32, device=device)
        encoded.append(encode_chunk_batch(text_encoder, tokens, multipliers, clip_skip, emphasis))
    return torch.cat(encoded, dim=1)


def aligned_chunk_batches(texts: list[str], tokenizer: ClipTokenizer, emphasis: str) -> list[list[PromptChunk]]:
    """Chunk i of every text, per i; a text with fewer chunks gets A1111's empty chunk (BOS + EOS padding)."""
    tokenized = [tokenize_prompt(text, tokenizer, emphasis).chunks for text in texts]
    chunk_count = max(len(chunks) for chunks in tokenized)
    return [
        [chunks[index] if index < len(chunks) else empty_chunk(tokenizer) for chunks in tokenized]
        for index in range(chunk_count)
    ]


def _token_tensors(
    batch: list[PromptChunk], device: torch.device, pad_id: int | None, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [chunk.tokens if pad_id is None else pad_after_first_eos(chunk.tokens, eos_id, pad_id) for chunk in batch]
    tokens = torch.tensor(rows, dtype=torch.long, device=device)
    multipliers = torch.tensor([chunk.multipliers for chunk in batch], dtype=torch.float32, device=device)
    return tokens, multipliers


def encode_sd2_prompts(
    texts: list[str], text_encoder: torch.nn.Module, tokenizer: ClipTokenizer, emphasis: str = "Original"
) -> torch.Tensor:
    """SD 2.x: OpenCLIP-H's penultimate layer through ln_final, padded with 0 after the first EOS.

    The diffusers encoder has the last resblock removed, so its last_hidden_state is exactly that.
    A1111 ignores clip skip for SD 2.x, and so does this.
    """
    device = next(text_encoder.parameters()).device
    encoded: list[torch.Tensor] = []
    for batch in aligned_chunk_batches(texts, tokenizer, emphasis):
        tokens, multipliers = _token_tensors(batch, device, OPEN_CLIP_PAD_ID, tokenizer.eos_id)
        encoded.append(encode_chunk_batch(text_encoder, tokens, multipliers, 1, emphasis))
    return torch.cat(encoded, dim=1)


def encode_sdxl_prompts(
    texts: list[str],
    text_encoder: torch.nn.Module,
    text_encoder_2: torch.nn.Module,
    tokenizer: ClipTokenizer,
    emphasis: str = "Original",
) -> TextConditioning:
    """SDXL base (A1111's sd_models_xl / sgm GeneralConditioner).

    Context: CLIP-L (EOS padding) and OpenCLIP-bigG (0 padding), each its hidden_states[-2] without
    final layer norm, emphasis applied per encoder, concatenated on channels (768 + 1280 = 2048).
    Pooled: bigG's projected pooled output of the first chunk only. Clip skip is ignored, as with
    A1111's default (its `sdxl_clip_l_skip` option is off).
    """
    device = next(text_encoder.parameters()).device
    clip_l_chunks: list[torch.Tensor] = []
    clip_g_chunks: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for batch in aligned_chunk_batches(texts, tokenizer, emphasis):
        tokens_l, multipliers = _token_tensors(batch, device, None, tokenizer.eos_id)
        tokens_g, _ = _token_tensors(batch, device, OPEN_CLIP_PAD_ID, tokenizer.eos_id)
        hidden_l = text_encoder(input_ids=tokens_l, output_hidden_states=True).hidden_states[SDXL_HIDDEN_LAYER]
        outputs_g = text_encoder_2(input_ids=tokens_g, output_hidden_states=True)
        if pooled is None:
            pooled = outputs_g.text_embeds
        clip_l_chunks.append(apply_emphasis(hidden_l, multipliers, emphasis))
        clip_g_chunks.append(apply_emphasis(outputs_g.hidden_states[SDXL_HIDDEN_LAYER], multipliers, emphasis))
    crossattn = torch.cat([torch.cat(clip_l_chunks, dim=1), torch.cat(clip_g_chunks, dim=1)], dim=2)
    if pooled is None:
        raise ValueError("prompt: no text to encode")
    return TextConditioning(crossattn, pooled)


def encode_for_family(
    family: Family,
    texts: list[str],
    text_encoder: torch.nn.Module,
    text_encoder_2: torch.nn.Module | None,
    tokenizer: ClipTokenizer,
    clip_skip: int,
    emphasis: str = "Original",
) -> TextConditioning:
    """A batch of prompts encoded the way A1111 encodes them for the model's family."""
    if family == SDXL:
        if text_encoder_2 is None:
            raise ValueError("SDXL needs its second text encoder")
        return encode_sdxl_prompts(texts, text_encoder, text_encoder_2, tokenizer, emphasis)
    if family == SD2:
        return TextConditioning(encode_sd2_prompts(texts, text_encoder, tokenizer, emphasis))
    return TextConditioning(encode_prompts(texts, text_encoder, tokenizer, clip_skip, emphasis))


def clip_skip_limit(family: Family, text_encoder: torch.nn.Module) -> int | None:
    """The largest clip skip the model can apply, or None where A1111 ignores clip skip (SD 2.x, SDXL)."""
    if family == SD1:
        return int(text_encoder.config.num_hidden_layers)
    return None


def zeroes_empty_negative_prompt(family: Family) -> bool:
    """A1111 conditions SDXL on zeros (crossattn and pooled) when the negative prompt is empty at every step."""
    return family == SDXL
