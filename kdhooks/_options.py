"""Typed options: the dataclass-with-validation base of terms and schedules."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pydantic
from pydantic import ConfigDict

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
            where = ".".join(str(p) for p in first["loc"])
            full = f"{location}.{where}" if where else location
            if first["type"] == "unexpected_keyword_argument" or first["type"] == "extra_forbidden":
                name = str(first["loc"][-1])
                raise ConfigError(full, f"unknown option {name!r} for {cls.__name__}", value=name,
                                  fix=did_you_mean(name, cls.option_names())
                                  or f"valid options: {', '.join(cls.option_names())}") from None
            if first["type"] == "missing" or first["type"] == "missing_keyword_argument":
                raise ConfigError(full, f"{cls.__name__} needs the option {str(first['loc'][-1])!r}",
                                  fix=f"add `{first['loc'][-1]}: ...` to {location}") from None
            raise ConfigError(full, first["msg"], value=first.get("input"),
                              fix=f"valid options of {cls.__name__}: {', '.join(cls.option_names())}") from None
