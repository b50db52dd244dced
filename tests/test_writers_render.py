"""Writers' pure helpers: rendering (window, colour map, blend, caption) and outlines."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ct_ai_node.writers.common import Caption, method_label, series_description
from ct_ai_node.writers.contour import largest_component, outline, polygon_area
from ct_ai_node.writers.heatmap import HeatStyle, blend, burn_caption, colormap_lut, window
from ct_ai_node.writers.secondary_capture import patient_orientation

from helpers_writers import make_ct_series, make_result, make_volume


def test_lung_window():
    hu = np.array([-2000, -1350, -600, 150, 3000], np.float32)
    assert window(hu).tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="width"):
        window(hu, -600, 0)


@pytest.mark.parametrize("name", ["jet", "inferno"])
def test_colormap_lut(name):
    lut = colormap_lut(name)
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert lut[-1, 0] > lut[0, 0]  # the hot end is red (jet) or near white (inferno)
    with pytest.raises(ValueError, match="colormap"):
        colormap_lut("rainbow")


def test_blend_threshold_and_mask():
    grey = np.full((8, 8), 100, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[2:6, 2:6] = 1.0
    heat[0, 0] = 0.1  # below threshold
    inside = np.ones((8, 8), bool)
    inside[5, 5] = False
    rgb = blend(grey, heat, inside, HeatStyle(threshold=0.2, max_alpha=0.6))
    assert rgb.shape == (8, 8, 3)
    assert (rgb[0, 0] == 100).all()  # too little heat: untouched
    assert (rgb[5, 5] == 100).all()  # outside the lungs: untouched
    assert not (rgb[3, 3] == 100).all()  # hot and inside: coloured
    with pytest.raises(ValueError):
        HeatStyle(threshold=1.5)


@pytest.mark.parametrize("size", [64, 512])
def test_caption_is_burned_in_and_fits(size):
    rgb = np.zeros((size, size, 3), np.uint8)
    caption = Caption(("AI: COVID-19-like pneumonia  p=0.87  slice score 0.91", "second"), ("NOT FOR DIAGNOSTIC USE",))
    burn_caption(rgb, caption)
    assert rgb[: size // 8].any() and rgb[-size // 8 :].any()
    assert not rgb[size // 2 - 2 : size // 2 + 2].any()  # middle untouched


def test_outline_area_equals_pixel_area():
    rng = np.random.default_rng(1)
    for i in range(60):
        raw = rng.random((30, 30)) > 0.5
        mask = ndimage.binary_opening(raw) if i % 2 else raw
        region = largest_component(mask)
        if not region.any():
            continue
        pts = outline(region)
        assert np.array_equal(pts[0], pts[-1])
        assert polygon_area(pts) == region.sum()
        assert pts.min() >= 0 and pts[:, 0].max() <= 30 and pts[:, 1].max() <= 30


def test_outline_of_diagonal_pixels_and_square():
    mask = np.zeros((5, 5), bool)
    mask[1, 1] = mask[2, 2] = True
    pts = outline(largest_component(mask))
    assert polygon_area(pts) == 2
    square = np.zeros((6, 6), bool)
    square[1:4, 2:5] = True
    assert outline(square).tolist() == [[2, 1], [5, 1], [5, 4], [2, 4], [2, 1]]
    with pytest.raises(ValueError):
        outline(np.zeros((3, 3), bool))


def test_labels_and_orientation():
    assert method_label("method_a") == "method A"
    assert method_label("b") == "method B"
    volume = make_volume(make_ct_series(4, 16, 16))
    result = make_result(volume)
    result.pipeline = "x" * 80
    text = series_description("AI heat map", result)
    assert len(text) <= 64 and text.endswith("NOT FOR DIAGNOSTIC USE")
    assert patient_orientation((1, 0, 0, 0, 1, 0)) == ("L", "P")
    assert patient_orientation((0, 1, 0, 0, 0, -1)) == ("P", "F")
