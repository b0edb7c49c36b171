"""GenerationParams: every per-request choice of one txt2img job, validated, plus seed resolution.
Must not import torch or anything outside the standard library."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

from webui.core import samplers

SEED_MAX = 2**32 - 1
# A1111 draws random seeds with random.randrange(4294967294).
RANDOM_SEED_BOUND = 4294967294
RNG_SOURCES = ("GPU", "CPU", "NV")
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
OUTPUT_FORMATS = ("png", "jpg", "webp")
# A1111's sd_vae choices besides a file name: a same-named .vae.safetensors beside the checkpoint
# (else its own VAE), and always the checkpoint's own VAE.
AUTOMATIC_VAE = "Automatic"
NO_VAE = "None"
# A prompt longer than this is refused before anything else reads it: at 32 chunks of 75 tokens (the default
# chunk limit) a prompt is about 10,000 characters, and tokenizing, parsing and saving stay cheap under this.
MAX_PROMPT_CHARACTERS = 32_768
# Checkpoint, sampler, schedule, VAE and other names: far beyond any real name, short enough to echo in errors.
MAX_NAME_CHARACTERS = 1024
# One value of an extension's control (webui.core.extension_values); scalars keep GenerationParams hashable.
ExtensionValue = str | int | float | bool
ExtensionValues = tuple[tuple[str, str, ExtensionValue], ...]


class ParamError(ValueError):
    """Bad input: the message starts with the field name and states the limit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


@dataclass(frozen=True, slots=True)
class IntRange:
    """Inclusive bounds of an integer field, with an optional step (multiple-of) rule."""

    low: int
    high: int
    multiple_of: int = 1


@dataclass(frozen=True, slots=True)
class FloatRange:
    """Inclusive bounds of a float field."""

    low: float
    high: float


# Limits follow A1111's UI sliders (steps 1-150, CFG 1-30, size 64-2048 step 8, batch 1-8 x 1-100,
# clip skip 1-12); seed is an unsigned 32-bit integer or -1 for random.
INT_LIMITS: dict[str, IntRange] = {
    "steps": IntRange(1, 150),
    "width": IntRange(64, 2048, 8),
    "height": IntRange(64, 2048, 8),
    "clip_skip": IntRange(1, 12),
    "batch_size": IntRange(1, 8),
    "batch_count": IntRange(1, 100),
    "seed": IntRange(-1, SEED_MAX),
}
FLOAT_LIMITS: dict[str, FloatRange] = {"cfg_scale": FloatRange(1.0, 30.0)}


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """One txt2img request; defaults are A1111's UI defaults."""

    prompt: str = ""
    negative_prompt: str = ""
    checkpoint: str | None = None
    sampler: str = samplers.DEFAULT_SAMPLER
    scheduler: str = samplers.DEFAULT_SCHEDULE
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1
    width: int = 512
    height: int = 512
    clip_skip: int = 1
    batch_size: int = 1
    batch_count: int = 1
    rng_source: str = "GPU"
    emphasis: str = "Original"
    output_format: str = "png"
    vae: str = AUTOMATIC_VAE
    # Extensions' control values as sorted (extension, key, value) triples: named, never positional.
    extensions: ExtensionValues = ()

    def replace(self, **changes: object) -> GenerationParams:
        """A copy with `changes` applied (the dataclass stays frozen)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def validated(self) -> GenerationParams:
        """This object if every field is within its limits; raises ParamError naming the field."""
        for name, limit in INT_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParamError(name, f"must be an integer, got {value!r}")
            if not limit.low <= value <= limit.high:
                raise ParamError(name, f"must be between {limit.low} and {limit.high}, got {value}")
            if value % limit.multiple_of:
                raise ParamError(name, f"must be a multiple of {limit.multiple_of}, got {value}")
        for name, float_limit in FLOAT_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ParamError(name, f"must be a number, got {value!r}")
            if not float_limit.low <= value <= float_limit.high:
                raise ParamError(
                    name, f"must be between {float_limit.low:g} and {float_limit.high:g}, got {value:g}"
                )
        for name in ("prompt", "negative_prompt"):
            check_text(name, getattr(self, name), MAX_PROMPT_CHARACTERS)
        for name in ("sampler", "scheduler", "vae"):
            check_text(name, getattr(self, name), MAX_NAME_CHARACTERS)
        if self.checkpoint is not None:
            check_text("checkpoint", self.checkpoint, MAX_NAME_CHARACTERS)
        if not self.vae.strip():
            raise ParamError("vae", f"must be {AUTOMATIC_VAE}, {NO_VAE} or a VAE file name, got {self.vae!r}")
        try:
            samplers.split_sampler_and_schedule(self.sampler, self.scheduler)
        except samplers.UnknownSamplerError as error:
            raise ParamError(error.field, error.reason) from None
        _check_extension_values(self.extensions)
        choices = {"rng_source": RNG_SOURCES, "emphasis": EMPHASIS_MODES, "output_format": OUTPUT_FORMATS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ParamError(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        return self

    def sampler_and_schedule(self) -> tuple[samplers.SamplerSpec, samplers.ScheduleSpec]:
        """The resolved sampler and schedule specs (aliases and combined names accepted)."""
        return samplers.split_sampler_and_schedule(self.sampler, self.scheduler)

    @property
    def image_count(self) -> int:
        return self.batch_size * self.batch_count

    def extension_values(self, extension: str) -> dict[str, ExtensionValue]:
        """The values carried for one extension, by control key (empty when none were sent)."""
        return {key: value for name, key, value in self.extensions if name == extension}

    def with_extension_values(self, extension: str, values: dict[str, ExtensionValue]) -> GenerationParams:
        """A copy whose values for `extension` are exactly `values`."""
        others = [entry for entry in self.extensions if entry[0] != extension]
        mine = [(extension, key, value) for key, value in values.items()]
        return self.replace(extensions=tuple(sorted(others + mine, key=lambda entry: (entry[0], entry[1]))))


def check_text(field: str, value: object, max_characters: int) -> str:
    """`value` if it is text of at most `max_characters` that can be saved (UTF-8); ParamError naming `field`."""
    if not isinstance(value, str):
        raise ParamError(field, f"must be text, got {type(value).__name__}")
    if len(value) > max_characters:
        raise ParamError(field, f"must be at most {max_characters} characters, got {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can carry lone surrogates ("\ud800"); they can never be saved in an infotext or a settings file.
        raise ParamError(field, "must be valid Unicode text (no lone surrogates)") from None
    return value


def _check_extension_values(entries: object) -> None:
    """Shape only (names, scalar types); each value's limits are its extension's declared control's business."""
    if not isinstance(entries, tuple):
        raise ParamError("extensions", f"must be a tuple of (extension, key, value), got {type(entries).__name__}")
    seen: set[tuple[str, str]] = set()
    for entry in entries:
        well_formed = isinstance(entry, tuple) and len(entry) == 3
        if not (well_formed and isinstance(entry[0], str) and isinstance(entry[1], str)):
            raise ParamError("extensions", f"each entry must be (extension, key, value), got {entry!r}")
        extension, key, value = entry
        field = f"extensions.{extension}.{key}"
        if not extension or not key.isidentifier():
            raise ParamError(field, "extension and key must be names")
        if (extension, key) in seen:
            raise ParamError(field, "given twice")
        seen.add((extension, key))
        if not isinstance(value, (str, int, float, bool)):
            raise ParamError(field, f"must be text, a number or true/false, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ParamError(field, f"must be a finite number, got {value!r}")


def resolve_seed(seed: int, rng: random.Random | None = None) -> int:
    """-1 becomes a random seed as A1111 draws it; any other seed is returned unchanged."""
    if seed == -1:
        return (rng or random.SystemRandom()).randrange(RANDOM_SEED_BOUND)
    return seed


def image_seeds(first_seed: int, image_count: int) -> list[int]:
    """A1111's rule: image i of a job uses seed + i (wrapping is not applied, as in A1111)."""
    return [first_seed + index for index in range(image_count)]
