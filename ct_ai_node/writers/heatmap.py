"""Rendering of heat-map images: lung window, colour map, blending and a burned-in
caption. Pure numpy + Pillow; no DICOM here (see ``secondary_capture``).

Speed matters (about 200 slices of 512x512 per study): windowing and colouring are
lookup tables, blending touches only the pixels with visible heat, and caption lines
are rasterised once per distinct text and reused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ct_ai_node.writers.common import NOT_FOR_DIAGNOSTIC_USE, Caption

#: lung window, as (0028,1050) Window Center / (0028,1051) Window Width in HU
LUNG_WINDOW = (-600.0, 1500.0)

# Anchor points (position 0..1, R, G, B) of the colour maps; linear in between.
_ANCHORS: dict[str, tuple[tuple[float, int, int, int], ...]] = {
    "jet": (
        (0.0, 0, 0, 128),
        (0.11, 0, 0, 255),
        (0.125, 0, 0, 255),
        (0.375, 0, 255, 255),
        (0.625, 255, 255, 0),
        (0.875, 255, 0, 0),
        (1.0, 128, 0, 0),
    ),
    # sampled from matplotlib's "inferno" (CC0), enough for a smooth LUT
    "inferno": (
        (0.0, 0, 0, 4),
        (0.125, 31, 12, 72),
        (0.25, 85, 15, 109),
        (0.375, 136, 34, 106),
        (0.5, 186, 54, 85),
        (0.625, 227, 89, 51),
        (0.75, 249, 140, 10),
        (0.875, 249, 201, 50),
        (1.0, 252, 255, 164),
    ),
}


@functools.lru_cache(maxsize=None)
def colormap_lut(name: str = "jet") -> np.ndarray:
    """A (256, 3) uint8 lookup table of colour map ``name`` ("jet" or "inferno")."""
    try:
        anchors = np.array(_ANCHORS[name], dtype=np.float64)
    except KeyError:
        raise ValueError(f"colormap must be one of {sorted(_ANCHORS)}, got {name!r}") from None
    x = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(x, anchors[:, 0], anchors[:, c]) for c in (1, 2, 3)], axis=-1)
    lut = np.round(lut).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def window(hu: np.ndarray, center: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> np.ndarray:
    """HU -> uint8 grey, linear between center -/+ width/2 (DICOM "LINEAR" VOI)."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width!r}")
    scale = np.float32(255.0 / width)
    offset = np.float32(center - width / 2.0)
    out = (np.asarray(hu, dtype=np.float32) - offset) * scale
    np.clip(out, 0.0, 255.0, out=out)
    return (out + np.float32(0.5)).astype(np.uint8)


@dataclass(frozen=True)
class HeatStyle:
    """How heat is drawn: invisible below ``threshold``, then alpha rising linearly to
    ``max_alpha`` at heat 1; only inside the lungs."""

    colormap: str = "jet"
    threshold: float = 0.2
    max_alpha: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold!r}")
        if not 0.0 < self.max_alpha <= 1.0:
            raise ValueError(f"max_alpha must be in (0, 1], got {self.max_alpha!r}")
        colormap_lut(self.colormap)  # validates the name


def blend(grey: np.ndarray, heat: np.ndarray, inside: np.ndarray, style: HeatStyle = HeatStyle()) -> np.ndarray:
    """Blend ``heat`` (0..1) in colour over ``grey`` (uint8) where ``inside`` is true.

    Returns a (rows, cols, 3) uint8 RGB image.
    """
    if grey.shape != heat.shape or grey.shape != inside.shape:
        raise ValueError(
            f"grey {grey.shape}, heat {heat.shape} and inside {inside.shape} must have one shape"
        )
    rgb = np.stack([grey, grey, grey], axis=-1)  # 3x faster than repeat/broadcast here
    visible = inside & (heat >= style.threshold)
    rows = np.flatnonzero(visible.any(axis=1))
    if rows.size == 0:
        return rgb
    cols = np.flatnonzero(visible.any(axis=0))
    # work on the bounding box of the visible heat only: dense maths on a small box is
    # faster than fancy indexing and far faster than the whole image
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    h = np.clip(heat[box], 0.0, 1.0).astype(np.float32, copy=False)
    alpha = (h - np.float32(style.threshold)) * np.float32(style.max_alpha / (1.0 - style.threshold))
    alpha[~visible[box]] = 0.0
    colour = colormap_lut(style.colormap)[(h * 255.0 + 0.5).astype(np.uint8)]
    base = rgb[box].astype(np.float32)
    base += (colour - base) * alpha[:, :, None]
    base += 0.5
    rgb[box] = base.astype(np.uint8)
    return rgb


# --- caption --------------------------------------------------------------------------

_WHITE = (255, 255, 255)
_GREY = (200, 200, 200)
_YELLOW = (255, 230, 0)
_CYAN = (120, 230, 255)


def font_size_for(columns: int) -> int:
    """A font size readable on a full-screen view: about 1/32 of the image width."""
    return max(8, round(columns / 32))


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _stroke(size: int) -> int:
    return max(1, size // 8)


@functools.lru_cache(maxsize=4096)
def _line_masks(text: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(outline, fill) alpha masks of one line of text, float32 in 0..1."""
    font = _font(size)
    stroke = _stroke(size)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    width, height = max(1, right - left), max(1, bottom - top)
    outline = Image.new("L", (width, height), 0)
    fill = Image.new("L", (width, height), 0)
    ImageDraw.Draw(outline).text((-left, -top), text, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    ImageDraw.Draw(fill).text((-left, -top), text, font=font, fill=255)
    out = np.asarray(outline, dtype=np.float32) / 255.0
    inner = np.asarray(fill, dtype=np.float32) / 255.0
    out.flags.writeable = False
    inner.flags.writeable = False
    return out, inner


@functools.lru_cache(maxsize=4096)
def _line_size(text: str, columns: int, margin: int) -> int:
    """The largest font size up to ``font_size_for(columns)`` at which ``text`` fits."""
    size = font_size_for(columns)
    while size > 6 and _font(size).getlength(text) + 2 * _stroke(size) > columns - 2 * margin:
        size -= 1
    return size


def _paint(rgb: np.ndarray, y: int, x: int, masks: tuple[np.ndarray, np.ndarray], colour) -> None:
    outline, fill = masks
    rows, cols = rgb.shape[:2]
    h = min(outline.shape[0], rows - y)
    w = min(outline.shape[1], cols - x)
    if h <= 0 or w <= 0 or y < 0 or x < 0:
        return
    region = rgb[y : y + h, x : x + w].astype(np.float32)
    a = outline[:h, :w, None]
    region *= 1.0 - a  # dark outline keeps the text readable on any background
    f = fill[:h, :w, None]
    region += (np.asarray(colour, np.float32) - region) * f
    rgb[y : y + h, x : x + w] = (region + 0.5).astype(np.uint8)


def _colour_of(line: str, top: bool) -> tuple[int, int, int]:
    if line == NOT_FOR_DIAGNOSTIC_USE:
        return _YELLOW
    if line.startswith("Key image"):
        return _CYAN
    return _WHITE if top else _GREY


def burn_caption(rgb: np.ndarray, caption: Caption) -> np.ndarray:
    """Burn ``caption`` into ``rgb`` in place: ``top`` lines from the top-left corner,
    ``bottom`` lines ending at the bottom-left corner. A line too long for the width is
    set in a smaller size. Returns ``rgb``."""
    rows, cols = rgb.shape[:2]
    margin = max(2, cols // 128)
    base = font_size_for(cols)
    line_height = _font(base).getbbox("Ag")[3] + max(2, base // 4)
    y = margin
    for line in caption.top:
        size = _line_size(line, cols, margin)
        _paint(rgb, y, margin, _line_masks(line, size), _colour_of(line, True))
        y += line_height
    y = rows - margin - line_height * len(caption.bottom)
    for line in caption.bottom:
        size = _line_size(line, cols, margin)
        _paint(rgb, y + (base - size), margin, _line_masks(line, size), _colour_of(line, False))
        y += line_height
    return rgb


def render_slice(
    hu: np.ndarray,
    heat: np.ndarray,
    lung: np.ndarray,
    caption: Caption | None,
    style: HeatStyle = HeatStyle(),
) -> np.ndarray:
    """One heat-map image: lung window grey, heat blended inside ``lung``, caption."""
    rgb = blend(window(hu), heat, lung, style)
    if caption is not None:
        burn_caption(rgb, caption)
    return rgb
