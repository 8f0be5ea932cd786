"""The report's figures: every accuracy drawn with its 95% Wilson interval (error bars that
span exactly 100 * wilson(round(accuracy * n), n)), heatmaps titled with their widest interval,
and the PNGs written. Small hand-made frames; no models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.container import ErrorbarContainer
from PIL import Image

from patchbench.reporting import figures
from patchbench.reporting.stats import half_width, wilson

CERTIFIED = figures.CERTIFIED


def long_frame() -> pd.DataFrame:
    """Two configurations, two conditions, square sides 3 and 5 and a 2 x 6 stripe."""
    rows = []
    for config, n, scale in (("bagcert rf5", 16, 1.0), ("smoothing b4", 40, 0.5)):
        for condition, drop in (("tight", 0.0), ("global", 12.5)):
            for (h, w), acc in (((3, 3), 75.0), ((5, 5), 37.5), ((2, 6), 50.0)):
                rows.append({"config": config, "defense": config.split()[0],
                             "condition": condition, "patch_h": h, "patch_w": w,
                             "n_images": n, CERTIFIED: scale * acc - drop})
    return pd.DataFrame(rows)


def attacks_frame() -> pd.DataFrame:
    """Two configurations; some accuracies missing (no bar), one violation."""
    return pd.DataFrame({
        "config": ["bagcert rf5", "bagcert rf5", "smoothing b4"],
        "patch": ["3x3", "5x5", "3x3"], "images": [16, 16, 40],
        "clean (%)": [75.0, 75.0, 50.0], "empirical (%)": [50.0, 25.0, np.nan],
        "tight (%)": [np.nan, 12.5, 20.0], "global (%)": [np.nan, np.nan, 10.0],
        "attacked": pd.array([12, 12, 20], dtype="Int64"),
        "violations": pd.array([0, 1, pd.NA], dtype="Int64")})


def percent(successes: int, n: int) -> tuple[float, float]:
    low, high = wilson(successes, n)
    return 100 * low, 100 * high


def error_segments(ax: Axes) -> list[tuple[float, float, float, tuple]]:
    """(x, low, high, colour) of every vertical error bar on the axes."""
    out = []
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer):
            (bars,) = container.lines[2]
            colours = bars.get_colors()
            for i, segment in enumerate(bars.get_segments()):
                (x0, y0), (x1, y1) = segment
                assert x0 == pytest.approx(x1)
                out.append((float(x0), float(min(y0, y1)), float(max(y0, y1)),
                            tuple(colours[i % len(colours)])))
    return out


def at(segments: list, x: float, y_inside: float) -> list:
    return [s for s in segments if s[0] == pytest.approx(x) and s[1] <= y_inside <= s[2]]


def test_patch_size_curves_draw_the_wilson_interval_of_every_point(tmp_path: Path) -> None:
    long = long_frame()
    fig = figures.patch_size_figure(long)
    (ax,) = fig.axes
    assert "error bars: 95% Wilson" in ax.get_title()
    segments = error_segments(ax)
    # a bar per square point (2 configs x 2 conditions x 2 sides), none for the stripe
    assert len(segments) == 8
    assert not [s for s in segments if s[0] not in (3.0, 5.0)]
    # bagcert rf5, tight, side 5: 37.5% of 16 images = 6 successes
    low, high = percent(6, 16)
    (chosen,) = [s for s in at(segments, 5, 37.5) if s[1] == pytest.approx(low)]
    assert chosen[2] == pytest.approx(high)
    # smoothing b4, global, side 3: 0.5 * 75 - 12.5 = 25% of 40 = 10 successes
    low, high = percent(10, 40)
    (other,) = [s for s in at(segments, 3, 25.0) if s[1] == pytest.approx(low)]
    assert other[2] == pytest.approx(high)
    # the bar takes the colour of its configuration's line
    palette = figures.hue_palette(["bagcert rf5", "smoothing b4"])
    assert chosen[3][:3] == pytest.approx(to_rgba(palette["bagcert rf5"])[:3])
    assert other[3][:3] == pytest.approx(to_rgba(palette["smoothing b4"])[:3])
    line_colours = [to_rgba(line.get_color())[:3] for line in ax.lines
                    if 37.5 in list(line.get_ydata())]
    assert any(c == pytest.approx(to_rgba(palette["bagcert rf5"])[:3]) for c in line_colours)
    path = tmp_path / "curves.png"
    figures.patch_size_curves(long, path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100


def test_patch_size_curves_pool_repeated_rows_and_skip_missing_counts() -> None:
    long = long_frame()
    extra = long.iloc[[1]].assign(n_images=48, **{CERTIFIED: 25.0})  # rf5 tight 5x5 again
    no_count = long[long["config"] == "smoothing b4"].assign(n_images=np.nan)
    fig = figures.patch_size_figure(
        pd.concat([long[long["config"] == "bagcert rf5"], extra, no_count]))
    segments = error_segments(fig.axes[0])
    assert len(segments) == 4  # the configuration without counts gets no bars
    # 6 of 16 and 12 of 48: 18 of 64 images, 28.125%
    low, high = percent(18, 64)
    (pooled,) = [s for s in at(segments, 5, 28.125) if s[1] == pytest.approx(low)]
    assert pooled[2] == pytest.approx(high)
    assert any(28.125 in list(line.get_ydata()) for line in fig.axes[0].lines)


def test_certified_vs_attacked_bars_carry_wilson_error_bars(tmp_path: Path) -> None:
    attacks = attacks_frame()
    fig = figures.attacks_figure(attacks)
    assert "error bars: 95% Wilson" in fig.get_suptitle()
    first, second = (ax for ax in fig.axes if ax.get_visible())
    assert first.title.get_color() == "red" and "1 VIOLATION" in first.get_title()
    for ax, n, values in ((first, 16, [75.0, 75.0, 50.0, 25.0, 12.5]),
                          (second, 40, [50.0, 20.0, 10.0])):
        bars = [p for p in ax.patches if p.get_height() > 0]
        assert sorted(b.get_height() for b in bars) == sorted(values)  # NaN: no bar
        segments = error_segments(ax)
        assert len(segments) == len(bars)
        for bar in bars:
            centre = bar.get_x() + bar.get_width() / 2
            accuracy = bar.get_height()
            (segment,) = at(segments, centre, accuracy)
            assert segment[1:3] == pytest.approx(percent(round(accuracy / 100 * n), n))
    # the chosen bar: bagcert rf5, 5x5, certified (tight), 12.5% of 16 = 2 successes
    (tight,) = [p for p in first.patches if p.get_height() == 12.5]
    centre = tight.get_x() + tight.get_width() / 2
    assert round(centre) == 1  # over the second patch
    (segment,) = at(error_segments(first), centre, 12.5)
    assert segment[1:3] == pytest.approx(percent(2, 16))
    path = tmp_path / "attacked.png"
    figures.certified_vs_attacked(attacks, path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100


def test_certified_vs_attacked_without_counts_draws_bars_only() -> None:
    fig = figures.attacks_figure(attacks_frame().drop(columns="images"))
    assert all(not error_segments(ax) for ax in fig.axes)
    assert any(ax.patches for ax in fig.axes)


@pytest.mark.slow  # draws every heatmap
def test_shape_heatmaps_name_their_widest_interval(tmp_path: Path) -> None:
    long = long_frame()
    extra = long.assign(config=long["config"] + " copy")
    four = pd.concat([long, extra])
    primary = {"bagcert": "tight", "smoothing": "tight"}
    fig = figures.shape_figure(four, primary)
    shown = four[four["condition"] == "tight"]
    widest = max(100 * half_width(a / 100, n)
                 for a, n in zip(shown[CERTIFIED], shown["n_images"], strict=True))
    assert not math.isnan(widest)
    assert f"within ±{widest:.1f} points" in fig.get_suptitle()
    assert sum(ax.get_visible() for ax in fig.axes) == 4  # 2 x 3 grid, two hidden
    path = tmp_path / "shapes.png"
    figures.shape_heatmaps(four, path, primary)
    with Image.open(path) as image:
        assert image.format == "PNG"
