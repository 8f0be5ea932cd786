"""The report's figures, drawn on Agg canvases: no display and no global pyplot state, so
building a report never opens a window or changes the backend of whoever imported us."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from patchbench.reporting.gallery import Example, Explanation
from patchbench.reporting.stats import INTERVAL, half_width, wilson
from patchbench.reporting.tables import condition_columns, ordered
from patchbench.running.atomic import atomic_path

CERTIFIED = "certified (%)"  # the long frame's value column
ERROR_BARS = f"error bars: {INTERVAL}"  # the caption of a figure with error bars


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def interval_points(accuracy: float, n: float) -> tuple[float, float]:
    """The 95% Wilson interval, in percent, of an accuracy (percent) over ``n`` images,
    counting round(accuracy / 100 * n) successes; (nan, nan) without a count or a value."""
    if pd.isna(accuracy) or pd.isna(n) or int(n) <= 0:
        return math.nan, math.nan
    n = int(n)
    low, high = wilson(min(n, max(0, round(accuracy / 100 * n))), n)
    return 100 * low, 100 * high


def hue_palette(levels: list[str]) -> dict[str, tuple[float, float, float]]:
    """The colours seaborn would give these hue levels by default: the colour cycle, or husl
    where there are more levels than it has colours."""
    cycle = sns.color_palette()
    colors = (sns.color_palette(n_colors=len(levels)) if len(levels) <= len(cycle)
              else sns.color_palette("husl", len(levels)))
    return dict(zip(levels, colors, strict=True))


def patch_size_curves(long: pd.DataFrame, path: Path) -> None:
    """Certified accuracy vs square patch side: a line per configuration, a dash per condition,
    each point with its 95% Wilson interval."""
    save(patch_size_figure(long), path)


def pooled(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per ``keys``: the certified accuracy of its rows weighted by their images and
    the images summed (the plain mean and no count where a row lacks its count)."""
    def pool(group: pd.DataFrame) -> pd.Series:
        n = group["n_images"]
        if len(group) == 1 or n.isna().any() or n.sum() <= 0:
            return pd.Series({CERTIFIED: group[CERTIFIED].mean(),
                              "n_images": n.iloc[0] if len(group) == 1 else math.nan})
        return pd.Series({CERTIFIED: (group[CERTIFIED] * n).sum() / n.sum(),
                          "n_images": n.sum()})
    out = [{**dict(zip(keys, key, strict=True)), **pool(group)}
           for key, group in rows.groupby(keys, sort=False)]
    return pd.DataFrame(out, columns=[*keys, CERTIFIED, "n_images"])


def patch_size_figure(long: pd.DataFrame) -> Figure:
    """What ``patch_size_curves`` draws. Rows of the same configuration, condition and side are
    pooled (``pooled``)."""
    squares = long[long["patch_h"] == long["patch_w"]].dropna(subset=[CERTIFIED])
    points = pooled(squares, ["config", "condition", "patch_h"])
    configs = list(dict.fromkeys(points["config"]))
    palette = hue_palette(configs)
    fig = new_figure(7.5, 4.5)
    with sns.axes_style("whitegrid"):
        ax = fig.subplots()
        sns.lineplot(data=points, x="patch_h", y=CERTIFIED, hue="config", hue_order=configs,
                     palette=palette, style="condition",
                     style_order=ordered(set(points["condition"])), markers=True,
                     errorbar=None, ax=ax)
    for (config, _), line in points.groupby(["config", "condition"], sort=False):
        line = line.sort_values("patch_h")
        bounds = [interval_points(a, n) for a, n in zip(line[CERTIFIED], line["n_images"],
                                                         strict=True)]
        low, high = (np.array(b, dtype=float) for b in zip(*bounds, strict=True))
        y = line[CERTIFIED].to_numpy(dtype=float)
        shown = ~np.isnan(low)
        if shown.any():
            ax.errorbar(line["patch_h"].to_numpy(dtype=float)[shown], y[shown],
                        yerr=[y[shown] - low[shown], high[shown] - y[shown]], fmt="none",
                        ecolor=palette[config], elinewidth=1, capsize=3, alpha=0.7, zorder=1)
    ax.set(xlabel="square patch side (pixels)", ylabel="certified accuracy (%)",
           ylim=(0, 100), title=f"Certified accuracy vs patch size\n({ERROR_BARS})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    return fig


def shape_heatmaps(long: pd.DataFrame, path: Path, primary: dict[str, str]) -> None:
    """One height x width heatmap of certified accuracy per configuration, under its defense's
    primary condition (``primary``: defense -> condition); the suptitle gives the widest 95%
    interval of its cells."""
    save(shape_figure(long, primary), path)


def shape_figure(long: pd.DataFrame, primary: dict[str, str]) -> Figure:
    """What ``shape_heatmaps`` draws."""
    rows = long[long["condition"] == long["defense"].map(primary)]
    configs = list(dict.fromkeys(rows["config"]))
    shown = list(dict.fromkeys(rows["condition"]))
    n_cols = min(3, len(configs))
    n_rows = math.ceil(len(configs) / n_cols)
    fig = new_figure(4.2 * n_cols, 3.6 * n_rows)
    axes = list(fig.subplots(n_rows, n_cols, squeeze=False).flat)
    for ax, config in zip(axes, configs, strict=False):
        grid = rows[rows["config"] == config].pivot_table(index="patch_h", columns="patch_w",
                                                          values=CERTIFIED)
        annotated_heatmap(ax, grid)
        cond = rows.loc[rows["config"] == config, "condition"].iloc[0]
        ax.set(xlabel="patch width", ylabel="patch height")
        ax.set_title(textwrap.fill(config if len(shown) == 1 else f"{config} ({cond})", 48),
                     fontsize=8)
    for ax in axes[len(configs):]:
        ax.set_visible(False)
    widest = widest_interval(rows)
    fig.suptitle(f"Certified accuracy (%) by patch shape ({', '.join(shown)})"
                 + (f"; 95% intervals within ±{widest:.1f} points"
                    if not math.isnan(widest) else ""), fontsize=10)
    return fig


def annotated_heatmap(ax, grid: pd.DataFrame) -> None:
    """``grid`` (rows: patch heights, columns: widths, values in %) as cells with their value,
    small heights at the bottom. Drawn with matplotlib alone: seaborn's annotated heatmap
    redraws the whole figure once per panel to pick text colours, which made a report with 20
    configurations spend a minute here."""
    values = grid.to_numpy(dtype=float)
    ax.pcolormesh(values, cmap="viridis", vmin=0, vmax=100)
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(j + 0.5, i + 0.5, f"{value:.0f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 60 else "white")
    ax.set_xticks(np.arange(values.shape[1]) + 0.5, [str(c) for c in grid.columns])
    ax.set_yticks(np.arange(values.shape[0]) + 0.5, [str(r) for r in grid.index])
    ax.set_xlim(0, values.shape[1])
    ax.set_ylim(0, values.shape[0])


def widest_interval(rows: pd.DataFrame) -> float:
    """The largest 95% Wilson half-width, in points, of the rows' certified accuracies over
    their ``n_images``; nan where none has both."""
    if "n_images" not in rows:
        return math.nan
    widths = [100 * half_width(a / 100, int(n))
              for a, n in zip(rows[CERTIFIED], rows["n_images"], strict=True)
              if not (pd.isna(a) or pd.isna(n))]
    widths = [w for w in widths if not math.isnan(w)]
    return max(widths) if widths else math.nan


def time_vs_parameters(configs: pd.DataFrame, path: Path, x: str, y: str) -> None:
    """Certification time against model size, one point per configuration."""
    fig = new_figure(6.5, 4.5)
    with sns.axes_style("whitegrid"):
        ax = fig.subplots()
        sns.scatterplot(data=configs, x=x, y=y, hue="defense", s=70, ax=ax)
    for label, xv, yv in zip(configs["config"], configs[x], configs[y], strict=True):
        ax.annotate(label, (xv, yv), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel=x, ylabel=f"certification time ({y})",
           title="Certification time vs parameters")
    ax.legend(fontsize=7)
    save(fig, path)


ATTACK_MEASURES = {"clean (%)": "clean", "empirical (%)": "under attack",
                   "tight (%)": "certified (tight)", "global (%)": "certified (global)"}
ATTACK_COLORS = dict(zip(ATTACK_MEASURES.values(), ("#9e9e9e", "#e6842a", "#1f5fa8", "#7fb0e0"),
                         strict=True))
OTHER_COLORS = ("#2a9d4b", "#8fd19e", "#7b3fa0", "#c9a0dc")  # conditions known from results


def certified_vs_attacked(attacks: pd.DataFrame, path: Path) -> None:
    """Per configuration, per patch shape: clean, attacked and certified accuracy as bars, on
    the attacked images, each with its 95% Wilson interval; a configuration with soundness
    violations is titled in red."""
    save(attacks_figure(attacks), path)


def attacks_figure(attacks: pd.DataFrame) -> Figure:
    """What ``certified_vs_attacked`` draws."""
    measures = {**ATTACK_MEASURES, **{
        c: f"certified ({c.removesuffix(' (%)')})"
        for c in condition_columns(attacks, ("clean (%)", "empirical (%)"))
        if c not in ATTACK_MEASURES}}
    colors = {**ATTACK_COLORS, **dict(zip([m for m in measures.values()
                                           if m not in ATTACK_COLORS],
                                          OTHER_COLORS * 4, strict=False))}
    frame = attacks if "images" in attacks else attacks.assign(images=math.nan)
    long = frame.melt(id_vars=["config", "patch", "violations", "images"],
                      value_vars=[c for c in measures if c in attacks],
                      var_name="measure", value_name="accuracy (%)")
    long["measure"] = long["measure"].map(measures)
    configs = list(dict.fromkeys(attacks["config"]))
    n_cols = min(3, len(configs))
    n_rows = math.ceil(len(configs) / n_cols)
    fig = new_figure(4.6 * n_cols, 4.0 * n_rows)
    with sns.axes_style("whitegrid"):
        axes = list(fig.subplots(n_rows, n_cols, squeeze=False).flat)
    for ax, config in zip(axes, configs, strict=False):
        mine = long[long["config"] == config].dropna(subset=["accuracy (%)"])
        if not mine.empty:
            order = list(dict.fromkeys(mine["patch"]))
            hue_order = [m for m in measures.values() if m in set(mine["measure"])]
            sns.barplot(data=mine, x="patch", y="accuracy (%)", hue="measure", order=order,
                        hue_order=hue_order, palette=colors, errorbar=None, ax=ax)
            bar_intervals(ax, mine, order, hue_order)
        broken = int(attacks.loc[attacks["config"] == config, "violations"].fillna(0).sum())
        ax.set(ylim=(0, 100), xlabel="patch", ylabel="accuracy (%)",
               title=config + (f": {broken} VIOLATION(S)" if broken else ""))
        if broken:
            ax.title.set_color("red")
        if ax.get_legend() is not None:
            ax.legend(fontsize=7, ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                      frameon=False)
    for ax in axes[len(configs):]:
        ax.set_visible(False)
    fig.suptitle(f"Certified vs attacked accuracy, on the attacked images\n({ERROR_BARS})",
                 fontsize=10)
    return fig


def bar_intervals(ax: Axes, bars: pd.DataFrame, order: list[str], hue_order: list[str]) -> None:
    """Error bars on the bars that seaborn drew of ``bars`` (a row per patch and measure with
    its ``accuracy (%)`` over ``images``): its containers follow ``hue_order``, and a bar
    stands over the position of its patch in ``order`` (dodged by less than half a step)."""
    rows = {(p, m): (a, n) for p, m, a, n in zip(bars["patch"], bars["measure"],
                                                 bars["accuracy (%)"], bars["images"],
                                                 strict=True)}
    xs, ys, low, high = [], [], [], []
    drawn = [c for c in ax.containers if isinstance(c, BarContainer)]
    for measure, container in zip(hue_order, drawn, strict=False):
        for bar in container:
            centre = bar.get_x() + bar.get_width() / 2
            key = (order[int(round(centre))], measure)
            if key not in rows:
                continue
            accuracy, n = rows[key]
            lo, hi = interval_points(accuracy, n)
            if math.isnan(lo):
                continue
            xs.append(centre)
            ys.append(accuracy)
            low.append(accuracy - lo)
            high.append(hi - accuracy)
    if xs:
        ax.errorbar(xs, ys, yerr=[low, high], fmt="none", ecolor="#333333", elinewidth=0.8,
                    capsize=2, zorder=3)


def gallery_figure(examples: list[Example] | list[Explanation], classes: list[str], title: str,
                   path: Path) -> None:
    """Per image: the image with the worst patch, then the votes of the prediction and of the
    rival class with that patch's footprint outlined (vote maps); or what ``masking_figure``
    draws for the ``Explanation``s of another family."""
    if examples and isinstance(examples[0], Explanation):
        masking_figure(examples, classes, title, path)
        return
    fig = new_figure(9.5, 3.1 * len(examples))
    axes = fig.subplots(len(examples), 3, squeeze=False)
    for ex, (ax_image, ax_own, ax_rival) in zip(examples, axes, strict=True):
        image = ex.image[0] if ex.image.shape[0] == 1 else np.transpose(ex.image, (1, 2, 0))
        ax_image.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if ex.position is not None:
            r, q = ex.position
            ax_image.add_patch(Rectangle((q - 0.5, r - 0.5), ex.patch.width, ex.patch.height,
                                         fill=False, edgecolor="red", linewidth=2))
        verdict = "certified" if ex.margin >= 0 else "broken"
        ax_image.set_title(f"#{ex.index}: {classes[ex.label]} -> {classes[ex.prediction]}\n"
                           f"{ex.patch} margin {ex.margin} ({verdict})", fontsize=8)
        for ax, cls, role in ((ax_own, ex.prediction, "prediction"),
                              (ax_rival, ex.rival, "rival")):
            ax.imshow(ex.votes[cls], cmap="Greys", vmin=0, vmax=1, aspect="auto",
                      interpolation="nearest")
            outline(ax, ex.footprint, ex.votes.shape[1:])
            ax.set_title(f"votes for {classes[cls]} ({role}): {int(ex.votes[cls].sum())}",
                         fontsize=8)
        for ax in (ax_image, ax_own, ax_rival):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    save(fig, path)


def masking_figure(examples: list[Explanation], classes: list[str], title: str,
                   path: Path) -> None:
    """Per image: the image; the image under the two masks of the first two-mask prediction
    that differs from the defended one (outlined; none where certified); the one-mask labels
    laid out as the mask grid (red: differs from the prediction)."""
    fig = new_figure(9.5, 3.1 * len(examples))
    axes = fig.subplots(len(examples), 3, squeeze=False)
    for ex, (ax_image, ax_masked, ax_grid) in zip(examples, axes, strict=True):
        verdict = "certified" if ex.certified else "not certified"
        ax_image.imshow(as_picture(ex.image), cmap="gray", vmin=0, vmax=1,
                        interpolation="nearest")
        ax_image.set_title(f"#{ex.index}: {classes[ex.label]} -> {classes[ex.prediction]}\n"
                           f"{ex.patch} {verdict}", fontsize=8)
        masked = ex.image.copy()
        for mask in ex.masks:
            masked[:, mask] = ex.mask_value
        ax_masked.imshow(as_picture(masked), cmap="gray", vmin=0, vmax=1,
                         interpolation="nearest")
        for mask, color in zip(ex.masks, ("red", "orange"), strict=False):
            rows, cols = np.nonzero(mask)
            ax_masked.add_patch(Rectangle((cols.min() - 0.5, rows.min() - 0.5),
                                          cols.max() - cols.min() + 1,
                                          rows.max() - rows.min() + 1, fill=False,
                                          edgecolor=color, linewidth=2))
        if ex.pair is None:
            ax_masked.set_title(f"all {ex.pairs} two-mask predictions:\n"
                                f"{classes[ex.prediction]}", fontsize=8)
        else:
            label = classes[ex.mask_prediction] if ex.mask_prediction is not None else "?"
            ax_masked.set_title(f"masks {ex.pair[0]} + {ex.pair[1]}: {label}\n"
                                f"(first of {ex.pairs} pairs to differ)", fontsize=8)
        grid = np.asarray(ex.one_mask)
        differ = grid != ex.prediction
        ax_grid.imshow(differ, cmap="Reds", vmin=0, vmax=1.5, interpolation="nearest")
        for (r, c), value in np.ndenumerate(grid):
            ax_grid.text(c, r, str(int(value)), ha="center", va="center", fontsize=7)
        ax_grid.set_title(f"one-mask labels: {int(differ.sum())} of {grid.size} differ\n"
                          f"from {int(ex.prediction)} ({classes[ex.prediction]})", fontsize=8)
        for ax in (ax_image, ax_masked, ax_grid):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    save(fig, path)


def as_picture(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> what imshow draws: (H, W) grey or (H, W, C) colour."""
    return image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))


def outline(ax: Axes, footprint: tuple[tuple[int, int], tuple[int, int]],
            map_hw: tuple[int, int]) -> None:
    """Outline a footprint of cells, split where it wraps around a cyclic map."""
    (r0, rn), (c0, cn) = footprint
    for rs, rl in wrap(r0, rn, map_hw[0]):
        for cs, cl in wrap(c0, cn, map_hw[1]):
            ax.add_patch(Rectangle((cs - 0.5, rs - 0.5), cl, rl, fill=False,
                                   edgecolor="red", linewidth=2))


def wrap(start: int, length: int, n: int) -> list[tuple[int, int]]:
    """An interval of a cyclic axis as at most two plain (start, length) pieces."""
    end = start + length
    return [(start, min(end, n) - start)] + ([(0, end - n)] if end > n else [])
