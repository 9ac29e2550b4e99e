"""The terms documents of the sign-up form (``registration.documents``): Markdown, shown as safe HTML."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

from gateway.model.config import Config
from gateway.model.errors import UserError

__all__ = ["TermsDocument", "load_documents", "render_markdown"]

_MARKDOWN = MarkdownIt("commonmark", {"html": False})  # raw HTML in a document is shown as text


def render_markdown(text: str) -> str:
    """Markdown as safe HTML: HTML in the source is escaped, unsafe link schemes are dropped."""
    return _MARKDOWN.render(text)


@dataclass(frozen=True, slots=True)
class TermsDocument:
    title: str
    html: str
    #: What a sign-up accepted is recorded by this hash of the document's text.
    sha256: str


def load_documents(config: Config) -> tuple[TermsDocument, ...]:
    """Read registration.documents (relative paths: beside the config file). UserError if unreadable."""
    base = Path(config.source).parent if not config.source.startswith("<") else Path.cwd()
    documents = []
    for name in config.registration.documents:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else base / path
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"registration.documents: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        heading = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), "")
        documents.append(TermsDocument(heading or path.stem, render_markdown(text),
                                       hashlib.sha256(text.encode()).hexdigest()))
    return tuple(documents)
