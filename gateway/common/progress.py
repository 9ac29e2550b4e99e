"""A progress bar for long work (N desktops coming up, N archives), without threads.

On a terminal it redraws one line; otherwise (a log file, the journal) it prints a line only
when a tenth more of the work is done, so logs stay readable.
"""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, *, label: str = "desktops ready", stream: TextIO | None = None,
                 width: int = 30) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self._last_line = ""
        self._last_decile = -1
        self._finished = False

    def update(self, done: int, failed: int = 0) -> None:
        if self._finished:
            return
        line = self._line(done, failed)
        if line == self._last_line:
            return
        self._last_line = line
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
            return
        decile = (done + failed) * 10 // self.total
        if decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(line + "\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty and not self._finished:
            self.stream.write("\n")
            self.stream.flush()
        self._finished = True

    def _line(self, done: int, failed: int) -> str:
        filled = self.width * (done + failed) // self.total
        bar = "#" * filled + "." * (self.width - filled)
        extra = f", {failed} failed" if failed else ""
        return f"[{bar}] {done}/{self.total} {self.label}{extra}"
