"""How API clients name a checkpoint (A1111's aliases: name, stem, model_name, title, hashes) and its title.
Must not import torch, the engine, gradio or fastapi; shared by the /sdapi/v1 and /api/v1 routers."""

from __future__ import annotations

import os
import re

from webui.api.context import CheckpointListing

CHECKPOINT_SUFFIX = ".safetensors"
# "name [hash]" titles, as A1111 shows checkpoints once their hash is known.
_TITLE_WITH_HASH = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")
_HEX_DIGITS = frozenset("0123456789abcdef")
# A short model hash (10 chars) or A1111's legacy hash (8): only the engine can check those without a listing hash.
ENGINE_CHECKED_HASH_LENGTHS = (8, 10)


def model_name_of(listing: CheckpointListing) -> str:
    """A1111's model_name: the relative name without extension, folder separators turned into '_'."""
    return listing.name.removesuffix(CHECKPOINT_SUFFIX).replace("/", "_").replace("\\", "_")


def short_hash_of(listing: CheckpointListing, loaded: tuple[str, str | None] | None) -> str | None:
    if listing.sha256:
        return listing.sha256[:10]
    if loaded is not None and loaded[0] == listing.name:
        return loaded[1]
    return None


def checkpoint_title(listing: CheckpointListing, loaded: tuple[str, str | None] | None) -> str:
    """A1111's title: "name [short hash]" once the hash is known, else the name alone."""
    short_hash = short_hash_of(listing, loaded)
    return f"{listing.name} [{short_hash}]" if short_hash else listing.name


def _names_of(listing: CheckpointListing) -> set[str]:
    return {
        listing.name,
        listing.name.removesuffix(CHECKPOINT_SUFFIX),
        listing.stem,
        model_name_of(listing),
        os.path.basename(listing.name),
    }


def _aliases_of(listing: CheckpointListing, loaded: tuple[str, str | None] | None) -> set[str]:
    aliases = _names_of(listing)
    short_hash = short_hash_of(listing, loaded)
    if short_hash:
        aliases |= {short_hash, *(f"{name} [{short_hash}]" for name in _names_of(listing))}
    if listing.sha256:
        aliases.add(listing.sha256)
    return aliases


def find_checkpoint(
    listings: list[CheckpointListing], query: str, loaded: tuple[str, str | None] | None
) -> CheckpointListing | None:
    """The checkpoint a client named by any of A1111's aliases: name, name without extension, stem,
    model_name, title "name [hash]", short hash or sha256; None when nothing matches."""
    wanted = query.strip().replace("\\", "/")
    # Hashes are compared in lower case (clients copy them from anywhere); names stay case-sensitive as in A1111.
    candidates = {wanted, wanted.lower()} if set(wanted.lower()) <= _HEX_DIGITS else {wanted}
    for listing in listings:
        if candidates & _aliases_of(listing, loaded):
            return listing
    titled = _TITLE_WITH_HASH.match(wanted)
    if titled is not None:
        # A title carrying a hash this process has not computed yet (or a stale one): the name decides.
        for listing in listings:
            if titled.group("name") in _names_of(listing):
                return listing
    return None


def could_be_a_hash(query: str) -> bool:
    """An 8- or 10-character hex string: a hash the engine can check even before the listing knows it."""
    lowered = query.strip().lower()
    return len(lowered) in ENGINE_CHECKED_HASH_LENGTHS and set(lowered) <= _HEX_DIGITS
