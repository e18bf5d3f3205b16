"""Pictures of a run, drawn with Pillow: the confusion matrix, a grid of misclassified
thumbnails, and line charts (training curves, the learning-rate finder's loss).

TensorBoard (`retrain.reporting.summaries`) and the HTML report (`retrain.reporting.html`) show the
same
pictures; both take them from here as PIL images or PNG bytes. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from retrain.errors import RetrainError
from retrain.results import Mistake

BACKGROUND = (255, 255, 255)
INK = (33, 33, 33)
GRID = (225, 225, 225)
MISTAKE = (198, 40, 40)
# Line colours of a chart's series, in order (colour-blind safe, from Okabe and Ito).
SERIES_COLOURS = ((0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233))
THUMBNAIL = 128  # pixels, the longer side of a misclassified image's thumbnail
CAPTION = 34  # pixels of text under each thumbnail


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at `size` pixels."""
    return ImageFont.load_default(size=size)


def png_bytes(image: Image.Image) -> bytes:
    """The image as a PNG file's bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def as_array(image: Image.Image) -> np.ndarray:
    """uint8 [height, width, 3]: what tf.summary.image takes (with a batch axis added)."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def confusion_image(matrix: np.ndarray, names: Sequence[str], cell: int = 44) -> Image.Image:
    """The confusion matrix (rows: true class, columns: predicted) as a heat map with counts.

    Each cell is shaded by its share of the row (the true class's recall on the diagonal), so
    small classes read as clearly as big ones.
    """
    k = len(names)
    label_font, count_font = font(13), font(max(10, cell // 3))
    margin = min(220, 16 + max(_text_width(label_font, n) for n in names))
    size = (margin + k * cell + 12, margin + k * cell + 12)
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for row in range(k):
        for col in range(k):
            box = _cell_box(margin, cell, row, col)
            shade = _shade(shares[row, col], diagonal=row == col)
            draw.rectangle(box, fill=shade, outline=GRID)
            text = str(int(matrix[row, col]))
            colour = BACKGROUND if shares[row, col] > 0.55 else INK
            _centred(draw, box, text, count_font, colour)
    for i, name in enumerate(names):
        short = _fit(label_font, name, margin - 12)
        y = margin + i * cell + cell // 2
        draw.text((margin - 6, y), short, font=label_font, fill=INK, anchor="rm")
        _vertical_label(image, short, label_font, margin + i * cell + cell // 2, margin - 6)
    draw.text((4, 2), "rows: true class", font=font(11), fill=INK)
    draw.text((4, 16), "columns: predicted", font=font(11), fill=INK)
    return image


def mistakes_grid(mistakes: Sequence[Mistake], columns: int = 6) -> Image.Image | None:
    """Thumbnails of misclassified images, each captioned with its true and predicted label
    and score, in rows of `columns`; None when there is no mistake. An image that cannot be
    read is drawn as an empty tile, captioned all the same."""
    if not mistakes:
        return None
    columns = min(columns, len(mistakes))
    rows = math.ceil(len(mistakes) / columns)
    tile_w, tile_h = THUMBNAIL + 8, THUMBNAIL + CAPTION + 8
    image = Image.new("RGB", (columns * tile_w, rows * tile_h), BACKGROUND)
    draw = ImageDraw.Draw(image)
    caption_font = font(11)
    for i, mistake in enumerate(mistakes):
        x, y = (i % columns) * tile_w + 4, (i // columns) * tile_h + 4
        thumb = thumbnail(mistake.path)
        if thumb is not None:
            image.paste(thumb, (x + (THUMBNAIL - thumb.width) // 2, y))
        true_line = _fit(caption_font, f"true: {mistake.actual}", THUMBNAIL)
        guess_line = _fit(caption_font, f"{mistake.predicted} {mistake.score:.2f}", THUMBNAIL)
        draw.text((x, y + THUMBNAIL + 3), true_line, font=caption_font, fill=INK)
        draw.text((x, y + THUMBNAIL + 17), guess_line, font=caption_font, fill=MISTAKE)
    return image


def thumbnail(path: str | Path, size: int = THUMBNAIL) -> Image.Image | None:
    """The image file shrunk to fit a `size` square (EXIF rotation applied), or None if it
    cannot be read."""
    try:
        with Image.open(path) as opened:
            opened.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    image.thumbnail((size, size))
    return image


def line_chart(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    x_label: str,
    log_x: bool = False,
    marker: float | None = None,
    size: tuple[int, int] = (520, 280),
) -> Image.Image:
    """A line chart of named (x, y) series, with axes, ticks and a legend; non-finite points
    are left out. `marker` draws a vertical line at that x (e.g. a suggested rate)."""
    points = {
        name: [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
        for name, (xs, ys) in series.items()
    }
    every = [p for line in points.values() for p in line]
    if not every:
        raise RetrainError(f"nothing to plot in {title!r}: no finite value")
    x_of = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs = [x_of(x) for x, _ in every]
    ys = [y for _, y in every]
    x_range, y_range = _padded(min(xs), max(xs)), _padded(min(ys), max(ys))
    width, height = size
    left, right, top, bottom = 56, 12, 28, 40
    plot = (left, top, width - right, height - bottom)
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    small = font(11)

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        fx = (x_of(x) - x_range[0]) / (x_range[1] - x_range[0])
        fy = (y - y_range[0]) / (y_range[1] - y_range[0])
        return plot[0] + fx * (plot[2] - plot[0]), plot[3] - fy * (plot[3] - plot[1])

    for value in _ticks(*y_range):
        _, py = to_pixel(10 ** x_range[0] if log_x else x_range[0], value)
        draw.line((plot[0], py, plot[2], py), fill=GRID)
        draw.text((plot[0] - 4, py), f"{value:g}", font=small, fill=INK, anchor="rm")
    for value in _ticks(*x_range):
        px = plot[0] + (value - x_range[0]) / (x_range[1] - x_range[0]) * (plot[2] - plot[0])
        draw.line((px, plot[1], px, plot[3]), fill=GRID)
        label = f"1e{value:g}" if log_x else f"{value:g}"
        draw.text((px, plot[3] + 4), label, font=small, fill=INK, anchor="mt")
    draw.rectangle(plot, outline=INK)
    if marker is not None and marker > 0:
        px, _ = to_pixel(marker, y_range[0])
        draw.line((px, plot[1], px, plot[3]), fill=MISTAKE, width=2)
    for i, (name, line) in enumerate(points.items()):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        pixels = [to_pixel(x, y) for x, y in line]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        elif pixels:
            px, py = pixels[0]
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        x = plot[0] + 8 + 130 * i
        draw.line((x, 14, x + 16, 14), fill=colour, width=2)
        draw.text((x + 20, 14), name, font=small, fill=colour, anchor="lm")
    draw.text((width // 2, height - 4), x_label, font=small, fill=INK, anchor="mb")
    draw.text((width - right, 8), title, font=font(12), fill=INK, anchor="ra")
    return image


def _cell_box(margin: int, cell: int, row: int, col: int) -> tuple[int, int, int, int]:
    x, y = margin + col * cell, margin + row * cell
    return x, y, x + cell, y + cell


def _shade(share: float, diagonal: bool) -> tuple[int, int, int]:
    """White to blue for the diagonal (right), white to red elsewhere (confusions)."""
    target = (8, 81, 156) if diagonal else (165, 15, 21)
    return tuple(int(255 + (t - 255) * share) for t in target)


def _centred(draw: ImageDraw.ImageDraw, box, text: str, text_font, colour) -> None:
    draw.text(
        ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2),
        text,
        font=text_font,
        fill=colour,
        anchor="mm",
    )


def _vertical_label(image: Image.Image, text: str, text_font, x: int, bottom: int) -> None:
    """`text` rotated to read upwards, centred on column x, ending at y = bottom."""
    width = _text_width(text_font, text) + 4
    strip = Image.new("RGB", (width, 16), BACKGROUND)
    ImageDraw.Draw(strip).text((width - 2, 8), text, font=text_font, fill=INK, anchor="rm")
    rotated = strip.rotate(90, expand=True)
    image.paste(rotated, (x - rotated.width // 2, bottom - rotated.height))


def _text_width(text_font, text: str) -> int:
    left, _, right, _ = text_font.getbbox(text)
    return int(right - left)


def _fit(text_font, text: str, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if _text_width(text_font, text) <= width:
        return text
    while text and _text_width(text_font, text + "\u2026") > width:
        text = text[:-1]
    return text + "\u2026"


def _padded(low: float, high: float) -> tuple[float, float]:
    """An axis range around [low, high], never empty."""
    if high - low <= 1e-9 * max(abs(low), abs(high)):
        pad = 0.5 * abs(low) if low else 0.5  # a constant: centred, on its own scale
        return low - pad, high + pad
    pad = 0.05 * (high - low)
    return low - pad, high + pad


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values between low and high."""
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step) + 1)]
