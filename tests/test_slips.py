"""`gateway tokens sheet`: slips on paper whose QR codes a phone reads as the account's viewer URL.

The PDF is rendered to PNG with poppler's pdftoppm and read with zbarimg (Debian zbar-tools), as a
phone's camera would read the printed page; the HTML page's QR images are read the same way.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.model.tokens import generate_tokens, format_tokens
from tests.system import require_program


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60)


def decode_qr(images: list[Path]) -> list[str]:
    result = subprocess.run(["zbarimg", "--quiet", "--raw", *map(str, images)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def make_tokens(tmp_path: Path, count: int) -> tuple[Path, list]:
    accounts = generate_tokens(count, host="localhost", prefix="ws", first_websocket_port=None, first_vnc_port=5901)
    path = tmp_path / "tokens.txt"
    path.write_text(format_tokens(accounts))
    path.chmod(0o600)
    return path, accounts


@pytest.mark.system  # zbarimg, pdftoppm, pdftotext
def test_pdf_slips_carry_each_account_and_a_qr_code_of_its_viewer_url(tmp_path: Path) -> None:
    for program in ("zbarimg", "pdftoppm", "pdftotext"):
        require_program(program)
    tokens, accounts = make_tokens(tmp_path, 10)
    config = tmp_path / "gateway.yaml"
    config.write_text("event:\n  title: Genomics Hands-on 2026\n")
    sheet = tmp_path / "slips.pdf"
    result = gateway("tokens", "sheet", str(tokens), "--url", "https://desktops.example.org/course",
                     "-o", str(sheet), "--per-page", "8", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "holds every password" in result.stderr
    assert sheet.stat().st_mode & 0o777 == 0o600

    subprocess.run(["pdftoppm", "-r", "150", "-png", str(sheet), str(tmp_path / "page")], check=True, timeout=60)
    pages = sorted(tmp_path.glob("page*.png"))
    assert len(pages) == 2  # 8 + 2 slips
    decoded = decode_qr(pages)
    expected = [f"https://desktops.example.org/course/view/{a.id}" for a in accounts]
    assert sorted(decoded) == sorted(expected)
    assert not any(a.password in text for a in accounts for text in decoded)

    text = subprocess.run(["pdftotext", "-layout", str(sheet), "-"], capture_output=True, text=True,
                          check=True).stdout
    assert text.count("Genomics Hands-on 2026") == 10
    for account in accounts:  # the password is printed as text on its account's slip
        assert re.search(rf"{account.id}\s", text) and account.password in text


@pytest.mark.system  # zbarimg
def test_html_slips_embed_decodable_qr_codes_and_bad_input_writes_nothing(tmp_path: Path) -> None:
    require_program("zbarimg")
    tokens, accounts = make_tokens(tmp_path, 3)
    sheet = tmp_path / "slips.html"
    result = gateway("tokens", "sheet", str(tokens), "--url", "http://127.0.0.1:8080", "-o", str(sheet))
    assert result.returncode == 0, result.stderr
    assert sheet.stat().st_mode & 0o777 == 0o600
    page = sheet.read_text()
    images = []
    for index, data in enumerate(re.findall(r'src="data:image/png;base64,([^"]+)"', page)):
        image = tmp_path / f"qr{index}.png"
        image.write_bytes(base64.b64decode(data))
        images.append(image)
    assert sorted(decode_qr(images)) == [f"http://127.0.0.1:8080/view/{a.id}" for a in accounts]
    for account in accounts:
        assert account.password in page
        assert f"password={account.password}" not in page and f"#{account.password}" not in page

    # An existing file is kept; a bad URL, suffix or count is one line with status 2, and no file.
    again = gateway("tokens", "sheet", str(tokens), "--url", "http://127.0.0.1:8080/", "-o", str(sheet))
    assert again.returncode == 2 and "exists" in again.stderr
    for args, message in (
        (["--url", "http://user:pw@example.org/", "-o", str(tmp_path / "a.pdf")], "no user, password"),
        (["--url", "example.org", "-o", str(tmp_path / "b.pdf")], "http:// or https://"),
        (["--url", "https://example.org/", "-o", str(tmp_path / "c.txt")], ".pdf or .html"),
        (["--url", "https://example.org/", "-o", str(tmp_path / "d.pdf"), "--per-page", "0"], "--per-page"),
    ):
        bad = gateway("tokens", "sheet", str(tokens), *args)
        assert bad.returncode == 2, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0] in "abcd") == []
