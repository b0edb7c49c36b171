"""CLIP BPE tokenization of prompt text into token ids, offline, matching OpenAI CLIP's reference tokenizer.
Must not import gradio, fastapi, webui.app or torch; it needs only transformers/tokenizers and ftfy."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path

import ftfy
from tokenizers import Tokenizer
from transformers import CLIPTokenizer

TOKENIZER_DIR: Path = Path(__file__).resolve().parent / "tokenizers" / "clip-vit-large-patch14"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
COMMA_TOKEN = ",</w>"

# Unicode's White_Space property spelled out: it is what the reference's `regex` module means by \s,
# whereas the standard `re` module's \s also takes the C0 separators U+001C..U+001F.
_WHITESPACE_RUN = re.compile("[\t\n\u000b\u000c\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt_text(text: str) -> str:
    """Apply CLIP's reference text clean-up: mojibake and HTML repair, then one space between words.

    Lowercasing is left to the tokenizer. html.unescape runs twice because web-scraped captions
    were often escaped twice ("&amp;amp;"), and the reference does the same.
    """
    repaired = ftfy.fix_text(text)
    unescaped = html.unescape(html.unescape(repaired))
    return _WHITESPACE_RUN.sub(" ", unescaped.strip()).strip()


class ClipTokenizer:
    """The CLIP ViT-L/14 BPE (shared by SD1's encoder and both SDXL encoders), loaded from the files in the repo.

    Ids equal OpenAI's SimpleTokenizer.encode. Padding is a property of the model family, not of the text:
    SD1 pads with EOS (49407), SD2 and SDXL's second encoder pad with "!" (id 0).
    """

    bos_id: int
    eos_id: int
    pad_id: int
    comma_id: int
    vocab_size: int
    _backend: Tokenizer

    def __init__(self, pad_token: str = EOS_TOKEN) -> None:
        # A local directory plus local_files_only keeps the hub client from ever resolving a repo name.
        wrapper = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
        self._backend = wrapper.backend_tokenizer
        # The backend's normalizer (NFC, \s+ -> " ", per-character lowercase) is not the reference's clean-up:
        # NFC recomposes accents the reference keeps split and per-character lowercasing misses the final sigma.
        # encode() does the reference clean-up and str.lower() itself, so the backend must not change the text again.
        self._backend.normalizer = None
        self._backend.no_truncation()
        self._backend.no_padding()

        self.bos_id = self._required_id(BOS_TOKEN)
        self.eos_id = self._required_id(EOS_TOKEN)
        # The pad id is looked up, never passed to transformers as pad_token: that would register "!" as a special
        # token and every "!" in a prompt would become id 0 instead of its BPE token (e.g. "!!</w>").
        self.pad_id = self._required_id(pad_token)
        self.comma_id = self._required_id(COMMA_TOKEN)
        self.vocab_size = self._backend.get_vocab_size(with_added_tokens=True)

    def _required_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{token!r} is not in the CLIP vocabulary at {TOKENIZER_DIR}")
        return token_id

    def encode(self, text: str) -> list[int]:
        """BPE ids of the cleaned, lowercased text: no BOS/EOS, no truncation, no padding."""
        normalized = clean_prompt_text(text).lower()
        if not normalized:
            return []
        # The backend is called directly: the transformers wrapper would warn about texts over 77 tokens,
        # and prompts are meant to be longer; chunking to 75 is the caller's job.
        return self._backend.encode(normalized, add_special_tokens=False).ids

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        # One at a time on purpose: encode_batch starts the tokenizers thread pool, which then warns
        # and disables itself in every process the server forks later; prompts are short anyway.
        return [self.encode(text) for text in texts]

    def decode_token(self, token_id: int) -> str:
        """The vocabulary string of one id, e.g. "cat</w>"; raises ValueError for an id outside the vocabulary."""
        token = self._backend.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None
        if token is None:
            raise ValueError(f"token id {token_id} is outside the CLIP vocabulary (0..{self.vocab_size - 1})")
        return token
