"""A1111 infotext ("generation parameters" text): quoting, writing, parsing, and the GenerationParams mapping.
Must not import anything outside the standard library and webui.core (no torch, PIL, gradio)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from webui.core import samplers
from webui.core.params import GenerationParams, ParamError
from webui.core.prompt_parser import parse_prompt_attention

NEGATIVE_PROMPT_PREFIX = "Negative prompt:"
# A1111 treats a last line with fewer matches than this as prompt text, not parameters.
MIN_PARAMS_ON_LAST_LINE = 3

# A1111's infotext_utils.re_param: a key starts with a word character and may contain spaces, '-' and
# '/'; a value is either a JSON string literal or anything up to the next comma. Kept identical so that
# both programs split a line the same way.
_PARAM_PATTERN = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# A1111 splits "WxH" values into "<key>-1" and "<key>-2" (Size, Hires resize, Seed resize from).
_SIZE_PATTERN = re.compile(r"^(\d+)x(\d+)$")

# Largest float still written as an integer; beyond it str(int(x)) would print spurious digits.
_LARGEST_EXACT_INTEGRAL_FLOAT = 2.0**53


@dataclass(frozen=True)
class InfotextFields:
    """A parsed infotext: prompts plus every parameter as a string, keyed with A1111's spelling."""

    prompt: str
    negative_prompt: str
    fields: dict[str, str]


def _value_text(value: object) -> str:
    # A1111's UI hands integral CFG values over as ints, so its infotexts say "CFG scale: 7", not "7.0".
    if isinstance(value, float) and value.is_integer() and abs(value) < _LARGEST_EXACT_INTEGRAL_FLOAT:
        return str(int(value))
    return str(value)


def quote(value: object) -> str:
    """A value as written after "Key: ": JSON-quoted when it contains ',', newline or ':' (as A1111).

    Also quoted, because A1111's parser would not read them back unchanged otherwise: the empty
    string, text that starts with '"', and text with leading or trailing whitespace. A1111 reads
    all of these back correctly since it JSON-decodes any quoted value.
    """
    text = _value_text(value)
    needs_quotes = (
        "," in text
        or "\n" in text
        or ":" in text
        or text == ""
        or text.startswith('"')
        or text != text.strip()
    )
    return json.dumps(text, ensure_ascii=False) if needs_quotes else text


def unquote(text: str) -> str:
    """The inverse of quote: a JSON string literal is decoded; anything else is returned unchanged."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        decoded = json.loads(text)
    except ValueError:
        return text
    return decoded if isinstance(decoded, str) else text


def format_infotext(prompt: str, negative_prompt: str, fields: Mapping[str, object | None]) -> str:
    """The infotext A1111 writes: prompt, optional "Negative prompt:" line, then "Key: value, ..."."""
    params_line = ", ".join(
        key if key == value else f"{key}: {quote(value)}"
        for key, value in fields.items()
        if value is not None
    )
    negative_line = f"\n{NEGATIVE_PROMPT_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative_line}\n{params_line}".strip()


def _split_prompt_lines(lines: list[str]) -> tuple[str, str]:
    # As A1111: every line is stripped, and the first line starting with "Negative prompt:" switches
    # all following lines to the negative prompt.
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for raw_line in lines:
        line = raw_line.strip()
        if line.startswith(NEGATIVE_PROMPT_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PROMPT_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    return _join_like_a1111(prompt_lines), _join_like_a1111(negative_lines)


def _join_like_a1111(lines: list[str]) -> str:
    # A1111 appends "\n" + line only once the text is non-empty, so leading empty lines vanish.
    text = ""
    for line in lines:
        text += ("" if text == "" else "\n") + line
    return text


def _prompt_uses_emphasis(prompt: str) -> bool:
    """True when A1111's attention parser gives some text a weight other than 1.0 (BREAK aside)."""
    try:
        fragments = parse_prompt_attention(prompt)
    except ValueError:
        # A1111 fails on an unreadable weight such as "(x:.)"; it is still bracket-weight syntax.
        return True
    return any(weight != 1.0 and text != "BREAK" for text, weight in fragments)


def parse_infotext(text: str) -> InfotextFields:
    """Parse an infotext as A1111's parse_generation_parameters does (the keys this program uses).

    Values stay strings. Missing "Clip skip", "RNG" and "Schedule type" get A1111's defaults, and
    "Emphasis: Original" is added when a prompt uses attention weights. Styles, hypernetworks and
    A1111's version-based back-compat switches are not applied.
    """
    *prompt_lines, last_line = text.strip().split("\n")
    if len(_PARAM_PATTERN.findall(last_line)) < MIN_PARAMS_ON_LAST_LINE:
        prompt_lines.append(last_line)
        last_line = ""
    prompt, negative_prompt = _split_prompt_lines(prompt_lines)

    fields: dict[str, str] = {}
    for key, raw_value in _PARAM_PATTERN.findall(last_line):
        if raw_value == "":
            # A1111 fails on v[0] for an empty value and skips the key.
            continue
        value = unquote(raw_value)
        size = _SIZE_PATTERN.match(value)
        if size is not None:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.group(1), size.group(2)
        else:
            fields[key] = value

    # A missing key means A1111's default was in effect when the image was made.
    fields.setdefault("Clip skip", "1")
    fields.setdefault("RNG", "GPU")
    fields.setdefault("Schedule type", samplers.DEFAULT_SCHEDULE)
    if "Emphasis" not in fields and (_prompt_uses_emphasis(prompt) or _prompt_uses_emphasis(negative_prompt)):
        fields["Emphasis"] = "Original"
    return InfotextFields(prompt=prompt, negative_prompt=negative_prompt, fields=fields)


def generation_fields(
    params: GenerationParams,
    seed: int,
    model_name: str | None,
    model_hash: str | None,
    version: str,
    vae_name: str | None = None,
    vae_hash: str | None = None,
) -> dict[str, object | None]:
    """The parameter fields A1111's create_infotext writes for a txt2img image, in its order.

    Conditional keys are present with the value None when they are not written, so that their
    position stays fixed if a caller fills them in. `params` must already be validated.
    """
    sampler, schedule = params.sampler_and_schedule()
    prompts_use_brackets = any("(" in text or "[" in text for text in (params.prompt, params.negative_prompt))
    return {
        "Steps": params.steps,
        "Sampler": sampler.name,
        "Schedule type": samplers.resolved_schedule_label(sampler, schedule),
        "CFG scale": params.cfg_scale,
        "Seed": seed,
        "Size": f"{params.width}x{params.height}",
        "Model hash": model_hash or None,
        "Model": model_name or None,
        # Only for an external VAE file, as A1111 writes them (its file name, with extension).
        "VAE hash": vae_hash or None,
        "VAE": vae_name or None,
        "Clip skip": params.clip_skip if params.clip_skip > 1 else None,
        "RNG": params.rng_source if params.rng_source != "GPU" else None,
        # A1111 records the emphasis mode only when it can matter: not the default, and brackets present.
        "Emphasis": params.emphasis if params.emphasis != "Original" and prompts_use_brackets else None,
        "Version": version or None,
    }


def build_infotext(
    params: GenerationParams,
    seed: int,
    model_name: str | None,
    model_hash: str | None,
    version: str,
    extra_fields: Mapping[str, str] | None = None,
    vae_name: str | None = None,
    vae_hash: str | None = None,
) -> str:
    """The full infotext of one image: format_infotext over generation_fields.

    `extra_fields` (extensions' fields) go before "Version", where A1111 writes extra_generation_params;
    they never replace a field of its own.
    """
    fields = generation_fields(params, seed, model_name, model_hash, version, vae_name, vae_hash)
    if extra_fields:
        version_text = fields.pop("Version")
        fields.update({key: value for key, value in extra_fields.items() if key not in fields})
        fields["Version"] = version_text
    return format_infotext(params.prompt, params.negative_prompt, fields)


def _integer_field(key: str, text: str) -> int:
    # A1111 pastes integer fields through float(), so "20.0" is accepted; "20.5" is not an integer.
    try:
        return int(text.strip())
    except ValueError:
        pass
    try:
        number = float(text.strip())
    except ValueError:
        raise ParamError(key, f"must be an integer, got {text!r}") from None
    if not math.isfinite(number) or not number.is_integer():
        raise ParamError(key, f"must be an integer, got {text!r}")
    return int(number)


def _float_field(key: str, text: str) -> float:
    try:
        number = float(text.strip())
    except ValueError:
        raise ParamError(key, f"must be a number, got {text!r}") from None
    if not math.isfinite(number):
        raise ParamError(key, f"must be a finite number, got {text!r}")
    return number


def _text_field(key: str, text: str) -> str:
    return text


# Infotext key -> GenerationParams field and how its string value is converted.
_PARAM_FIELDS: tuple[tuple[str, str, Callable[[str, str], object]], ...] = (
    ("Steps", "steps", _integer_field),
    ("Sampler", "sampler", _text_field),
    ("Schedule type", "scheduler", _text_field),
    ("CFG scale", "cfg_scale", _float_field),
    ("Seed", "seed", _integer_field),
    ("Size-1", "width", _integer_field),
    ("Size-2", "height", _integer_field),
    ("Clip skip", "clip_skip", _integer_field),
    ("RNG", "rng_source", _text_field),
    ("Emphasis", "emphasis", _text_field),
    ("Model", "checkpoint", _text_field),
    ("VAE", "vae", _text_field),
)


def params_from_infotext(infotext: InfotextFields) -> dict[str, object]:
    """Keyword arguments for GenerationParams from the keys present; unknown keys are ignored.

    Raises ParamError naming the infotext key (e.g. "Steps") when a number does not parse. Ranges
    and names are not checked here: GenerationParams.validated() does that.
    """
    arguments: dict[str, object] = {
        "prompt": infotext.prompt,
        "negative_prompt": infotext.negative_prompt,
    }
    for key, param_name, convert in _PARAM_FIELDS:
        if key in infotext.fields:
            arguments[param_name] = convert(key, infotext.fields[key])
    return arguments
