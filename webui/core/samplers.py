"""A1111's sampler and schedule-type names, aliases and flags, as a name-keyed registry.
Must not import torch or anything outside the standard library; the engine maps specs to math."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplerSpec:
    """One sampler as A1111 lists it; `function` keys the engine's implementation table."""

    name: str
    function: str
    aliases: tuple[str, ...] = ()
    default_schedule: str | None = None
    second_order: bool = False
    discard_penultimate_sigma: bool = False
    brownian_noise: bool = False
    uses_ensd: bool = False
    timestep_sampler: bool = False


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """One "Schedule type" as A1111 labels it in the UI and infotext, with its API name."""

    label: str
    name: str
    aliases: tuple[str, ...] = ()


# Order is A1111's UI order (sd_samplers.all_samplers); the first entry is the UI default.
SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("DPM++ 2M", "dpmpp_2m", ("k_dpmpp_2m",), default_schedule="Karras"),
        SamplerSpec(
            "DPM++ SDE", "dpmpp_sde", ("k_dpmpp_sde",), default_schedule="Karras",
            second_order=True, brownian_noise=True,
        ),
        SamplerSpec(
            "DPM++ 2M SDE", "dpmpp_2m_sde", ("k_dpmpp_2m_sde",), default_schedule="Exponential",
            brownian_noise=True,
        ),
        SamplerSpec(
            "DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", ("k_dpmpp_2m_sde_heun",),
            default_schedule="Exponential", brownian_noise=True,
        ),
        SamplerSpec(
            "DPM++ 2S a", "dpmpp_2s_ancestral", ("k_dpmpp_2s_a",), default_schedule="Karras",
            second_order=True, uses_ensd=True,
        ),
        SamplerSpec(
            "DPM++ 3M SDE", "dpmpp_3m_sde", ("k_dpmpp_3m_sde",), default_schedule="Exponential",
            discard_penultimate_sigma=True, brownian_noise=True,
        ),
        SamplerSpec("Euler a", "euler_ancestral", ("k_euler_a", "k_euler_ancestral"), uses_ensd=True),
        SamplerSpec("Euler", "euler", ("k_euler",)),
        SamplerSpec("LMS", "lms", ("k_lms",)),
        SamplerSpec("Heun", "heun", ("k_heun",), second_order=True),
        SamplerSpec(
            "DPM2", "dpm_2", ("k_dpm_2",), default_schedule="Karras",
            discard_penultimate_sigma=True, second_order=True,
        ),
        SamplerSpec(
            "DPM2 a", "dpm_2_ancestral", ("k_dpm_2_a",), default_schedule="Karras",
            discard_penultimate_sigma=True, second_order=True, uses_ensd=True,
        ),
        SamplerSpec("DDIM", "ddim", ("ddim",), timestep_sampler=True),
        SamplerSpec("UniPC", "unipc", ("unipc",), timestep_sampler=True),
    )
}

SCHEDULES: dict[str, ScheduleSpec] = {
    spec.label: spec
    for spec in (
        ScheduleSpec("Automatic", "automatic"),
        ScheduleSpec("Uniform", "uniform"),
        ScheduleSpec("Karras", "karras"),
        ScheduleSpec("Exponential", "exponential"),
        ScheduleSpec("Polyexponential", "polyexponential"),
        ScheduleSpec("SGM Uniform", "sgm_uniform", ("SGMUniform",)),
    )
}

DEFAULT_SAMPLER = "DPM++ 2M"
DEFAULT_SCHEDULE = "Automatic"


class UnknownSamplerError(ValueError):
    """A sampler or schedule name that no registry entry or alias matches; `field` says which."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _lookup_key(text: str) -> str:
    return text.strip().lower()


def find_sampler(name: str) -> SamplerSpec:
    """The sampler whose name or alias equals `name` (case-insensitive)."""
    key = _lookup_key(name)
    for spec in SAMPLERS.values():
        if key == spec.name.lower() or key in (alias.lower() for alias in spec.aliases):
            return spec
    raise UnknownSamplerError("sampler", f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def find_schedule(name: str) -> ScheduleSpec:
    """The schedule type whose label, API name or alias equals `name` (case-insensitive)."""
    key = _lookup_key(name)
    for spec in SCHEDULES.values():
        names = (spec.label, spec.name, *spec.aliases)
        if key in (candidate.lower() for candidate in names):
            return spec
    raise UnknownSamplerError(
        "scheduler", f"unknown schedule type {name!r}; choose one of: {', '.join(SCHEDULES)}"
    )


def split_sampler_and_schedule(sampler: str, schedule: str | None) -> tuple[SamplerSpec, ScheduleSpec]:
    """Resolve a sampler and schedule the way A1111's API and paste do.

    Old combined names such as "DPM++ 2M Karras" carry the schedule in the sampler name; they are
    accepted when the schedule is not given or is Automatic (A1111's get_sampler_and_scheduler).
    """
    schedule_spec = find_schedule(schedule) if schedule else SCHEDULES[DEFAULT_SCHEDULE]
    try:
        return find_sampler(sampler), schedule_spec
    except UnknownSamplerError:
        for candidate in SCHEDULES.values():
            for suffix in (candidate.label, candidate.name, *candidate.aliases):
                if sampler.strip().lower().endswith(" " + suffix.lower()):
                    base = sampler.strip()[: -len(suffix) - 1]
                    spec = find_sampler(base)
                    if schedule_spec.label == DEFAULT_SCHEDULE:
                        schedule_spec = candidate
                    return spec, schedule_spec
        raise


def resolved_schedule_label(sampler: SamplerSpec, schedule: ScheduleSpec) -> str:
    """The label A1111 writes as "Schedule type": Automatic becomes the sampler's default, if any."""
    if schedule.label == DEFAULT_SCHEDULE and sampler.default_schedule is not None:
        return sampler.default_schedule
    return schedule.label
