"""The gateway's YAML configuration: read into the frozen dataclass tree, validated with ``PATH:LINE:`` errors.

Every key has a default, so an empty or missing file is a valid configuration (the embedded
local default). Unknown keys are errors: a typo must not silently fall back to a default.

The tree itself is :mod:`gateway.model.config_schema` and the rules between values are
:mod:`gateway.model.config_checks`; both are re-exported here, so that ``from gateway.model.config
import Config, parse_config, parse_listen`` serves every reader of the configuration.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.model import config_checks, config_schema
from gateway.model.config_checks import *  # noqa: F403 - re-exported: the helpers that apply values
from gateway.model.config_checks import config_warnings, semantic_problems
from gateway.model.config_schema import *  # noqa: F403 - re-exported: the dataclass tree
from gateway.model.config_schema import Config
from gateway.model.errors import InputError, Problem

__all__ = ["load_config", "parse_config", "NOT_FROM_YAML", *config_schema.__all__, *config_checks.__all__]

#: Fields of :class:`Config` the reader fills itself (where the file came from, its warnings): never YAML keys.
NOT_FROM_YAML = frozenset({"source", "warnings"})


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a YAML config; None gives the defaults."""
    if path is None:
        return Config()
    shown = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InputError([Problem(shown, 0, f"cannot read config: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise InputError([Problem(shown, 0, "config is not valid UTF-8 text")]) from None
    return parse_config(text, shown)


def parse_config(text: str, path: str = "<config>") -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError([Problem(path, line, f"invalid YAML: {reason}")]) from None
    problems: list[Problem] = []
    if node is None:
        return Config(source=path)
    reader = _Reader(path, problems)
    values = reader.dataclass_values(Config, node, "")
    if problems:
        raise InputError(problems)
    config = Config(**values, source=path)
    problems.extend(semantic_problems(config, path, reader.lines))
    if problems:
        raise InputError(problems)
    warnings = tuple(str(warning) for warning in config_warnings(config, path, reader.lines))
    return dataclasses.replace(config, warnings=warnings) if warnings else config


class _Reader:
    """Turns a composed YAML node tree into constructor arguments, following the dataclass fields.

    Only fields declared on the dataclasses are read; anything else is reported, never set.
    """

    def __init__(self, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        self.lines: dict[str, int] = {}

    def bad(self, node: yaml.Node, message: str) -> None:
        self.problems.append(Problem(self.path, node.start_mark.line + 1, message))

    def dataclass_values(self, cls: type, node: yaml.Node, prefix: str) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            self.bad(node, f"{prefix or 'config'} must be a mapping of keys to values")
            return {}
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls) if f.name not in NOT_FROM_YAML}
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            dotted = f"{prefix}{key}"
            if key not in known:
                self.bad(key_node, f"unknown key {dotted!r} (known: {', '.join(sorted(known))})")
                continue
            if key in values:
                self.bad(key_node, f"{dotted} is given twice")
                continue
            self.lines[dotted] = key_node.start_mark.line + 1
            value = self.value(hints[key], value_node, dotted)
            if value is not _INVALID:
                values[key] = value
        return values

    def value(self, hint: Any, node: yaml.Node, dotted: str) -> Any:
        if dataclasses.is_dataclass(hint):
            return hint(**self.dataclass_values(hint, node, dotted + "."))
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            if _is_null(node) and type(None) in args:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return self.value(inner, node, dotted)
        if origin is Literal:
            raw = self.scalar(node, dotted)
            if raw is _INVALID or raw not in args:
                self.bad(node, f"{dotted} must be one of: {', '.join(map(str, args))}")
                return _INVALID
            return raw
        if origin is tuple:
            return self.string_list(node, dotted, float if args and args[0] is float else str)
        return self.typed_scalar(hint, node, dotted)

    def scalar(self, node: yaml.Node, dotted: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.bad(node, f"{dotted} must be a single value")
            return _INVALID
        try:
            value = yaml.constructor.SafeConstructor().construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:  # e.g. a !!python/object tag
            self.bad(node, f"{dotted}: {exc.problem or 'not a plain value'}")
            return _INVALID
        control = _TEXT_CONTROL_RE if dotted in _MULTILINE_KEYS else _CONTROL_RE
        if isinstance(value, str) and control.search(value):
            # A newline in a value would start a new directive in the Apache config, the unit file
            # or a job script; no setting needs one.
            self.bad(node, f"{dotted} must be one line without control characters")
            return _INVALID
        return value

    def typed_scalar(self, hint: type, node: yaml.Node, dotted: str) -> Any:
        raw = self.scalar(node, dotted)
        if raw is _INVALID:
            return _INVALID
        if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
            raw = float(raw)
        if hint is str and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            raw = str(raw)
        if hint is str and isinstance(raw, datetime.date):  # an unquoted YAML timestamp
            raw = raw.isoformat()
        if not isinstance(raw, hint) or (hint is int and isinstance(raw, bool)):
            self.bad(node, f"{dotted} must be {_TYPE_WORDS.get(hint, hint.__name__)}, not {raw!r}")
            return _INVALID
        return raw

    def string_list(self, node: yaml.Node, dotted: str, item_type: type = str) -> Any:
        if isinstance(node, yaml.ScalarNode):
            example = "[15, 5]" if item_type is float else "[program, --option]"
            self.bad(node, f"{dotted} must be a list, e.g. {example}")
            return _INVALID
        if not isinstance(node, yaml.SequenceNode):
            self.bad(node, f"{dotted} must be a list of strings")
            return _INVALID
        items = [self.typed_scalar(item_type, item, dotted) for item in node.value]
        return _INVALID if _INVALID in items else tuple(items)


_INVALID = object()
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
#: Settings that are text for people, where line breaks (and tabs) are meant.
_MULTILINE_KEYS = frozenset({"event.welcome"})
_TEXT_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"
