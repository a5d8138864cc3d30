"""Typed options: the dataclass-with-validation base of terms and schedules."""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar

import pydantic
from pydantic import ConfigDict, Field

from ._errors import ConfigError, did_you_mean


class Options:
    """A class whose annotated attributes are options, validated by pydantic.

    Subclasses become keyword-only dataclasses automatically, so a plugin writes
    ``temperature: float = 4.0`` and nothing else.
    """

    __pydantic_config__: ClassVar = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__dataclass_fields__" not in cls.__dict__:
            dataclasses.dataclass(cls, kw_only=True, eq=False)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def validate(cls, values: dict[str, Any], location: str) -> Any:
        """An instance from config values; a ConfigError that names the option otherwise."""
        try:
            return pydantic.TypeAdapter(cls).validate_python(values)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            where = _dotted(first["loc"])
            full = f"{location}{where}"
            if first["type"] == "unexpected_keyword_argument" or first["type"] == "extra_forbidden":
                name = str(first["loc"][-1])
                raise ConfigError(full, f"unknown option {name!r} for {cls.__name__}", value=name,
                                  fix=did_you_mean(name, cls.option_names())
                                  or f"valid options: {', '.join(cls.option_names())}") from None
            if first["type"] == "missing" or first["type"] == "missing_keyword_argument":
                raise ConfigError(full, f"{cls.__name__} needs the option {str(first['loc'][-1])!r}",
                                  fix=f"add `{first['loc'][-1]}: ...` to {location}") from None
            # a list item's loc ends in its index: the option is the last named part, the index shows in `full`
            option = next((str(part) for part in reversed(first["loc"]) if isinstance(part, str)), location)
            if first["type"] in _RANGE_ERRORS:
                wanted = first["msg"].removeprefix("Input should be ")
                if first["type"] not in ("float_type", "int_type", "bool_type", "float_parsing", "int_parsing",
                                         "finite_number"):
                    wanted = f"a number {wanted}"
                given = first.get("input")
                note = " (true/false is not a number)" if isinstance(given, bool) else ""
                fix = f"set {option} to {wanted}"
                if isinstance(given, dict):
                    # a mapping where a number goes is a schedule missing its `schedule:` key (often `kind:`)
                    note = " (a mapping here is a schedule, and it has no `schedule:` key)"
                    fix = f"write `{option}: {{schedule: linear, start: ..., end: ..., steps: ...}}` or {fix}"
                raise ConfigError(full, f"{option} must be {wanted}, got {given!r}{note}",
                                  value=given, fix=fix) from None
            raise ConfigError(full, first["msg"], value=first.get("input"),
                              fix=f"valid options of {cls.__name__}: {', '.join(cls.option_names())}") from None


def _dotted(loc: tuple[Any, ...]) -> str:
    """A pydantic loc as a config path suffix: ``('milestones', 0)`` -> ``.milestones[0]``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                 "float_type", "int_type", "bool_type", "int_from_float", "float_parsing", "int_parsing"}


# Option types with their valid range: the validator's message names the option, the value and the range.
# Strict: a YAML `yes` (a bool) or `"4"` is not a number; an int is a valid float.
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Positive = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
UnitInterval = Annotated[float, Field(strict=True, ge=0, le=1)]
PositiveInt = Annotated[int, Field(strict=True, gt=0)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
