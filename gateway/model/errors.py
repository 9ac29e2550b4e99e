"""Errors that end a command with a clear one-line message and exit status 2."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["UserError", "InputError", "Problem"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an input file, located as ``PATH:LINE``."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class UserError(Exception):
    """Something the organiser must fix; printed without a traceback, exit status 2."""

    exit_status = 2


class InputError(UserError):
    """An input file has one or more problems; all of them are reported at once."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
