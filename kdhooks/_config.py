"""The config: YAML or a dict, validated before anything is attached."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from ._errors import ConfigError, did_you_mean
from ._on_policy import OnPolicy, on_policy_options
from ._options import Finite
from ._registry import Registry
from ._schedule import Schedule, is_schedule_spec, parse_schedule
from ._term import Term


class DistillConfig(BaseModel):
    """The top level of a kdhooks config."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    task_weight: Finite | dict[str, Any] | Schedule = 1.0
    terms: list[dict[str, Any] | Term] = Field(default_factory=list)
    plugins: list[str] = Field(default_factory=list)
    disable_plugins: list[str] = Field(default_factory=list)
    # read by the integration that generates (kdhooks.integrations.hf); validated as OnPolicy in load_config
    on_policy: dict[str, Any] | OnPolicy | None = None


def load_config(source: str | os.PathLike | dict | DistillConfig | None) -> DistillConfig:
    """Read a config from a YAML path, a YAML string, a dict or a DistillConfig."""
    if source is None:
        return DistillConfig()
    if isinstance(source, DistillConfig):
        return _with_on_policy(source)
    origin = "config"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if isinstance(source, os.PathLike) or (len(str(source)) < 4096 and "\n" not in str(source) and path.suffix in (".yaml", ".yml", ".json")):
            if not path.exists():
                raise ConfigError(str(path), "config file not found", value=str(path),
                                  fix="pass the path of a YAML file, a YAML string or a dict")
            origin, text = str(path), path.read_text()
        else:
            text = str(source)
        try:
            source = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark is not None else origin
            problem = " ".join(str(getattr(error, "problem", None) or error).split())
            raise ConfigError(where, f"not valid YAML: {problem}", fix="check the indentation and colons") from None
        if not isinstance(source, dict):
            raise ConfigError(origin, "a config is a mapping with `terms:`", value=source,
                              fix="write `terms: [{kind: kd, weight: 1}]`")
    try:
        config = DistillConfig.model_validate(source)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("dict[", "float", "Term", "is-instance")))
        if first["type"] == "extra_forbidden":
            name = str(first["loc"][0])
            raise ConfigError(f"{origin}:{name}" if origin != "config" else name, f"unknown config key {name!r}",
                              value=name, fix=did_you_mean(name, DistillConfig.model_fields)
                              or f"valid keys: {', '.join(DistillConfig.model_fields)}") from None
        key = str(first["loc"][0]) if first["loc"] else ""
        expected, fix = _TOP_LEVEL.get(key, (first["msg"], "see the README's config reference"))
        raise ConfigError(where or key or origin, f"{key} must be {expected}, got {first.get('input')!r}",
                          value=first.get("input"), fix=fix) from None
    return _with_on_policy(config)


def _with_on_policy(config: DistillConfig) -> DistillConfig:
    """The config with its ``on_policy`` mapping validated into OnPolicy (a typo names the closest option)."""
    config.on_policy = on_policy_options(config.on_policy)
    return config


# what each top-level key takes, for the message when pydantic rejects its value (a union's errors say little)
_TOP_LEVEL = {
    "task_weight": ("a finite number or a schedule",
                    "set task_weight to a finite number (e.g. 1.0) or a schedule such as "
                    "{kind: linear, start: 1.0, end: 0.5, steps: 1000}"),
    "terms": ("a list of terms", "write `terms: [{kind: kd, temperature: 4}]`"),
    "plugins": ("a list of plugin names", "write `plugins: [name, ...]` (see `kdhooks plugins`)"),
    "disable_plugins": ("a list of plugin names", "write `disable_plugins: [name, ...]` (see `kdhooks plugins`)"),
    "on_policy": ("a mapping of on-policy distillation options (GKD)",
                  "write `on_policy: {lmbda: 0.5, max_new_tokens: 64, temperature: 0.9}`"),
}


def build_terms(config: DistillConfig, registry: Registry) -> list[Term]:
    """Term objects from the config, each with a unique name and its schedules."""
    terms: list[Term] = []
    for index, spec in enumerate(config.terms):
        location = f"terms[{index}]"
        if isinstance(spec, Term):
            term = spec
        else:
            term = _build_term(dict(spec), registry, location)
        term.location = location
        terms.append(term)
    counts: dict[str, int] = {}
    for term in terms:
        counts[term.kind] = counts.get(term.kind, 0) + 1
    seen: dict[str, int] = {}
    for term in terms:
        if not term.name:
            i = seen[term.kind] = seen.get(term.kind, -1) + 1
            term.name = term.kind if counts[term.kind] == 1 else f"{term.kind}[{i}]"
    taken: set[str] = set()
    for term in terms:
        if term.name in taken:
            raise ConfigError(f"{term.location}.name", f"two terms are named {term.name!r}",
                              value=term.name, fix="give each term its own `name:`")
        taken.add(term.name)
    return terms


def _build_term(spec: dict[str, Any], registry: Registry, location: str) -> Term:
    if "kind" not in spec:
        raise ConfigError(location, "a term needs a `kind`",
                          fix=f"known kinds: {', '.join(sorted(registry.terms))}")
    kind = spec.pop("kind")
    if not isinstance(kind, str):
        raise ConfigError(f"{location}.kind", f"a term's kind is one name, got {type(kind).__name__} {kind!r}",
                          value=kind, fix=f"write one term per kind, e.g. `kind: {_first_name(kind)}`")
    term_class = registry.lookup("term", kind, f"{location}.kind")
    schedules = {option: parse_schedule(value, registry, f"{location}.{option}")
                 for option, value in spec.items() if is_schedule_spec(value)}
    # validate with each schedule's first value, then at every step where a schedule turns
    values = {**spec, **{option: schedule(0) for option, schedule in schedules.items()}}
    term = term_class.validate(values, location)
    for step in sorted({s for schedule in schedules.values() for s in schedule.key_steps()} - {0}):
        at_step = {**spec, **{option: schedule(step) for option, schedule in schedules.items()}}
        try:
            term_class.validate(at_step, location)
        except ConfigError as error:
            raise ConfigError(error.location, f"at step {step} its schedule gives {error.value!r}: {error.problem}",
                              value=error.value, fix="keep the schedule's values in the option's range") from None
    for option, schedule in schedules.items():
        setattr(term, option, schedule)
    return term


def _first_name(kind: Any) -> str:
    names = [k for k in kind if isinstance(k, str)] if isinstance(kind, (list, tuple)) else []
    return names[0] if names else "kd"


def parse_number(value: float | dict | Schedule, registry: Registry, location: str) -> float | Schedule:
    """A finite number or a schedule whose every key value is finite."""
    if is_schedule_spec(value):
        value = parse_schedule(value, registry, location)
    if isinstance(value, dict):
        raise ConfigError(location, "a number or a schedule `{schedule: ..., ...}`", value=value)
    for step in value.key_steps() if isinstance(value, Schedule) else [0]:
        number = value(step) if isinstance(value, Schedule) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ConfigError(location, f"must be a finite number, got {number!r}" +
                              (f" at step {step}" if isinstance(value, Schedule) else ""), value=number,
                              fix="a number such as 0.5")
    return value
