"""The report's figures, drawn on Agg canvases: no display and no global pyplot state, so
building a report never opens a window or changes the backend of whoever imported us."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from patchbench.atomic import atomic_path
from patchbench.certify import CONDITIONS
from patchbench.gallery import Example

CERTIFIED = "certified (%)"  # the long frame's value column


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def patch_size_curves(long: pd.DataFrame, path: Path) -> None:
    """Certified accuracy vs square patch side: a line per configuration, a dash per condition."""
    squares = long[long["patch_h"] == long["patch_w"]]
    fig = new_figure(7.5, 4.5)
    with sns.axes_style("whitegrid"):
        ax = fig.subplots()
        sns.lineplot(data=squares, x="patch_h", y=CERTIFIED, hue="config", style="condition",
                     style_order=[c for c in CONDITIONS if c in set(squares["condition"])],
                     markers=True, ax=ax)
    ax.set(xlabel="square patch side (pixels)", ylabel="certified accuracy (%)",
           ylim=(0, 100), title="Certified accuracy vs patch size")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    save(fig, path)


def shape_heatmaps(long: pd.DataFrame, path: Path, condition: str) -> None:
    """One height x width heatmap of certified accuracy per configuration."""
    rows = long[long["condition"] == condition]
    configs = list(dict.fromkeys(rows["config"]))
    n_cols = min(3, len(configs))
    n_rows = math.ceil(len(configs) / n_cols)
    fig = new_figure(4.2 * n_cols, 3.6 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).flat
    for ax, config in zip(axes, configs, strict=False):
        grid = rows[rows["config"] == config].pivot_table(index="patch_h", columns="patch_w",
                                                          values=CERTIFIED)
        sns.heatmap(grid, ax=ax, vmin=0, vmax=100, cmap="viridis", annot=True, fmt=".0f",
                    cbar=False, annot_kws={"fontsize": 8})
        ax.invert_yaxis()
        ax.set(xlabel="patch width", ylabel="patch height", title=config)
    for ax in list(axes)[len(configs):]:
        ax.set_visible(False)
    fig.suptitle(f"Certified accuracy (%) by patch shape ({condition})", fontsize=10)
    save(fig, path)


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


def certified_vs_attacked(attacks: pd.DataFrame, path: Path) -> None:
    """Per configuration, per patch shape: clean, attacked and certified accuracy as bars, on
    the attacked images; a configuration with soundness violations is titled in red."""
    long = attacks.melt(id_vars=["config", "patch", "violations"],
                        value_vars=[c for c in ATTACK_MEASURES if c in attacks],
                        var_name="measure", value_name="accuracy (%)")
    long["measure"] = long["measure"].map(ATTACK_MEASURES)
    configs = list(dict.fromkeys(attacks["config"]))
    n_cols = min(3, len(configs))
    n_rows = math.ceil(len(configs) / n_cols)
    fig = new_figure(4.6 * n_cols, 4.0 * n_rows)
    with sns.axes_style("whitegrid"):
        axes = list(fig.subplots(n_rows, n_cols, squeeze=False).flat)
    for ax, config in zip(axes, configs, strict=False):
        mine = long[long["config"] == config].dropna(subset=["accuracy (%)"])
        if not mine.empty:
            sns.barplot(data=mine, x="patch", y="accuracy (%)", hue="measure",
                        hue_order=[m for m in ATTACK_MEASURES.values()
                                   if m in set(mine["measure"])],
                        palette=ATTACK_COLORS, ax=ax)
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
    fig.suptitle("Certified vs attacked accuracy, on the attacked images", fontsize=10)
    save(fig, path)


def gallery_figure(examples: list[Example], classes: list[str], title: str, path: Path) -> None:
    """Per image: the image with the worst patch, then the votes of the prediction and of the
    rival class with that patch's footprint outlined."""
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
