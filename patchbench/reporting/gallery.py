"""The report's gallery: test images, their vote maps, and the patch closest to breaking them.

For one image and one patch shape the tight margin of every footprint ``R`` is
``min_{c != y} (n_y - a_y(R)) - (n_c - a_c(R)) - |R| - [c < y]`` (certify.py); the footprint
with the smallest margin is where a patch does the most harm. It is computed exactly from the
defense's own votes and footprints, so the gallery needs the checkpoint and the images; the
patch position drawn on the image is one whose footprint is that ``R``.

The defense is the one the row was certified with, not the checkpoint's: the checkpoint's
class with the row's ``params`` (certification-only parameters such as a smoothing threshold
may differ from those the weights were trained with, ``Defense.certify_params``), and its
votes are computed as certification computed them, by ``evaluate.for_inference`` at the row's
``precision``; so a run reproduced on the same device gives back its stored votes and margins.

A defense of another family draws its gallery through its ``explain(model, image, patch)``
hook, which returns an ``Explanation`` (masking: the one-mask labels and the first two-mask
prediction that differs from the defended one); one without that hook gets a line "gallery
not supported by <defense>: it lacks explain" (``GalleryUnsupported``), never a silent drop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from patchbench.defense import Defense, VoteMapDefense, get_defense
from patchbench.footprints import Footprints, Interval
from patchbench.patches import PatchShape, parse_patch
from patchbench.reporting.tables import ordered, parse_params
from patchbench.running.cache import SHIPPED, cache_dir
from patchbench.running.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from patchbench.running.data import (
    DatasetFormatError,
    DatasetNotFoundError,
    ImageData,
    load_dataset,
)
from patchbench.running.evaluate import for_inference, precision_dtype
from patchbench.running.per_image import certified as certified_flags
from patchbench.running.per_image import conditions as conditions_in
from patchbench.running.per_image import correct as correct_flags
from patchbench.running.per_image import prediction as prediction_of


class GalleryUnavailable(Exception):
    """The gallery of one configuration cannot be drawn; the message says why (one line)."""


class GalleryUnsupported(GalleryUnavailable):
    """The defense has no gallery ("gallery not supported by <defense>: it lacks ...")."""


@dataclass
class Example:
    """One gallery image with the footprint of smallest tight margin for ``patch``."""

    index: int
    image: np.ndarray  # (C, H, W) in [0, 1]
    votes: np.ndarray  # (classes, h, w) bool
    label: int
    prediction: int
    rival: int  # the class that comes closest to winning inside the footprint
    patch: PatchShape
    margin: int  # exact tight margin of the worst footprint; certified iff >= 0
    stored_margin: int | None  # the margin in the per-image table (a lower bound if >= 0)
    footprint: tuple[Interval, Interval]  # (rows, cols) of cells
    position: tuple[int, int] | None  # top-left pixel of a patch with that footprint
    votes_match: bool  # recomputed vote counts equal the stored ones


@dataclass
class Explanation:
    """Why one image is (not) certified, as a defense of the masking family tells it
    (``explain(model, image, patch)``); the gallery fills in the fields after ``mask_value``
    from the per-image table."""

    image: np.ndarray  # (C, H, W) in [0, 1]
    patch: PatchShape
    prediction: int  # the defended prediction, recomputed
    certified: bool  # recomputed
    one_mask: np.ndarray  # label under each one mask, laid out as the (rows, cols) mask grid
    pair: tuple[int, int] | None  # (i, j), i <= j: the first two-mask prediction, in mask
    #                               order, that differs from ``prediction``; None: certified
    masks: tuple[np.ndarray, ...]  # the (H, W) bool masks of ``pair``; () where certified
    mask_prediction: int | None  # the label under those two masks
    pairs: int  # two-mask predictions checked (i <= j)
    mask_value: float  # what masked pixels are set to
    index: int = -1
    label: int = -1
    stored_prediction: int | None = None
    stored_certified: bool | None = None

    @property
    def matches(self) -> bool:
        """The recomputed prediction and certificate equal the stored ones."""
        return (self.stored_prediction in (None, self.prediction)
                and self.stored_certified in (None, self.certified))


def find_checkpoint_by_hash(sha256: str, dataset: str, defense: str) -> Path | None:
    """The checkpoint with this content hash in ``checkpoints/`` or the cache, if any.

    Files named like the configuration (``<dataset>-<defense>-*.pt``) are opened first.
    """
    files = [p for folder in (SHIPPED, cache_dir() / "checkpoints")
             for p in sorted(folder.glob("*.pt"))]
    prefix = f"{dataset}-{defense}-"
    for path in sorted(files, key=lambda p: not p.name.startswith(prefix)):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable file is simply not the one we look for
            continue
        if isinstance(payload, dict) and payload.get("sha256") == sha256:
            return path
    return None


def worst_footprint(votes: np.ndarray, fp: Footprints) -> tuple[int, int, int, int, int]:
    """(margin, prediction, rival, row interval index, col interval index) for one image."""
    counts = votes.sum(axis=(1, 2)).astype(np.int64)
    y = int(counts.argmax())  # ties to the smallest index, as in the core
    n_classes = len(counts)
    lead = counts[y] - counts - (np.arange(n_classes) < y)
    h, w = fp.map_hw
    inside = np.empty((n_classes, len(fp.rows), len(fp.cols)), dtype=np.int64)
    for i, (r0, rn) in enumerate(fp.rows):
        band = votes[:, (r0 + np.arange(rn)) % h].sum(axis=1)  # (classes, w)
        for j, (c0, cn) in enumerate(fp.cols):
            inside[:, i, j] = band[:, (c0 + np.arange(cn)) % w].sum(axis=1)
    sizes = np.outer([n for _, n in fp.rows], [n for _, n in fp.cols])
    margin = lead[:, None, None] + inside - inside[y] - sizes[None]
    margin[y] = np.iinfo(np.int64).max
    c, i, j = np.unravel_index(margin.argmin(), margin.shape)
    return int(margin[c, i, j]), y, int(c), int(i), int(j)


def axis_intervals(defense: Defense, patch: PatchShape, image_hw: tuple[int, int],
                   axis: int) -> list[Interval] | None:
    """Cell interval of every patch position along one axis (list index = first pixel).

    Derived from the defense's footprints alone: on a cyclic map ablation ``j`` keeps pixels
    ``j .. j+band-1``; on a clipped map each cell sees a pixel interval whose ends grow with
    the cell index, so the first cell a patch meets depends on its first pixel only (read off
    the last position of a patch reaching the far border) and the last cell on its last pixel
    (the first position of a patch starting at 0). None when the result does not reproduce
    the defense's footprints (a map of some other kind).
    """
    n_pixels, side = image_hw[axis], patch[axis]

    def intervals(length: int) -> tuple[tuple[Interval, ...], Footprints]:
        shape = PatchShape(*(length if a == axis else patch[a] for a in (0, 1)))
        fp = defense.footprints(shape, image_hw)
        return (fp.rows if axis == 0 else fp.cols), fp

    own, fp = intervals(side)
    n_cells, positions = fp.map_hw[axis], range(n_pixels - side + 1)
    if fp.cyclic:
        length = own[0][1]
        band = length - side + 1
        found = [(0, n_cells) if length >= n_cells else ((q - band + 1) % n_cells, length)
                 for q in positions]
    else:
        def ends(iv: Interval) -> tuple[int, int]:
            return iv[0], iv[0] + iv[1]

        first = [max(intervals(n_pixels - a)[0], key=ends)[0] for a in range(n_pixels)]
        last = [sum(min(intervals(b + 1)[0], key=ends)) - 1 for b in range(n_pixels)]
        found = [(first[q], last[q + side - 1] - first[q] + 1) for q in positions]
    return found if set(found) == set(own) else None


def patch_position(defense: Defense, patch: PatchShape, image_hw: tuple[int, int],
                   footprint: tuple[Interval, Interval]) -> tuple[int, int] | None:
    """Top-left pixel of a patch whose footprint is ``footprint`` (None if unknown)."""
    found = []
    for axis in (0, 1):
        per_position = axis_intervals(defense, patch, image_hw, axis)
        if per_position is None or footprint[axis] not in per_position:
            return None
        found.append(per_position.index(footprint[axis]))
    return found[0], found[1]


def gallery_patch(patches: list[str]) -> PatchShape:
    """5x5 when certified, else the largest square shape, else the largest shape."""
    shapes = [parse_patch(p) for p in patches]
    if PatchShape(5, 5) in shapes:
        return PatchShape(5, 5)
    squares = [s for s in shapes if s.height == s.width]
    return max(squares or shapes, key=lambda s: s.area)


def pick_images(per_image: pd.DataFrame, patch: PatchShape, n: int) -> list[int]:
    """Row positions of ``n`` images nearest the certification boundary, correct ones first;
    without margins (masking), correct ones first, uncertified and certified in turn."""
    column = next((c for c in (f"margin_tight_{patch}", f"margin_global_{patch}")
                   if c in per_image), None)
    wrong = ~correct_flags(per_image, patch)
    if column:
        closeness = per_image[column].abs()
    else:
        held = ordered(conditions_in(per_image, patch))
        flags = (certified_flags(per_image, held[0], patch) if held
                 else pd.Series(False, index=per_image.index))
        turn = flags.groupby([wrong, flags]).cumcount()
        closeness = 2 * turn + flags.astype(int)  # uncertified, certified, uncertified, ...
    order = pd.DataFrame({"wrong": wrong, "closeness": closeness,
                          "pos": np.arange(len(per_image))})
    return order.sort_values(["wrong", "closeness", "pos"])["pos"].head(n).tolist()


def gallery_support(cell: pd.Series) -> str | None:
    """"gallery not supported by <defense>: it lacks explain" where the configuration's
    defense has no gallery; None where it has one, or where its class cannot be built (the
    checkpoint then says what is wrong)."""
    defense = row_defense(cell)
    return None if defense is None else unsupported(defense)


def row_defense(cell: pd.Series) -> Defense | None:
    """The defense as a results row was certified with (its certification-time parameters,
    e.g. PatchCleanser's masks per axis, may differ from the checkpoint's); None where its
    class cannot be built."""
    try:
        return get_defense(str(cell["defense"])).from_params(parse_params(cell.get("params")))
    except Exception:  # a plugin that is gone or broken: reported by the checkpoint's loading
        return None


def unsupported(defense: Defense) -> str | None:
    return None if isinstance(defense, VoteMapDefense) else defense.unsupported("gallery")


def gallery_examples(results_dir: Path, cell: pd.Series, patches: list[str], n: int,
                     datasets: dict[tuple[str, str], ImageData]
                     ) -> tuple[Checkpoint, list[Example]]:
    """The checkpoint of a results row (``cell``) and ``n`` gallery examples for it: vote-map
    ``Example``s, or the ``Explanation``s of the defense's ``explain`` hook.

    ``datasets`` caches loaded splits between configurations. GalleryUnsupported where the
    defense has no gallery, GalleryUnavailable where its inputs are missing.
    """
    problem = gallery_support(cell)
    if problem:
        raise GalleryUnsupported(problem)
    checkpoint, per_image, data = gallery_inputs(results_dir, cell, datasets)
    precision = cell_precision(cell)
    patch = gallery_patch(patches)
    if prediction_column(per_image, patch) is None:
        raise GalleryUnavailable(f"its per-image table has no prediction for {patch}")
    rows = per_image.iloc[pick_images(per_image, patch, n)]
    try:
        images = torch.stack([data.dataset[int(i)][0] for i in rows["index"]])
    except IndexError:
        raise GalleryUnavailable(f"its per-image table names images beyond the {len(data)} "
                                 f"of {data.name} {data.split}") from None
    # the model and inputs as certify_split ran them (BatchNorm folded, cast to precision)
    model, inputs = for_inference(checkpoint.model, precision), images.to(
        precision_dtype(precision))
    try:
        if not isinstance(checkpoint.defense, VoteMapDefense):
            return checkpoint, explanations(checkpoint.defense, model, rows, inputs, patch)
        with torch.no_grad():
            votes = checkpoint.defense.votes(model, inputs).cpu().numpy().astype(bool)
    except RuntimeError as err:  # e.g. an older torch without fp16 convolutions on a CPU
        raise GalleryUnavailable(f"its {precision} forward passes fail here: "
                                 f"{str(err).splitlines()[0] if str(err) else err!r}") from None
    image_hw = (images.shape[-2], images.shape[-1])
    fp = checkpoint.defense.footprints(patch, image_hw)
    stored_column = f"margin_tight_{patch}"
    examples = []
    for k, (_, row) in enumerate(rows.iterrows()):
        margin, y, rival, i, j = worst_footprint(votes[k], fp)
        footprint = (fp.rows[i], fp.cols[j])
        stored = [row.get(f"votes_{c}") for c in range(votes.shape[1])]
        examples.append(Example(
            index=int(row["index"]), image=images[k].numpy(), votes=votes[k],
            label=int(row["label"]), prediction=y, rival=rival, patch=patch, margin=margin,
            stored_margin=int(row[stored_column]) if stored_column in row else None,
            footprint=footprint,
            position=patch_position(checkpoint.defense, patch, image_hw, footprint),
            votes_match=stored == votes[k].sum(axis=(1, 2)).tolist()))
    return checkpoint, examples


def cell_precision(cell: pd.Series) -> str:
    """The precision a results row's votes were computed in (fp32 for rows without one);
    GalleryUnavailable for one that ``evaluate`` does not know."""
    precision = cell.get("precision")
    precision = precision if isinstance(precision, str) and precision else "fp32"
    try:
        precision_dtype(precision)
    except ValueError as err:
        raise GalleryUnavailable(f"its rows name {err}") from None
    return precision


def cell_defense(checkpoint: Checkpoint, cell: pd.Series) -> Checkpoint:
    """The checkpoint's weights read by the defense the row was certified with: the
    checkpoint's defense class built from the row's ``params`` (the checkpoint's own for any
    the row lacks), as ``sweep.run_cell`` builds it; GalleryUnavailable where they are
    malformed or refused by the defense."""
    try:
        params = {**checkpoint.defense.params(), **parse_params(cell.get("params"))}
        defense = type(checkpoint.defense).from_params(params)
    except (ValueError, TypeError) as err:
        raise GalleryUnavailable(f"its params do not build {checkpoint.defense.name}: "
                                 f"{str(err).splitlines()[0] if str(err) else err!r}") from None
    return dataclasses.replace(checkpoint, defense=defense)


def prediction_column(per_image: pd.DataFrame, patch: PatchShape) -> str | None:
    """The per-image column of the defended prediction for ``patch``, if any."""
    return next((c for c in (f"prediction_{patch}", "prediction") if c in per_image), None)


def explanations(defense: Defense, model: torch.nn.Module, rows: pd.DataFrame,
                 images: torch.Tensor, patch: PatchShape) -> list[Explanation]:
    """The defense's ``explain`` of each image, with the label and the stored outcome."""
    held = ordered(conditions_in(rows, patch))
    stored = certified_flags(rows, held[0], patch).tolist() if held else [None] * len(rows)
    out = []
    for k, (index, label, prediction) in enumerate(zip(
            rows["index"], rows["label"], prediction_of(rows, patch), strict=True)):
        ex = defense.explain(model, images[k], patch)
        out.append(dataclasses.replace(
            ex, index=int(index), label=int(label), stored_prediction=int(prediction),
            stored_certified=None if stored[k] is None else bool(stored[k])))
    return out


def gallery_inputs(results_dir: Path, cell: pd.Series, datasets: dict[tuple[str, str], ImageData]
                   ) -> tuple[Checkpoint, pd.DataFrame, ImageData]:
    """Checkpoint (read by the row's defense, ``cell_defense``), per-image table and dataset
    split of a results row; GalleryUnavailable (one line) when one of them is missing or
    unusable."""
    sha = cell.get("checkpoint_sha256")
    if not isinstance(sha, str) or not sha:
        raise GalleryUnavailable("its rows carry no checkpoint hash")
    path = find_checkpoint_by_hash(sha, cell["dataset"], cell["defense"])
    if path is None:
        raise GalleryUnavailable(f"checkpoint {sha[:12]} is neither in checkpoints/ nor in "
                                 f"the cache ({cache_dir()})")
    split = cell.get("split")
    key = (str(cell["dataset"]), split if isinstance(split, str) else "test")
    try:
        checkpoint = load_checkpoint(path)
        per_image = pd.read_csv(results_dir / "per_image" / f"{cell.get('cell')}.csv.gz")
        if key not in datasets:
            datasets[key] = load_dataset(*key)
    except (CheckpointError, DatasetNotFoundError, DatasetFormatError, OSError, EOFError,
            KeyError, ValueError) as err:
        raise GalleryUnavailable(str(err).strip("'").splitlines()[0]) from None
    checkpoint = cell_defense(checkpoint, cell)
    problem = unsupported(checkpoint.defense)
    if problem:
        raise GalleryUnsupported(problem)
    missing = {"index", "label"} - set(per_image.columns)
    if missing or per_image.empty:
        raise GalleryUnavailable(f"its per-image table lacks {', '.join(sorted(missing))}"
                                 if missing else "its per-image table is empty")
    return checkpoint, per_image, datasets[key]
