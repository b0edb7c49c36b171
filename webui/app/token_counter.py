"""The prompt token counter the UI shows next to each prompt box, as A1111 counts (e.g. "82/150").
Loads the CLIP tokenizer lazily on first use, so importing this module stays cheap; must not import gradio."""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

from webui.core.prompt_parser import get_prompt_schedule, strip_comments

if TYPE_CHECKING:
    from webui.engine.clip_tokenizer import ClipTokenizer

CHUNK_LENGTH = 75


class TokenCounter:
    """Counts tokens with the shipped CLIP tokenizer; no model needs to be loaded."""

    def __init__(self) -> None:
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
        from webui.engine.conditioning import tokenize_prompt

        tokenizer = self._get_tokenizer()
        texts = [text for _, text in get_prompt_schedule(strip_comments(prompt), max(steps, 1))]
        counts = []
        for text in texts:
            try:
                counts.append(tokenize_prompt(text, tokenizer, emphasis).token_count)
            except ValueError:  # an unreadable emphasis weight: count the text as written
                counts.append(tokenize_prompt(text, tokenizer, "None").token_count)
        token_count = max(counts, default=0)
        return token_count, math.ceil(max(token_count, 1) / CHUNK_LENGTH) * CHUNK_LENGTH

    def label(self, prompt: str, steps: int) -> str:
        count, target = self.count(prompt, steps)
        return f"{count}/{target}"
