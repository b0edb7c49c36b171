"""Infotext → txt2img control values ("Send to txt2img"), shared by the result, gallery and PNG Info views.
Pure functions over webui.core; must not import gradio, torch or the engine."""

from __future__ import annotations

from webui.core.infotext import InfotextFields, parse_infotext, params_from_infotext
from webui.core.params import ParamError
from webui.core.samplers import UnknownSamplerError, split_sampler_and_schedule

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
