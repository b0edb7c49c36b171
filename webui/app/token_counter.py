"""The prompt token counter the UI shows next to each prompt box, as A1111 counts (e.g. "82/150", an embedding's
vectors counting one token each), and the prompt-length limit every job is held to. Loads the CLIP tokenizer lazily
on first use; must not import gradio."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from webui.core.params import GenerationParams, ParamError
from webui.core.prompt_parser import get_prompt_schedule, strip_comments

if TYPE_CHECKING:
    from webui.engine.clip_tokenizer import ClipTokenizer
    from webui.engine.conditioning import TokenizedPrompt
    from webui.engine.networks.textual_inversion import EmbeddingLookup

# Returns the textual-inversion lookup of the loaded model's family, or None (no model, no embeddings yet).
EmbeddingsProvider = Callable[[], "EmbeddingLookup | None"]

CHUNK_LENGTH = 75


class TokenCounter:
    """Counts tokens with the shipped CLIP tokenizer; no model needs to be loaded. With `embeddings`, names of
    the current embeddings count as their vectors, as in A1111."""

    def __init__(self, embeddings: EmbeddingsProvider | None = None) -> None:
        self._embeddings = embeddings
        self._tokenizer: ClipTokenizer | None = None
        self._lock = threading.Lock()

    def _get_tokenizer(self) -> ClipTokenizer:
        with self._lock:
            if self._tokenizer is None:
                from webui.engine.clip_tokenizer import ClipTokenizer

                self._tokenizer = ClipTokenizer()
            return self._tokenizer

    def warm_up(self) -> None:
        """Load the tokenizer now (called from a background thread at start-up)."""
        self._get_tokenizer()

    def count(self, prompt: str, steps: int, emphasis: str = "Original") -> tuple[int, int]:
        """(tokens, shown maximum): the largest count over the prompt's scheduled texts, and the
        next multiple of 75 (A1111's get_target_prompt_token_count)."""
        counts = [self._tokenized(text, emphasis).token_count for text in scheduled_texts(prompt, steps)]
        token_count = max(counts, default=0)
        return token_count, math.ceil(max(token_count, 1) / CHUNK_LENGTH) * CHUNK_LENGTH

    def label(self, prompt: str, steps: int) -> str:
        count, target = self.count(prompt, steps)
        return f"{count}/{target}"

    def chunk_count(self, prompt: str, steps: int, emphasis: str = "Original") -> int:
        """75-token chunks of the prompt's longest scheduled text, as the text encoder would receive them."""
        # One tokenization, not one per scheduled text: the longest text has (all but) the most chunks.
        longest = max(scheduled_texts(prompt, steps), key=len, default="")
        return len(self._tokenized(longest, emphasis).chunks)

    def _tokenized(self, text: str, emphasis: str) -> TokenizedPrompt:
        from webui.engine.conditioning import tokenize_prompt

        lookup = self._embeddings() if self._embeddings is not None else None
        try:
            return tokenize_prompt(text, self._get_tokenizer(), emphasis, lookup)
        except ValueError:  # an unreadable emphasis weight fails later, with its own message: take the text as written
            return tokenize_prompt(text, self._get_tokenizer(), "None", lookup)

    def check_prompt_length(self, params: GenerationParams, max_chunks: int) -> None:
        """ParamError naming the prompt field when it needs more than `max_chunks` chunks of 75 tokens."""
        for name in ("prompt", "negative_prompt"):
            text = getattr(params, name)
            if not text:
                continue
            chunks = self.chunk_count(text, params.steps, params.emphasis)
            if chunks > max_chunks:
                raise ParamError(name, f"must be at most {max_chunks} chunks of {CHUNK_LENGTH} tokens "
                                       f"({max_chunks * CHUNK_LENGTH} tokens; the Settings tab sets the limit), "
                                       f"got {chunks} chunks")


def scheduled_texts(prompt: str, steps: int) -> list[str]:
    """The texts prompt editing switches between over `steps` (comments removed), as the sampler would use them."""
    return [text for _, text in get_prompt_schedule(strip_comments(prompt), max(steps, 1))]
