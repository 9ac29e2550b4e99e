"""Account slips to hand out on paper: `gateway tokens sheet TOKENS --url URL -o slips.pdf|slips.html`.

One slip per account with the event's title, the landing page URL, the account, its password and a
QR code of the account's viewer URL (``URL/view/ACCOUNT``). The password is printed as text only:
never in the QR code, never in a URL. The PDF is drawn with reportlab (the QR code as vector squares
from segno's matrix, so it stays sharp at any print size); the HTML page (for printing from a
browser) embeds each QR code as a PNG made by segno. Both files are written 0600: they hold passwords.
"""

from __future__ import annotations

import io
import math
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import segno

from gateway.model.errors import UserError
from gateway.common.render import TEMPLATE_DIR
from gateway.model.tokens import Account

__all__ = ["Slip", "SHEET_FORMATS", "check_url", "viewer_url", "make_slips", "render_pdf", "render_html",
           "render_sheet"]

#: Output formats by file name suffix.
SHEET_FORMATS = (".pdf", ".html")
DEFAULT_PER_PAGE = 8
MAX_PER_PAGE = 24


@dataclass(frozen=True, slots=True)
class Slip:
    account: str
    password: str
    #: The landing page (printed) and the account's viewer page (in the QR code and printed).
    url: str
    viewer_url: str


def check_url(url: str) -> str:
    """The landing page URL, normalised to end with "/"; UserError for anything else."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--url {url!r}: give the landing page's http:// or https:// URL, e.g. "
                        "https://desktops.example.org/")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise UserError(f"--url {url!r}: the URL must have no user, password, query or fragment")
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def viewer_url(base_url: str, account_id: str) -> str:
    return f"{base_url}view/{urllib.parse.quote(account_id, safe='')}"


def make_slips(accounts: Sequence[Account], base_url: str) -> list[Slip]:
    return [Slip(a.id, a.password, base_url, viewer_url(base_url, a.id)) for a in accounts]


def _qr(data: str) -> segno.QRCode:
    return segno.make_qr(data, error="m")


# -- PDF (reportlab) --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Grid:
    columns: int
    rows: int
    width: float
    height: float


def _grid(per_page: int, page_width: float, page_height: float, margin: float) -> _Grid:
    columns = 1 if per_page <= 4 else 2
    rows = math.ceil(per_page / columns)
    return _Grid(columns, rows, (page_width - 2 * margin) / columns, (page_height - 2 * margin) / rows)


def _draw_qr(canvas, data: str, x: float, y: float, size: float) -> None:  # type: ignore[no-untyped-def]
    """The QR code of ``data`` as black squares, ``size`` points wide (quiet zone included)."""
    code = _qr(data)
    matrix = code.matrix
    border = 4
    modules = len(matrix) + 2 * border
    cell = size / modules
    canvas.setFillColorRGB(1, 1, 1)
    canvas.rect(x, y, size, size, stroke=0, fill=1)
    canvas.setFillColorRGB(0, 0, 0)
    for row_index, row in enumerate(matrix):
        for column_index, dark in enumerate(row):
            if dark:
                canvas.rect(x + (column_index + border) * cell, y + size - (row_index + border + 1) * cell,
                            cell, cell, stroke=0, fill=1)


def _fit(canvas, text: str, font: str, size: float, width: float) -> float:  # type: ignore[no-untyped-def]
    """The largest font size up to ``size`` at which ``text`` fits in ``width``."""
    while size > 5 and canvas.stringWidth(text, font, size) > width:
        size -= 0.5
    return size


def _draw_slip(canvas, slip: Slip, title: str, x: float, y: float, grid: _Grid) -> None:  # type: ignore[no-untyped-def]
    pad = 10.0
    qr_size = min(grid.height - 2 * pad, grid.width * 0.42)
    text_width = grid.width - qr_size - 3 * pad
    canvas.setDash(3, 3)
    canvas.setStrokeColorRGB(0.6, 0.6, 0.6)
    canvas.rect(x, y, grid.width, grid.height, stroke=1, fill=0)
    canvas.setDash()
    _draw_qr(canvas, slip.viewer_url, x + grid.width - qr_size - pad, y + (grid.height - qr_size) / 2, qr_size)
    lines = [
        ("Helvetica-Bold", 13.0, title),
        ("Helvetica", 9.0, slip.url),
        ("Helvetica", 10.0, "Account"),
        ("Courier-Bold", 15.0, slip.account),
        ("Helvetica", 10.0, "Password"),
        ("Courier-Bold", 15.0, slip.password),
        ("Helvetica", 7.5, "Scan the code for your desktop; type the password there."),
    ]
    cursor = y + grid.height - pad
    step = (grid.height - 2 * pad) / len(lines)
    canvas.setFillColorRGB(0, 0, 0)
    for font, size, text in lines:
        size = _fit(canvas, text, font, min(size, step * 0.9), text_width)
        cursor -= step
        canvas.setFont(font, size)
        canvas.drawString(x + pad, cursor + (step - size) / 2, text)


def render_pdf(slips: Sequence[Slip], *, title: str, per_page: int = DEFAULT_PER_PAGE) -> bytes:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen.canvas import Canvas

    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=A4, pageCompression=1)
    canvas.setTitle(f"{title}: account slips")
    canvas.setSubject("Holds passwords: keep it private, destroy it after the event")
    width, height = A4
    margin = 28.0
    grid = _grid(per_page, width, height, margin)
    for page_start in range(0, len(slips), per_page):
        for index, slip in enumerate(slips[page_start:page_start + per_page]):
            column, row = index % grid.columns, index // grid.columns
            _draw_slip(canvas, slip, title, margin + column * grid.width,
                       height - margin - (row + 1) * grid.height, grid)
        canvas.showPage()
    canvas.save()
    return buffer.getvalue()


# -- HTML (printed from the browser) ------------------------------------------------------------------

_html = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
                           autoescape=True)


def render_html(slips: Sequence[Slip], *, title: str, per_page: int = DEFAULT_PER_PAGE) -> str:
    pages = [
        [dict(account=s.account, password=s.password, url=s.url, viewer_url=s.viewer_url,
              qr=_qr(s.viewer_url).png_data_uri(scale=4, border=4)) for s in slips[i:i + per_page]]
        for i in range(0, len(slips), per_page)
    ]
    return _html.get_template("slips.html.j2").render(title=title, pages=pages,
                                                      columns=1 if per_page <= 4 else 2)


def render_sheet(path: Path, slips: Sequence[Slip], *, title: str, per_page: int) -> bytes:
    """The sheet's bytes in the format ``path``'s suffix names (.pdf or .html)."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return render_pdf(slips, title=title, per_page=per_page)
    if suffix == ".html":
        return render_html(slips, title=title, per_page=per_page).encode()
    raise UserError(f"{path}: name the file .pdf or .html (the format follows the suffix)")
