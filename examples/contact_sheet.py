"""One labelled image of the demo's outputs: a row per stage, a title and a one-line caption
above it, each tile upscaled (nearest neighbour: the 64 px toy outputs stay crisp) and named
below. Pure PIL, no service calls; examples/demo.py builds it, tests/deploy/test_demo.py checks it."""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

__all__ = ["Row", "contact_sheet"]

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (90, 90, 90)


@dataclass
class Row:
    title: str
    caption: str = ""
    tiles: list[tuple[str, Image.Image]] = field(default_factory=list)


def _font(size: int) -> ImageFont.ImageFont:
    # Pillow >= 10.1 scales its built-in font; older ones have one fixed size.
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_height(draw: ImageDraw.ImageDraw, font, text: str = "Ag") -> int:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return bottom - top


def contact_sheet(rows: list[Row], tile: int = 128, gap: int = 10, label_lines: int = 1) -> Image.Image:
    """The sheet as an RGB image. Rows without tiles are skipped; every tile is resized to
    ``tile`` x ``tile``; labels longer than a tile are truncated with an ellipsis."""
    rows = [row for row in rows if row.tiles]
    if not rows:
        raise ValueError("contact_sheet: no tiles")
    title_font, label_font = _font(15), _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = _text_height(probe, title_font) + 6
    label_h = (_text_height(probe, label_font) + 4) * label_lines + 2
    columns = max(len(row.tiles) for row in rows)
    width = gap + columns * (tile + gap)
    caption_h = title_h  # the caption shares the title's line height (smaller font)
    row_h = title_h + caption_h + tile + label_h + gap
    width = max(width, 2 * gap + max(int(probe.textlength(r.caption, font=label_font)) for r in rows))
    sheet = Image.new("RGB", (width, gap + row_h * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = gap
    for row in rows:
        draw.text((gap, y), row.title, fill=INK, font=title_font)
        draw.text((gap, y + title_h), row.caption, fill=MUTED, font=label_font)
        top = y + title_h + caption_h
        for index, (label, image) in enumerate(row.tiles):
            x = gap + index * (tile + gap)
            sheet.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (x, top))
            draw.rectangle((x - 1, top - 1, x + tile, top + tile), outline=(200, 200, 200))
            draw.text((x, top + tile + 3), _fit(draw, label, label_font, tile), fill=INK, font=label_font)
        y += row_h
    return sheet


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
