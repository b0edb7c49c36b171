"""Infotext → txt2img control values ("Send to txt2img"), shared by the result, gallery and PNG Info views.
Pure functions over webui.core; must not import gradio, torch or the engine."""

from __future__ import annotations

from collections.abc import Callable

from webui.core.extra_networks import rewrite_lora_names
from webui.core.infotext import InfotextFields, params_from_infotext, parse_infotext
from webui.core.params import ParamError
from webui.core.samplers import UnknownSamplerError, split_sampler_and_schedule
from webui.core.styles import StyleDatabase

LORA_HASHES_FIELD = "Lora hashes"

# The txt2img controls an infotext can fill, in the order the UI lists them.
PASTED_FIELDS = (
    "prompt", "negative_prompt", "sampler", "scheduler", "steps", "cfg_scale",
    "width", "height", "seed", "clip_skip",
)


def values_from_infotext(infotext: str) -> tuple[dict[str, object], str | None]:
    """Control values found in an infotext (missing keys are left out, so those controls keep their
    value, as A1111's paste does) and the checkpoint stem it names, if any."""
    return values_from_parsed(parse_infotext(infotext))


def values_from_parsed(parsed: InfotextFields) -> tuple[dict[str, object], str | None]:
    """values_from_infotext for an infotext already parsed (and possibly rewritten by extensions)."""
    kwargs = params_from_infotext(parsed)
    values = {name: kwargs[name] for name in PASTED_FIELDS if name in kwargs}
    if "sampler" in values:
        try:
            sampler, schedule = split_sampler_and_schedule(
                str(values["sampler"]), str(values.get("scheduler", "Automatic"))
            )
        except UnknownSamplerError as error:
            raise ParamError("Sampler", error.reason) from None
        values["sampler"], values["scheduler"] = sampler.name, schedule.label
    checkpoint = kwargs.get("checkpoint")
    return values, str(checkpoint) if checkpoint else None


def checkpoint_choice(stem: str | None, choices: list[str]) -> str | None:
    """The dropdown entry for a checkpoint stem from an infotext ("tiny" → "tiny.safetensors")."""
    if not stem:
        return None
    for choice in choices:
        name = choice.rsplit("/", 1)[-1]
        if name.removesuffix(".safetensors") == stem or choice == stem:
            return choice
    return None


def restore_styles_and_networks(
    parsed: InfotextFields, styles: StyleDatabase | None, lora_name_for_hash: Callable[[str], str | None] | None,
) -> tuple[InfotextFields, list[str]]:
    """What A1111 does to a pasted infotext before filling the controls: the styles whose texts the prompts end
    with (or wrap) are taken out of them and returned for the styles picker (A1111's "Apply if any"), and each
    `<lora:NAME:` listed in `Lora hashes` is renamed to the local file with that hash (the prompt only)."""
    prompt, negative_prompt = parsed.prompt, parsed.negative_prompt
    found: list[str] = []
    if styles is not None:
        found, stripped_prompt, stripped_negative = styles.extract(prompt, negative_prompt)
        if found:
            prompt, negative_prompt = stripped_prompt, stripped_negative
    hashes = parsed.fields.get(LORA_HASHES_FIELD)
    if hashes and lora_name_for_hash is not None:
        prompt = rewrite_lora_names(prompt, hashes, lora_name_for_hash)
    return InfotextFields(prompt, negative_prompt, parsed.fields), found
