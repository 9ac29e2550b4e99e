"""README.md tells the truth: its configuration reference lists exactly the keys the gateway reads,
and the example there is a valid configuration."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import yaml

from gateway.model.config import NOT_FROM_YAML, Config, parse_config

README = Path(__file__).resolve().parent.parent / "README.md"


def config_block() -> str:
    text = README.read_text()
    section = text[text.index("## Configuration"):]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def flatten(mapping: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in mapping.items():
        if isinstance(value, dict):
            keys |= flatten(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


def config_keys(cls: type = Config, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls)
    keys = set()
    for field in dataclasses.fields(cls):
        if field.name in NOT_FROM_YAML:
            continue
        if dataclasses.is_dataclass(hints[field.name]):
            keys |= config_keys(hints[field.name], f"{prefix}{field.name}.")
        else:
            keys.add(prefix + field.name)
    return keys


def test_readme_documents_every_config_key_and_no_other() -> None:
    documented = flatten(yaml.safe_load(config_block()))
    actual = config_keys()
    assert sorted(actual - documented) == [], "keys missing from README.md"
    assert sorted(documented - actual) == [], "README.md documents keys the gateway doesn't read"


def test_readme_example_is_a_valid_config() -> None:
    text = config_block().replace("[<checkout>/containers/desktop-session]", "[/bin/true]")
    config = parse_config(text, "README.md")
    assert config == parse_config(text, "README.md")
