"""The report as a browser shows it: headless Chromium renders the page, screenshots it and dumps its DOM.

The screenshot must be a real rendering (the expected size, many colours, the red "missed" badge of the
CSS and the blue bars of an inline plot), and the rendered text must carry the verdicts a reader looks for.
Skipped only when ``chromium`` is not installed (``.ci/run`` installs Debian's package when it is missing).
"""

from __future__ import annotations

import importlib.util
import io
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slimguard.report import write_report

Result = dict[str, Any]  # a metrics.json object (the ``full_result`` fixture)
Text = Callable[[str], str]  # the ``page_text`` fixture: a page's visible text

CHROMIUM = shutil.which("chromium")
WIDTH, HEIGHT = 1200, 2000
RED_BADGE, BLUE_BAR = (0xC0, 0x39, 0x2B), (0x2A, 0x7A, 0xB9)  # .bad in the CSS; the compressed bar in the plots

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


def _chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium on ``url`` with nothing from the network, bounded to 60 s."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", f"--window-size={WIDTH},{HEIGHT}", *extra, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def png_pixels(data: bytes) -> tuple[int, int, set[tuple[int, int, int]], float]:
    """Width, height, the set of RGB colours and the share of non-white pixels of a PNG.

    Pillow decodes it when installed (it comes with matplotlib, the ``report`` extra); otherwise a small
    decoder does, with zlib and the five row filters of the PNG spec (section 9), for 8-bit RGB(A) images
    such as Chromium's screenshots (slower: about 2 s for a 1200x2000 screenshot).
    """
    try:
        from PIL import Image
    except ImportError:
        return _png_pixels_zlib(data)
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    pixels = rgb.width * rgb.height
    counts = {colour: n for n, colour in rgb.getcolors(maxcolors=pixels)}
    return rgb.width, rgb.height, set(counts), 1 - counts.get((255, 255, 255), 0) / pixels


def _png_pixels_zlib(data: bytes) -> tuple[int, int, set[tuple[int, int, int]], float]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, colours, ink = bytearray(stride), set(), 0
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a, b = line[i - bpp] if i >= bpp else 0, prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:  # Sub
                line[i] = (line[i] + a) & 255
            elif f == 2:  # Up
                line[i] = (line[i] + b) & 255
            elif f == 3:  # Average
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:  # Paeth
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        for i in range(0, stride, bpp):
            rgb = (line[i], line[i + 1], line[i + 2])
            colours.add(rgb)
            ink += rgb != (255, 255, 255)
        prev = line
    return width, height, colours, ink / (width * height)


def test_the_zlib_png_decoder_agrees_with_pillow(full_result: Result) -> None:
    """The fallback decoder reads a real PNG (matplotlib's, with every row filter libpng picks) as Pillow does."""
    pytest.importorskip("PIL")
    pytest.importorskip("matplotlib")
    from slimguard.report.plots import plots

    png = plots(full_result["baseline"], full_result["compressed"], full_result["speed"])[1][1]
    ours, pillow = _png_pixels_zlib(png), png_pixels(png)
    assert ours[:3] == pillow[:3] and len(ours[2]) > 10
    assert ours[3] == pytest.approx(pillow[3], abs=1e-12)  # the same pixel count, divided in another order


@needs_chromium
def test_chromium_renders_the_report_with_its_verdicts(tmp_path: Path, full_result: Result, page_text: Text) -> None:
    page = write_report(full_result, tmp_path / "report.html", title="slimguard: small (budget missed)")
    shot = tmp_path / "shot.png"
    dom = _chromium(page.resolve().as_uri(), tmp_path, f"--screenshot={shot}", "--dump-dom").stdout
    assert shot.is_file() and shot.stat().st_size > 50_000  # a blank 1200x2000 page compresses to a few KB

    width, height, colours, ink = png_pixels(shot.read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    assert len(colours) > 100 and 0.03 < ink < 0.6  # text, tables and plots; not blank, not one block of colour
    assert RED_BADGE in colours  # the CSS styled the "missed" badge (the plots use another red)
    if importlib.util.find_spec("matplotlib") is not None:
        assert BLUE_BAR in colours  # an inline PNG plot was decoded and drawn

    text = page_text(dom)
    assert "speed no measurable difference ratio 0.97x" in text  # the speed verdict, at a glance
    assert "verdict no measurable difference speed ratio 0.97x" in text  # and under Speed
    assert "Budget missed" in text and 'class="badge bad">missed</span>' in dom  # the budget badge
    assert "sparsity=0.5" in text  # a step option
    assert "4.weight_int8" in text  # a layer
    assert "AMD EPYC 7B13 64-Core Processor" in text  # the CPU model
