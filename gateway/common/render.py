"""One jinja2 environment for every generated file (Apache rules, job scripts, unit files).

Templates are data, kept in ``gateway/templates``. Undefined variables are errors, and values that
reach Apache or a shell pass through a validating filter, so no value from a token file or config
can add a directive or a command.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import jinja2

__all__ = ["render", "register_filter", "apache_quote", "shell_quote", "UnsafeValue"]

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


class UnsafeValue(ValueError):
    """A value would change the meaning of a generated file."""


_APACHE_FORBIDDEN = re.compile(r'["\\\x00-\x1f\x7f]')


def apache_quote(value: Any) -> str:
    """A double-quoted Apache argument; refuses quotes, backslashes and control characters."""
    text = str(value)
    if _APACHE_FORBIDDEN.search(text):
        raise UnsafeValue(f"value {text[:60]!r} cannot be used in the Apache configuration")
    return f'"{text}"'


def shell_quote(value: Any) -> str:
    """A single shell word; refuses newlines and NUL, which no legitimate value here contains."""
    text = str(value)
    if "\n" in text or "\r" in text or "\x00" in text:
        raise UnsafeValue(f"value {text[:60]!r} cannot be used in a script")
    return shlex.quote(text)


_environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    undefined=jinja2.StrictUndefined,
    autoescape=False,  # these are config files and scripts, not HTML; quoting is done by filters
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
_environment.filters["apache_quote"] = apache_quote
_environment.filters["shell_quote"] = shell_quote


def register_filter(name: str, function: Any) -> None:
    """Add a quoting or validating filter for templates of one kind (unit files, job scripts)."""
    _environment.filters[name] = function


def render(template: str, **context: Any) -> str:
    return _environment.get_template(template).render(**context)
