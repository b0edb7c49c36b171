"""Declared extension controls (slider, checkbox, dropdown, textbox): their values' types and limits, and how a value
is written to and read back from the infotext. Standard library only; the UI renders them, the API maps onto them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from webui.core.params import ExtensionValue, ParamError

_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})


@dataclass(frozen=True)
class Slider:
    """A number between `minimum` and `maximum`; an integer when `integer` is set."""

    key: str
    label: str
    minimum: float
    maximum: float
    step: float = 0.01
    default: float = 0.0
    infotext: str | None = None  # the infotext key; None: not written to the infotext
    integer: bool = False

    def coerce(self, field: str, raw: object) -> ExtensionValue:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ParamError(field, f"must be a number, got {raw!r}")
        try:
            number = float(raw)
        except ValueError:
            raise ParamError(field, f"must be a number, got {raw!r}") from None
        if not math.isfinite(number):
            raise ParamError(field, f"must be a finite number, got {raw!r}")
        if not self.minimum <= number <= self.maximum:
            raise ParamError(field, f"must be between {self.minimum:g} and {self.maximum:g}, got {number:g}")
        if self.integer:
            if not number.is_integer():
                raise ParamError(field, f"must be an integer, got {raw!r}")
            return int(number)
        return number


@dataclass(frozen=True)
class Checkbox:
    key: str
    label: str
    default: bool = False
    infotext: str | None = None

    def coerce(self, field: str, raw: object) -> ExtensionValue:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, (int, float)) and raw in (0, 1):
            return bool(raw)
        if isinstance(raw, str) and raw.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return raw.strip().lower() in _TRUE_WORDS
        raise ParamError(field, f"must be true or false, got {raw!r}")


@dataclass(frozen=True)
class Dropdown:
    key: str
    label: str
    choices: tuple[str, ...]
    default: str = ""
    infotext: str | None = None

    def coerce(self, field: str, raw: object) -> ExtensionValue:
        if isinstance(raw, str) and raw in self.choices:
            return raw
        raise ParamError(field, f"must be one of {', '.join(self.choices)}, got {raw!r}")


@dataclass(frozen=True)
class Textbox:
    key: str
    label: str
    default: str = ""
    infotext: str | None = None
    lines: int = 1
    max_length: int = 10_000

    def coerce(self, field: str, raw: object) -> ExtensionValue:
        if not isinstance(raw, str):
            raise ParamError(field, f"must be text, got {raw!r}")
        if len(raw) > self.max_length:
            raise ParamError(field, f"must be at most {self.max_length} characters, got {len(raw)}")
        return raw


Control = Slider | Checkbox | Dropdown | Textbox


def check_controls(controls: Sequence[Control]) -> None:
    """A declaration error (duplicate key, default outside its own limits) raises ValueError at setup time."""
    seen: set[str] = set()
    for control in controls:
        if not control.key.isidentifier():
            raise ValueError(f"control key {control.key!r} must be a Python identifier")
        if control.key in seen:
            raise ValueError(f"control key {control.key!r} is declared twice")
        seen.add(control.key)
        control.coerce(control.key, control.default)


def coerce_values(
    extension: str, controls: Sequence[Control], raw: Mapping[str, object]
) -> dict[str, ExtensionValue]:
    """Every declared control's value (defaults for the missing ones); ParamError "extensions.<ext>.<key>" otherwise."""
    by_key = {control.key: control for control in controls}
    for key in raw:
        if key not in by_key:
            raise ParamError(f"extensions.{extension}.{key}", f"unknown; expected one of {', '.join(by_key) or 'none'}")
    return {
        control.key: control.coerce(f"extensions.{extension}.{control.key}", raw.get(control.key, control.default))
        for control in controls
    }


def infotext_text(value: ExtensionValue) -> str:
    """A value as written after "Key: " (quoting is the infotext writer's job)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return f"{value:g}" if value == value and abs(value) < 1e15 else str(value)
    return str(value)


def infotext_fields_of(controls: Sequence[Control], values: Mapping[str, ExtensionValue]) -> dict[str, str]:
    """The infotext fields of the controls that declare a key and whose value is not the default."""
    fields: dict[str, str] = {}
    for control in controls:
        if control.infotext is None or control.key not in values:
            continue
        value = values[control.key]
        if value != control.default:
            fields[control.infotext] = infotext_text(value)
    return fields


def values_from_fields(
    extension: str, controls: Sequence[Control], fields: Mapping[str, str]
) -> dict[str, ExtensionValue]:
    """Control values from parsed infotext fields: a missing key means the default was in effect."""
    values: dict[str, ExtensionValue] = {}
    for control in controls:
        if control.infotext is None:
            continue
        raw = fields.get(control.infotext)
        values[control.key] = (
            control.default if raw is None else control.coerce(f"{control.infotext}", raw)
        )
    return values
