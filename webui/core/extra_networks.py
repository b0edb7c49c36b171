"""A1111's extra-network prompt tags (`<lora:name:te:unet>`, `<lyco:…>`): parsing them out of a prompt, and the
`Lora hashes` infotext field (format, and renaming pasted tags by hash). Pure text: imports the standard library only."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# modules/extra_networks.py: re_extra_net. Every tag is removed from the text the encoder sees, whatever its kind.
EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
# A1111 registers `lora` and, for LyCORIS files from the old extension, `lyco` as an alias of it.
LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True, slots=True)
class ExtraNetworkCall:
    """One tag: `<kind:name[:te[:unet[:dyn]]]>` or with named `te=`, `unet=`, `dyn=` (named wins)."""

    kind: str
    name: str
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    dyn: int | None = None

    @property
    def is_lora(self) -> bool:
        return self.kind in LORA_KINDS


class ExtraNetworkSyntaxError(ValueError):
    """A tag whose multiplier is not a number; the message quotes the tag."""


def _parse_call(kind: str, arguments: str) -> ExtraNetworkCall:
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in arguments.split(":"):
        # ExtraNetworkParams: an item with exactly one "=" is a named argument.
        if item.count("=") == 1:
            key, value = item.split("=")
            named[key.strip()] = value.strip()
        else:
            positional.append(item)
    name = positional[0] if positional else ""
    tag = f"<{kind}:{arguments}>"

    def number(text: str, parse: Callable[[str], float | int]) -> float | int:
        try:
            return parse(text)
        except ValueError:
            raise ExtraNetworkSyntaxError(f"{tag}: {text!r} is not a number") from None

    te_text = named.get("te", positional[1] if len(positional) > 1 else None)
    te = float(number(te_text, float)) if te_text is not None else 1.0
    unet_text = named.get("unet", positional[2] if len(positional) > 2 else None)
    unet = float(number(unet_text, float)) if unet_text is not None else te
    dyn_text = named.get("dyn", positional[3] if len(positional) > 3 else None)
    dyn = int(number(dyn_text, int)) if dyn_text is not None else None
    return ExtraNetworkCall(kind, name, te, unet, dyn)


def parse_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkCall]]:
    """The prompt without its tags, and the tags in prompt order (A1111's extra_networks.parse_prompt)."""
    calls: list[ExtraNetworkCall] = []

    def take(match: re.Match[str]) -> str:
        calls.append(_parse_call(match.group(1), match.group(2)))
        return ""

    return EXTRA_NETWORK_TAG.sub(take, prompt), calls


def hash_field_name(name: str) -> str:
    """A network's name as A1111 writes it in `Lora hashes` / `TI hashes`: ':' and ',' removed."""
    return name.replace(":", "").replace(",", "")


def format_hashes(entries: Mapping[str, str]) -> str:
    """`name: hash, name: hash` (the infotext writer quotes the whole value)."""
    return ", ".join(f"{hash_field_name(name)}: {short_hash}" for name, short_hash in entries.items() if short_hash)


def parse_hashes(value: str) -> dict[str, str]:
    """`Lora hashes` / `TI hashes` back into name → short hash; malformed entries are skipped."""
    entries: dict[str, str] = {}
    for item in value.split(","):
        name, separator, short_hash = item.partition(":")
        if separator and name.strip() and short_hash.strip():
            entries[name.strip()] = short_hash.strip()
    return entries


def rewrite_lora_names(prompt: str, lora_hashes: str, local_name_for_hash: Callable[[str], str | None]) -> str:
    """A pasted prompt with each `<lora:NAME:` renamed to the local file whose hash `Lora hashes` gives for NAME.

    A1111's lora_script.infotext_pasted: only names listed with a hash that is known here are rewritten.
    """
    hashes = parse_hashes(lora_hashes)
    if not hashes:
        return prompt

    def rename(match: re.Match[str]) -> str:
        kind, arguments = match.group(1), match.group(2)
        if kind not in LORA_KINDS:
            return match.group(0)
        name, separator, rest = arguments.partition(":")
        short_hash = hashes.get(name)
        local = local_name_for_hash(short_hash) if short_hash else None
        if local is None:
            return match.group(0)
        return f"<{kind}:{local}{separator}{rest}>"

    return EXTRA_NETWORK_TAG.sub(rename, prompt)
