"""Text to CLIP embeddings exactly as A1111 does it: 75-token chunks, BREAK, emphasis, clip skip, textual-inversion
vectors; one encode_tokens path for every family's encoders. Must not import gradio, fastapi or webui.app."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from webui.core.prompt_parser import BREAK_MARKER_WEIGHT, parse_prompt_attention
from webui.engine.clip_tokenizer import ClipTokenizer
from webui.engine.families import SD1, SD2, SDXL, Family, TextEncoderSpec, token_embedding_of

if TYPE_CHECKING:
    from webui.engine.networks.textual_inversion import Embedding, EmbeddingLookup

CHUNK_LENGTH = 75
# A1111's comma_padding_backtrack default: a chunk that would split within 20 tokens of a comma
# is cut after the comma instead.
COMMA_PADDING_BACKTRACK = 20
# The id A1111 puts where an embedding's vectors go; the encoder's token embedding of it is replaced.
EMBEDDING_PLACEHOLDER_ID = 0


@dataclass(frozen=True, slots=True)
class TextConditioning:
    """What the UNet is conditioned on: the cross-attention context (B, 77·k, C) and, for SDXL only,
    the pooled text vector (B, P) that goes into the UNet's added "vector" conditioning.
    `embeddings_used`: names of the textual-inversion embeddings the texts used (for `TI hashes`)."""

    crossattn: torch.Tensor
    pooled: torch.Tensor | None = None
    embeddings_used: tuple[str, ...] = ()

    def zeroed(self) -> TextConditioning:
        pooled = torch.zeros_like(self.pooled) if self.pooled is not None else None
        return TextConditioning(torch.zeros_like(self.crossattn), pooled, self.embeddings_used)


@dataclass(frozen=True, slots=True)
class ChunkFix:
    """A1111's PromptChunkFix: the embedding's vectors go to chunk tokens offset … offset+n-1 (rows offset+1 …
    offset+n once BOS leads the chunk)."""

    offset: int
    embedding: Embedding


@dataclass(slots=True)
class PromptChunk:
    """77 token ids (BOS + 75 + EOS once closed), the emphasis multiplier of each, and the embeddings in it."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[ChunkFix] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """A prompt split into closed chunks, A1111's token count (what the UI counter shows; an embedding counts
    one per vector) and the names of the embeddings it uses, in order of first use."""

    chunks: tuple[PromptChunk, ...]
    token_count: int
    embeddings_used: tuple[str, ...] = ()


def tokenize_prompt(
    text: str, tokenizer: ClipTokenizer, emphasis: str = "Original", embeddings: EmbeddingLookup | None = None
) -> TokenizedPrompt:
    """A1111's tokenize_line: fragments by emphasis, BREAK closes a chunk, comma backtracking, embeddings.

    An embedding's name is matched on CLIP token ids (longest name first); its vectors take one placeholder
    token each, carry the fragment's weight and are never split across chunks (they move to the next one).
    """
    if emphasis == "None":
        fragments = [(text, 1.0)]
    else:
        fragments = parse_prompt_attention(text)
    fragment_tokens = tokenizer.encode_many([fragment for fragment, _ in fragments])

    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1
    used: dict[str, None] = {}

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
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == tokenizer.comma_id:
                last_comma = len(chunk.tokens)
            elif (
                len(chunk.tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= COMMA_PADDING_BACKTRACK
            ):
                split_at = last_comma + 1
                moved = PromptChunk(
                    chunk.tokens[split_at:],
                    chunk.multipliers[split_at:],
                    # A1111 leaves these fixes behind (its embedding then lands in the closed chunk's padding and
                    # the moved placeholders stay "!"): they move with their tokens here.
                    [ChunkFix(fix.offset - split_at, fix.embedding) for fix in chunk.fixes if fix.offset >= split_at],
                )
                chunk.tokens, chunk.multipliers = chunk.tokens[:split_at], chunk.multipliers[:split_at]
                chunk.fixes = [fix for fix in chunk.fixes if fix.offset < split_at]
                close_chunk()
                chunk = moved
            if len(chunk.tokens) == CHUNK_LENGTH:
                close_chunk()
            match = embeddings.match(tokens, position) if embeddings is not None else None
            if match is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            embedding, name_length = match
            if len(chunk.tokens) + embedding.vectors > CHUNK_LENGTH:
                close_chunk()
            chunk.fixes.append(ChunkFix(len(chunk.tokens), embedding))
            chunk.tokens += [EMBEDDING_PLACEHOLDER_ID] * embedding.vectors
            chunk.multipliers += [weight] * embedding.vectors
            used[embedding.name] = None
            position += name_length
    if chunk.tokens or not chunks:
        close_chunk(is_last=True)
    return TokenizedPrompt(tuple(chunks), token_count, tuple(used))


def empty_chunk(tokenizer: ClipTokenizer) -> PromptChunk:
    """BOS followed by EOS padding: what A1111 encodes for a prompt that has fewer chunks than its batch-mates."""
    return PromptChunk(
        [tokenizer.bos_id] + [tokenizer.eos_id] * (CHUNK_LENGTH + 1), [1.0] * (CHUNK_LENGTH + 2)
    )


def pad_after_first_eos(tokens: list[int], eos_id: int, pad_id: int) -> list[int]:
    """A1111's process_tokens for encoders whose pad differs from EOS: every id after the first EOS is `pad_id`."""
    end = tokens.index(eos_id)
    return tokens[: end + 1] + [pad_id] * (len(tokens) - end - 1)


# -- the one call into a text encoder ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenVectors:
    """Rows `start` … `start + n - 1` of one batch row's token embeddings replaced by `vectors` (n, C), clipped
    to the row's length (A1111's EmbeddingsWithFixes)."""

    start: int
    vectors: torch.Tensor


@dataclass(frozen=True, slots=True)
class EncodedTokens:
    """A text encoder's hidden states (B, 77, C) at the chosen layer and, if asked for, its projected pooled
    output (B, P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def encode_tokens(
    text_encoder: torch.nn.Module,
    ids: torch.Tensor,
    vectors: Sequence[Sequence[TokenVectors]] | None = None,
    *,
    hidden_layer: int | None = None,
    final_layer_norm: bool = False,
    pooled: bool = False,
) -> EncodedTokens:
    """Run one text encoder on token ids (B, 77), with `vectors[b]` in place of rows of batch row b's embeddings.

    `hidden_layer` None: the last hidden state (final layer norm included); else hidden_states[hidden_layer],
    through the final layer norm when `final_layer_norm`. `pooled`: also return the projected pooled output.
    transformers' CLIPTextModel takes no inputs_embeds, so the rows are replaced by a forward hook on the
    encoder's own token embedding, registered for this call only (jobs encode one at a time).
    """
    handle = None
    if vectors is not None and any(vectors):
        handle = token_embedding_of(text_encoder).register_forward_hook(_replacing_rows(vectors))
    try:
        outputs = text_encoder(input_ids=ids, output_hidden_states=hidden_layer is not None)
    finally:
        if handle is not None:
            handle.remove()
    if hidden_layer is None:
        hidden = outputs.last_hidden_state
    else:
        hidden = outputs.hidden_states[hidden_layer]
        if final_layer_norm:
            # transformers >= 5.6 flattened CLIPTextModel; older ones keep the layers under .text_model.
            encoder = cast(Any, text_encoder)
            norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
            hidden = norm(hidden)
    return EncodedTokens(hidden, outputs.text_embeds if pooled else None)


def _replacing_rows(
    vectors: Sequence[Sequence[TokenVectors]],
) -> Callable[[torch.nn.Module, object, torch.Tensor], torch.Tensor]:
    """A forward hook on a token embedding that puts each batch row's vectors in place of its rows."""

    def hook(_module: torch.nn.Module, _inputs: object, embedded: torch.Tensor) -> torch.Tensor:
        embedded = embedded.clone()
        length = embedded.shape[1]
        for row, replacements in enumerate(vectors):
            for replacement in replacements:
                end = min(length, replacement.start + replacement.vectors.shape[0])
                if end > replacement.start:
                    # A1111 casts the vectors to the model's dtype (the text encoder's here, which equals the UNet's).
                    values = replacement.vectors[: end - replacement.start]
                    embedded[row, replacement.start : end] = values.to(embedded.device, embedded.dtype)
        return embedded

    return hook


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


# -- prompts → conditioning, driven by the family's text encoder specs -------------------------------------------


def aligned_chunk_batches(tokenized: Sequence[TokenizedPrompt], tokenizer: ClipTokenizer) -> list[list[PromptChunk]]:
    """Chunk i of every prompt, per i; a prompt with fewer chunks gets A1111's empty chunk (BOS + EOS padding)."""
    chunk_count = max(len(prompt.chunks) for prompt in tokenized)
    return [
        [prompt.chunks[index] if index < len(prompt.chunks) else empty_chunk(tokenizer) for prompt in tokenized]
        for index in range(chunk_count)
    ]


def _token_tensors(
    batch: list[PromptChunk], device: torch.device, pad_id: int | None, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [chunk.tokens if pad_id is None else pad_after_first_eos(chunk.tokens, eos_id, pad_id) for chunk in batch]
    tokens = torch.tensor(rows, dtype=torch.long, device=device)
    multipliers = torch.tensor([chunk.multipliers for chunk in batch], dtype=torch.float32, device=device)
    return tokens, multipliers


def _chunk_vectors(batch: list[PromptChunk], ti_key: str | None) -> list[list[TokenVectors]]:
    # Row offset + 1: BOS leads every closed chunk.
    return [
        [TokenVectors(fix.offset + 1, fix.embedding.vectors_for(ti_key)) for fix in chunk.fixes] for chunk in batch
    ]


def _layer(spec: TextEncoderSpec, clip_skip: int) -> tuple[int | None, bool]:
    """(hidden layer, through the final layer norm) for one encoder."""
    if spec.hidden_layer is not None:
        return spec.hidden_layer, False
    if clip_skip > 1:
        # Clip skip N: hidden state of layer -N, then the final layer norm (A1111 SD 1.x rule).
        return -clip_skip, True
    return None, False


def encode_with_specs(
    specs: Sequence[TextEncoderSpec],
    encoders: Mapping[str, torch.nn.Module],
    texts: list[str],
    tokenizer: ClipTokenizer,
    clip_skip: int,
    emphasis: str = "Original",
    embeddings: EmbeddingLookup | None = None,
) -> TextConditioning:
    """A batch of prompts → context (B, 77·k, C): chunk i of every prompt encoded together by each encoder (its
    padding, layer and emphasis), the encoders' states concatenated on channels; the pooled output of the
    encoder that has one, from the first chunk only."""
    tokenized = [tokenize_prompt(text, tokenizer, emphasis, embeddings) for text in texts]
    modules: list[torch.nn.Module] = []
    for spec in specs:
        module = encoders.get(spec.component)
        if module is None:
            raise ValueError(f"the model has no {spec.component}")
        modules.append(module)
    chunk_states: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for batch in aligned_chunk_batches(tokenized, tokenizer):
        states: list[torch.Tensor] = []
        for spec, module in zip(specs, modules, strict=True):
            device = next(module.parameters()).device
            ids, multipliers = _token_tensors(batch, device, spec.pad_id, tokenizer.eos_id)
            hidden_layer, final_layer_norm = _layer(spec, clip_skip)
            encoded = encode_tokens(
                module, ids, _chunk_vectors(batch, spec.ti_key),
                hidden_layer=hidden_layer, final_layer_norm=final_layer_norm, pooled=spec.pooled,
            )
            if spec.pooled and pooled is None:
                pooled = encoded.pooled
            states.append(apply_emphasis(encoded.hidden, multipliers, emphasis))
        chunk_states.append(states[0] if len(states) == 1 else torch.cat(states, dim=2))
    if any(spec.pooled for spec in specs) and pooled is None:
        raise ValueError("prompt: no text to encode")
    used = tuple(dict.fromkeys(name for prompt in tokenized for name in prompt.embeddings_used))
    return TextConditioning(torch.cat(chunk_states, dim=1), pooled, used)


def encode_for_family(
    family: Family,
    texts: list[str],
    text_encoder: torch.nn.Module,
    text_encoder_2: torch.nn.Module | None,
    tokenizer: ClipTokenizer,
    clip_skip: int,
    emphasis: str = "Original",
    embeddings: EmbeddingLookup | None = None,
) -> TextConditioning:
    """A batch of prompts encoded the way A1111 encodes them for the model's family."""
    encoders = {"text_encoder": text_encoder}
    if text_encoder_2 is not None:
        encoders["text_encoder_2"] = text_encoder_2
    return family.encode(texts, encoders, tokenizer, clip_skip, emphasis, embeddings)


def encode_prompts(
    texts: list[str],
    text_encoder: torch.nn.Module,
    tokenizer: ClipTokenizer,
    clip_skip: int,
    emphasis: str = "Original",
) -> torch.Tensor:
    """SD 1.x: a batch of prompts → (B, 77·k, 768) CLIP-L states with clip skip and emphasis."""
    return SD1.encode(texts, {"text_encoder": text_encoder}, tokenizer, clip_skip, emphasis).crossattn


def encode_sd2_prompts(
    texts: list[str], text_encoder: torch.nn.Module, tokenizer: ClipTokenizer, emphasis: str = "Original"
) -> torch.Tensor:
    """SD 2.x: OpenCLIP-H's penultimate layer through ln_final, padded with 0 after the first EOS.

    The diffusers encoder has the last resblock removed, so its last_hidden_state is exactly that.
    A1111 ignores clip skip for SD 2.x, and so does this.
    """
    return SD2.encode(texts, {"text_encoder": text_encoder}, tokenizer, 1, emphasis).crossattn


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
    encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    return SDXL.encode(texts, encoders, tokenizer, 1, emphasis)


def clip_skip_limit(family: Family, text_encoder: torch.nn.Module) -> int | None:
    """The largest clip skip the model can apply, or None where A1111 ignores clip skip (SD 2.x, SDXL)."""
    return family.clip_skip_limit(text_encoder)


def zeroes_empty_negative_prompt(family: Family) -> bool:
    """A1111 conditions SDXL on zeros (crossattn and pooled) when the negative prompt is empty at every step."""
    return family.zeroes_empty_negative_prompt
