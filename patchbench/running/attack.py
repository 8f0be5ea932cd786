"""Empirical patch attack (an upper bound on robust accuracy) and the soundness check.

Certified accuracy is a lower bound on robust accuracy; a strong attack gives an upper bound,
and checks the certificates on the way: an image certified for a patch shape whose prediction
an attack changes is a *soundness violation* (a bug in a defense's votes or footprints, or in
the certification core), never a result. Global certificates imply tight ones
(``certify.py``), so checking the tight-certified images covers both conditions.

For each image and patch shape the attack tries

* **positions**: a strided grid (every ``position_stride``-th top and left, plus the last one,
  so that both borders are covered; stride 1 = every position) and the ``worst_positions``
  whose touched cells give the smallest tight margin on the clean votes (the footprints closest
  to flipping), most vulnerable first over the whole batch;
* **content**: PGD with signed gradients (``steps`` of ``step_size``, pixels in [0, 1]) from
  ``restarts`` uniform random starts, ascending ``max_{c != y} n~_c - n~_y``: ``y`` is the
  clean prediction, ``n~`` counts the hard clean votes outside the patch's cells and the
  defense's relaxed ``soft_votes`` inside (BagCert ``sigmoid(s / T)``; smoothing
  ``sigmoid(log p - log theta)`` on the ablations the patch touches);
* **verdict**: the best iterate of each restart is voted on by the defense's real ``votes`` on
  the whole patched image, prediction = argmax with ties to the smallest index, exactly as in
  ``certify_votes``. One changed prediction breaks the image; its other positions are skipped.

Cost per attacked (image, position) pair: ``restarts * (steps + 1)`` relaxed forward passes
(BagCert crops to the patch's receptive field; smoothing runs only the touched ablations, so
each pass is that many base-classifier passes), ``restarts * steps`` backward passes and
``restarts`` full vote passes. Only images that are correctly classified or certified are
attacked, most vulnerable positions first, and a broken image costs no more. With the default
budget (about 33 positions per image and shape on 28 x 28 images), the 2-core CPU here spends
about 0.35 s per image and shape on the shipped Fashion-MNIST BagCert and 2 s on column
smoothing (the attack steps of ``studies/fashion-mnist.toml``); on BagCert's first 20 test
images with 2x12 and 12x2 patches, twice the steps and twice the restarts (4x the time)
broke one more image. Block smoothing touches about 25x more ablations per patch than column
smoothing: raise ``position_stride``, lower ``worst_positions`` or use a GPU.

A defense takes part through two hooks: ``touched_cells(image_hw, boxes)`` (the cells a patch
can change, from its own geometry, not from ``footprints``) and ``soft_votes(model, images,
cells)`` (the relaxed votes of those cells).

A defense of any other family (PatchCleanser) takes part through ``attack_surrogate(model,
patched, prediction, boxes, patch)`` (a differentiable objective (N,) to ascend) and
``defended_prediction(model, patched, patch)`` (its real prediction, the judge): the images
certified by ``certify`` (any condition) or correct are attacked at the strided grid of
positions, those nearest the image centre first, with the same PGD budget; the best iterate of
each restart is judged by ``defended_prediction`` on the whole patched image. A defense with
neither set of hooks gets ``AttackUnsupportedError`` ("attack not supported by ...").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

from patchbench.certify import CONDITIONS, Certificate, certify_votes
from patchbench.defense import Defense, VoteMapDefense
from patchbench.patches import PatchShape, box_masks, check_fits
from patchbench.running import per_image
from patchbench.running.data import ImageData, batches
from patchbench.running.evaluate import for_inference, loader_options
from patchbench.running.progress import progress_bar

# (image, position) pairs per PGD batch of a defense without a vote map (each surrogate pass
# may run the base classifier many times per pair: k^2 masked images for PatchCleanser).
GENERIC_CHUNK = 64
# Most (image, class, position) margins computed at once when ranking positions.
MAX_MARGIN_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class AttackBudget:
    """The knobs of the attack; every one trades time for strength (see the module doc)."""

    steps: int = 10  # PGD steps per restart
    restarts: int = 2  # random starts per (image, position)
    step_size: float = 0.15  # signed-gradient step, in pixel units ([0, 1])
    position_stride: int = 7  # grid of patch positions; 1 = every position
    worst_positions: int = 8  # plus this many most vulnerable positions per image
    chunk_cells: int = 4096  # relaxed cells per PGD batch (bounds memory)
    seed: int = 0  # random starts and tie-breaks among equally vulnerable positions

    def __post_init__(self) -> None:
        if self.steps < 0 or self.restarts < 1 or self.step_size <= 0:
            raise ValueError("need steps >= 0, restarts >= 1 and step_size > 0")
        if self.position_stride < 1 or self.worst_positions < 0 or self.chunk_cells < 1:
            raise ValueError("need position_stride >= 1, worst_positions >= 0, chunk_cells >= 1")


class AttackUnsupportedError(ValueError):
    """The defense lacks the hooks the attack needs, or certifies without a vote map."""


@dataclass(frozen=True)
class Violation:
    """A certified image whose prediction a patch changed. ``margin`` is that of
    ``margin_condition`` (the first certifying condition with a margin), None where no
    certifying condition has one; ``counts_*`` are the votes of a vote-map defense."""

    index: int
    patch: PatchShape
    top: int
    left: int
    conditions: tuple[str, ...]  # the conditions that certified it
    margin: int | float | None
    prediction: int
    adv_prediction: int
    margin_condition: str | None = None
    counts_before: tuple[int, ...] | None = None
    counts_after: tuple[int, ...] | None = None

    def __str__(self) -> str:
        margin = ("" if self.margin is None else
                  f", {self.margin_condition} margin {self.margin}")
        votes = ("" if self.counts_before is None or self.counts_after is None else
                 f" (votes {list(self.counts_before)} -> {list(self.counts_after)})")
        return (f"image {self.index}, patch {self.patch} at (top {self.top}, left "
                f"{self.left}): certified ({'+'.join(self.conditions)}{margin}) but the "
                f"prediction changed {self.prediction} -> {self.adv_prediction}{votes}")


class SoundnessError(AssertionError):
    """An attack broke a certified image: the certificate is wrong."""


@dataclass
class AttackResult:
    """Per-image outcomes, the violations found, the budget and the wall time."""

    per_image: pd.DataFrame  # index, label, prediction, votes_<c>, then per shape: margins,
    #                          attacked, broken, adv_prediction, adv_top, adv_left (any other
    #                          family: index, label, per_image.certificate_columns, then per
    #                          shape the attack columns)
    violations: list[Violation]
    budget: AttackBudget
    attack_seconds: float
    conditions: tuple[str, ...] = CONDITIONS  # the defense's certification conditions

    def check(self) -> None:
        """Raise SoundnessError naming the first violation, if there is any."""
        if self.violations:
            raise SoundnessError(f"{len(self.violations)} soundness violation(s); first: "
                                 f"{self.violations[0]}")


def attack_split(defense: Defense, model: nn.Module, data: ImageData,
                 patches: Sequence[PatchShape], budget: AttackBudget = AttackBudget(),
                 batch_size: int = 256, device: torch.device | str = "cpu",
                 show_progress: bool = True) -> AttackResult:
    """Certify and attack every image of ``data`` for every patch shape (see module doc):
    through the vote map for a ``VoteMapDefense``, else through the defense's
    ``attack_surrogate`` and ``defended_prediction``."""
    problem = defense.unsupported("attack")
    if problem is not None:
        raise AttackUnsupportedError(problem)
    check_fits(list(patches), data.in_shape[1:])
    device = torch.device(device)
    model = for_inference(model.to(device))  # the model exactly as `run` certifies with it
    run = _attack_votes if isinstance(defense, VoteMapDefense) else _attack_generic
    return run(defense, model, data, patches, budget, batch_size, device, show_progress)


def _attack_votes(defense: VoteMapDefense, model: nn.Module, data: ImageData,
                  patches: Sequence[PatchShape], budget: AttackBudget, batch_size: int,
                  device: torch.device, show_progress: bool) -> AttackResult:
    """The vote-map attack: ``touched_cells`` and ``soft_votes`` (see module doc); ``model``
    as ``for_inference`` makes it."""
    footprints = [defense.footprints(p, data.in_shape[1:]) for p in patches]
    generator = torch.Generator().manual_seed(budget.seed)
    frames, violations = [], []
    start = time.perf_counter()
    for offset, images, labels, advance in _image_batches(defense, data, patches, batch_size,
                                                          device, show_progress):
        with torch.no_grad():
            votes = defense.votes(model, images)
        cert = certify_votes(votes, footprints, CONDITIONS)
        frame = per_image.batch_columns(offset, labels, cert, patches)
        for s, patch in enumerate(patches):
            targets = (cert.prediction == labels) | cert.certified["tight"][:, s]
            out = _attack_shape(defense, model, images, votes, cert.counts, cert.prediction,
                                targets, patch, budget, generator, advance)
            for key, value in out.items():
                if key != "counts_after":
                    frame[f"{key}_{patch}"] = value.cpu().numpy()
            violations += _violations(offset, patch, s, cert, out)
        frames.append(pd.DataFrame(frame))
    return AttackResult(pd.concat(frames, ignore_index=True), violations, budget,
                        time.perf_counter() - start)


def _image_batches(defense: Defense, data: ImageData, patches: Sequence[PatchShape],
                   batch_size: int, device: torch.device, show_progress: bool
                   ) -> Iterator[tuple[int, Tensor, Tensor, Callable[[int], None]]]:
    """(offset, images, labels, advance) per batch, on ``device``, under one progress bar of
    images x shapes (``advance(n)`` moves it): the loop both attack paths share."""
    offset = 0
    with progress_bar(show_progress) as bar:
        task = bar.add_task(f"attack {defense.name}", total=len(data) * len(patches), status="")
        for images, labels in batches(data, batch_size, **loader_options(device)):
            yield (offset, images.to(device), labels.to(device),
                   lambda done: bar.update(task, advance=done))
            offset += len(labels)


def _violations(offset: int, patch: PatchShape, s: int, cert: Certificate,
                out: dict[str, Tensor]) -> list[Violation]:
    found = []
    for b in (out["broken"] & cert.certified["tight"][:, s]).nonzero().flatten().tolist():
        found.append(Violation(
            index=offset + b, patch=patch, top=int(out["adv_top"][b]),
            left=int(out["adv_left"][b]),
            conditions=tuple(c for c in CONDITIONS if cert.certified[c][b, s]),
            margin=int(cert.margin["tight"][b, s]), margin_condition="tight",
            prediction=int(cert.prediction[b]), adv_prediction=int(out["adv_prediction"][b]),
            counts_before=tuple(cert.counts[b].tolist()),
            counts_after=tuple(out["counts_after"][b].tolist())))
    return found


def grid_positions(n_pixels: int, patch_len: int, stride: int) -> Tensor:
    """Bool (n_pixels - patch_len + 1,): every ``stride``-th start and the last one."""
    on = torch.arange(n_pixels - patch_len + 1) % stride == 0
    on[-1] = True
    return on


def position_margins(votes: Tensor, cells: Tensor, prediction: Tensor) -> Tensor:
    """Tight margin (B, P) of each position's touched cells (bool P, h, w): the certificate's
    ``min_{c != y} (n_y - a_y(R)) - (n_c - a_c(R)) - |R| - [c < y]`` for one footprint each."""
    batch, n_classes = votes.shape[:2]
    touched = cells.flatten(1).float()
    size = touched.sum(dim=1)
    classes = torch.arange(n_classes, device=votes.device)
    out = []
    step = max(1, MAX_MARGIN_ELEMENTS // (n_classes * len(touched)))
    for lo in range(0, batch, step):
        v, y = votes[lo:lo + step].flatten(2).float(), prediction[lo:lo + step]
        outside = v.sum(dim=2, keepdim=True) - v @ touched.T  # n_c - a_c(R), (b, C, P)
        own = outside.gather(1, y[:, None, None].expand(-1, 1, len(touched)))
        tiebreak = (classes[None, :] < y[:, None]).float()[:, :, None]
        margin = own - outside - size - tiebreak
        margin = margin.masked_fill((classes[None, :] == y[:, None])[:, :, None], float("inf"))
        out.append(margin.amin(dim=1).long())
    return torch.cat(out)


def _attack_shape(defense: Defense, model: nn.Module, images: Tensor, votes: Tensor,
                  counts: Tensor, prediction: Tensor, targets: Tensor, patch: PatchShape,
                  budget: AttackBudget, generator: torch.Generator,
                  advance: Callable[[float], None]) -> dict[str, Tensor]:
    """Attack the ``targets`` images of a batch with one patch shape, most vulnerable
    positions first; per image: attacked, broken, adv_prediction/top/left, counts_after."""
    height, width = images.shape[-2:]
    device = images.device
    tops, lefts = torch.meshgrid(torch.arange(height - patch.height + 1, device=device),
                                 torch.arange(width - patch.width + 1, device=device),
                                 indexing="ij")
    boxes = torch.stack([tops.flatten(), lefts.flatten(), torch.full_like(tops.flatten(),
                         patch.height), torch.full_like(tops.flatten(), patch.width)], dim=1)
    cells = defense.touched_cells((height, width), boxes)
    on_grid = (grid_positions(height, patch.height, budget.position_stride)[:, None]
               & grid_positions(width, patch.width, budget.position_stride)[None, :]).flatten()
    # integer margins plus a random fraction: ties between equally vulnerable positions break
    # at random, never across margins
    rank = position_margins(votes, cells, prediction).float() + 0.5 * torch.rand(
        len(images), len(boxes), generator=generator).to(device)
    chosen = on_grid.to(device)[None, :].repeat(len(images), 1)
    worst = rank.topk(min(budget.worst_positions, len(boxes)), dim=1, largest=False).indices
    chosen.scatter_(1, worst, True)
    pair_image, pair_position = (chosen & targets[:, None]).nonzero(as_tuple=True)
    order = rank[pair_image, pair_position].argsort(stable=True)
    pair_image, pair_position = pair_image[order], pair_position[order]

    out = {"attacked": targets.clone(), "broken": torch.zeros_like(targets),
           "adv_prediction": prediction.clone(),
           "adv_top": torch.full_like(prediction, -1), "adv_left": torch.full_like(prediction, -1),
           "counts_after": counts.clone()}
    chunk = max(1, budget.chunk_cells // int(cells.flatten(1).sum(dim=1).max()))
    per_pair = len(images) / max(1, len(pair_image))
    if not len(pair_image):
        advance(len(images))
    while len(pair_image):
        alive = ~out["broken"][pair_image]
        advance(per_pair * int((~alive).sum()))
        img, pos = pair_image[alive][:chunk], pair_position[alive][:chunk]
        pair_image, pair_position = pair_image[alive][chunk:], pair_position[alive][chunk:]
        flipped, adv_prediction, counts_after = _pgd(
            defense, model, images[img], votes[img], counts[img], prediction[img], boxes[pos],
            cells[pos], budget, generator)
        for j in flipped.nonzero().flatten().tolist():
            b = int(img[j])
            if not out["broken"][b]:  # the most vulnerable success is the witness
                out["broken"][b] = True
                out["adv_prediction"][b] = adv_prediction[j]
                out["adv_top"][b], out["adv_left"][b] = boxes[pos[j], 0], boxes[pos[j], 1]
                out["counts_after"][b] = counts_after[j]
        advance(per_pair * len(img))
    return out


def _pgd(defense: Defense, model: nn.Module, clean: Tensor, clean_votes: Tensor,
         clean_counts: Tensor, prediction: Tensor, boxes: Tensor, cells: Tensor,
         budget: AttackBudget, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """PGD on the content of one patch per image; return (flipped, adv_prediction,
    counts_after), judged by the defense's real votes on the whole patched image.

    Each restart keeps its best iterate: one whose relaxed votes, thresholded (soft > 1/2),
    already change the prediction, else the highest relaxed objective. An element stops
    stepping once its thresholded votes flip (the real votes then have the last word).
    """
    n, n_classes = clean_counts.shape
    paste = box_masks(boxes, clean.shape[-2:])[:, None].to(clean.dtype)
    cell_mask = cells[:, None]
    fixed = clean_counts.float() - (clean_votes & cell_mask).flatten(2).sum(dim=2).float()
    rival = torch.arange(n_classes, device=clean.device)[None, :] != prediction[:, None]
    flipped = torch.zeros(n, dtype=torch.bool, device=clean.device)
    adv_prediction, counts_after = prediction.clone(), clean_counts.clone()
    alive = torch.arange(n, device=clean.device)
    for _ in range(budget.restarts):
        if not len(alive):
            break
        content = torch.rand(clean[alive].shape, generator=generator).to(clean)
        best = content.clone()
        best_objective = torch.full((len(alive),), -float("inf"), device=clean.device)
        best_flips = torch.zeros(len(alive), dtype=torch.bool, device=clean.device)
        active = torch.arange(len(alive), device=clean.device)  # into alive
        for step in range(budget.steps + 1):
            a = alive[active]
            current = content[active].requires_grad_(True)
            patched = clean[a] * (1 - paste[a]) + current * paste[a]
            soft = defense.soft_votes(model, patched, cells[a]) * cell_mask[a]
            soft_counts = fixed[a] + soft.flatten(2).sum(dim=2)
            own = soft_counts.gather(1, prediction[a, None]).squeeze(1)
            objective = soft_counts.masked_fill(~rival[a], -float("inf")).amax(dim=1) - own
            hard = fixed[a] + (soft.detach() > 0.5).flatten(2).sum(dim=2)
            flips = hard.argmax(dim=1) != prediction[a]  # first maximum, as certify_votes
            better = (flips > best_flips[active]) | ((flips == best_flips[active])
                                                    & (objective.detach() > best_objective[active]))
            best[active[better]] = current.detach()[better]
            best_objective[active[better]] = objective.detach()[better]
            best_flips[active[better]] = flips[better]
            if step == budget.steps or bool(flips.all()):
                break
            (grad,) = torch.autograd.grad(objective.sum(), current)
            content[active] = (current.detach() + budget.step_size * grad.sign()).clamp(0, 1)
            active = active[~flips]
        with torch.no_grad():
            after = defense.votes(model, clean[alive] * (1 - paste[alive]) + best * paste[alive])
        after = after.flatten(2).sum(dim=2)
        predicted = after.argmax(dim=1)  # first maximum: ties to the smallest index
        hit = predicted != prediction[alive]
        flipped[alive[hit]] = True
        adv_prediction[alive[hit]] = predicted[hit]
        counts_after[alive[hit]] = after[hit]
        alive = alive[~hit]
    return flipped, adv_prediction, counts_after


def _attack_generic(defense: Defense, model: nn.Module, data: ImageData,
                    patches: Sequence[PatchShape], budget: AttackBudget, batch_size: int,
                    device: torch.device, show_progress: bool) -> AttackResult:
    """The attack on a defense of any family (no vote map): certify with ``certify``, ascend
    ``attack_surrogate`` on the patch content, judge with ``defended_prediction``. Positions
    are the strided grid only (no margins to rank them by), those nearest the image centre
    first; ``worst_positions`` and ``chunk_cells`` do not apply."""
    conditions = tuple(defense.conditions)
    generator = torch.Generator().manual_seed(budget.seed)
    frames, violations = [], []
    start = time.perf_counter()
    for offset, images, labels, advance in _image_batches(defense, data, patches, batch_size,
                                                          device, show_progress):
        with torch.no_grad():
            cert = defense.certify(model, images, patches, conditions)
        frame = per_image.batch_columns(offset, labels, cert, patches)
        for s, patch in enumerate(patches):
            prediction = cert.prediction_for(s)
            certified = torch.stack([cert.certified[c][:, s] for c in conditions]).any(dim=0)
            targets = (prediction == labels) | certified
            out = _attack_shape_generic(defense, model, images, prediction, targets, patch,
                                        budget, generator, advance)
            for key, value in out.items():
                frame[f"{key}_{patch}"] = value.cpu().numpy()
            for b in (out["broken"] & certified).nonzero().flatten().tolist():
                by = [c for c in conditions if cert.certified[c][b, s]]
                with_margin = [c for c in by if c in cert.margin]
                margin = cert.margin[with_margin[0]][b, s] if with_margin else None
                violations.append(Violation(
                    index=offset + b, patch=patch, top=int(out["adv_top"][b]),
                    left=int(out["adv_left"][b]), conditions=tuple(by),
                    margin=None if margin is None else margin.item(),
                    margin_condition=with_margin[0] if with_margin else None,
                    prediction=int(prediction[b]),
                    adv_prediction=int(out["adv_prediction"][b]),
                    counts_before=(None if cert.counts is None else
                                   tuple(cert.counts[b].tolist()))))
        frames.append(pd.DataFrame(frame))
    return AttackResult(pd.concat(frames, ignore_index=True), violations, budget,
                        time.perf_counter() - start, conditions)


def central_order(image_hw: tuple[int, int], patch: PatchShape, stride: int) -> Tensor:
    """Boxes (P, 4) of the grid positions (``grid_positions`` on each axis), those whose centre
    is nearest the image centre first (ties in row-major order)."""
    height, width = image_hw
    tops = grid_positions(height, patch.height, stride).nonzero().flatten()
    lefts = grid_positions(width, patch.width, stride).nonzero().flatten()
    tops, lefts = (g.flatten() for g in torch.meshgrid(tops, lefts, indexing="ij"))
    distance = ((2 * tops + patch.height - height) ** 2
                + (2 * lefts + patch.width - width) ** 2)
    order = distance.argsort(stable=True)
    return torch.stack([tops[order], lefts[order], torch.full_like(tops, patch.height),
                        torch.full_like(tops, patch.width)], dim=1)


def _attack_shape_generic(defense: Defense, model: nn.Module, images: Tensor,
                          prediction: Tensor, targets: Tensor, patch: PatchShape,
                          budget: AttackBudget, generator: torch.Generator,
                          advance: Callable[[float], None]) -> dict[str, Tensor]:
    """Attack the ``targets`` images of a batch with one patch shape, position by position
    (central first); per image: attacked, broken, adv_prediction/top/left."""
    device = images.device
    boxes = central_order(tuple(images.shape[-2:]), patch, budget.position_stride).to(device)
    # (image, position) pairs, position-major: a chunk tries one position on many images
    pair_position, pair_image = torch.meshgrid(torch.arange(len(boxes), device=device),
                                               targets.nonzero().flatten(), indexing="ij")
    pair_image, pair_position = pair_image.flatten(), pair_position.flatten()
    out = {"attacked": targets.clone(), "broken": torch.zeros_like(targets),
           "adv_prediction": prediction.clone(),
           "adv_top": torch.full_like(prediction, -1), "adv_left": torch.full_like(prediction, -1)}
    per_pair = len(images) / max(1, len(pair_image))
    if not len(pair_image):
        advance(len(images))
    while len(pair_image):
        alive = ~out["broken"][pair_image]
        advance(per_pair * int((~alive).sum()))
        img, pos = pair_image[alive][:GENERIC_CHUNK], pair_position[alive][:GENERIC_CHUNK]
        pair_image = pair_image[alive][GENERIC_CHUNK:]
        pair_position = pair_position[alive][GENERIC_CHUNK:]
        flipped, adv_prediction = _pgd_generic(defense, model, images[img], prediction[img],
                                               boxes[pos], patch, budget, generator)
        for j in flipped.nonzero().flatten().tolist():
            b = int(img[j])
            if not out["broken"][b]:  # the first (most central) success is the witness
                out["broken"][b] = True
                out["adv_prediction"][b] = adv_prediction[j]
                out["adv_top"][b], out["adv_left"][b] = boxes[pos[j], 0], boxes[pos[j], 1]
        advance(per_pair * len(img))
    return out


def _pgd_generic(defense: Defense, model: nn.Module, clean: Tensor, prediction: Tensor,
                 boxes: Tensor, patch: PatchShape, budget: AttackBudget,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """PGD on the content of one patch per image ascending ``attack_surrogate``; the best
    iterate of each restart is judged by ``defended_prediction`` on the whole patched image.
    Return (flipped, adv_prediction)."""
    n = len(clean)
    paste = box_masks(boxes, clean.shape[-2:])[:, None].to(clean.dtype)
    flipped = torch.zeros(n, dtype=torch.bool, device=clean.device)
    adv_prediction = prediction.clone()
    alive = torch.arange(n, device=clean.device)
    for _ in range(budget.restarts):
        if not len(alive):
            break
        base, where, y, at = clean[alive], paste[alive], prediction[alive], boxes[alive]
        content = torch.rand(base.shape, generator=generator).to(clean)
        best = content.clone()
        best_objective = torch.full((len(alive),), -float("inf"), device=clean.device)
        for step in range(budget.steps + 1):
            current = content.requires_grad_(True)
            objective = defense.attack_surrogate(model, base * (1 - where) + current * where,
                                                 y, at, patch)
            better = objective.detach() > best_objective
            best[better] = current.detach()[better]
            best_objective[better] = objective.detach()[better]
            if step == budget.steps:
                break
            (grad,) = torch.autograd.grad(objective.sum(), current)
            content = (current.detach() + budget.step_size * grad.sign()).clamp(0, 1)
        with torch.no_grad():
            predicted = defense.defended_prediction(model, base * (1 - where) + best * where,
                                                    patch)
        hit = predicted != y
        flipped[alive[hit]] = True
        adv_prediction[alive[hit]] = predicted[hit]
        alive = alive[~hit]
    return flipped, adv_prediction


def summarize_attack(result: AttackResult, patches: Sequence[PatchShape]) -> pd.DataFrame:
    """One row per patch shape, ``metric`` "empirical": robust accuracy under the attack
    next to the certified accuracy of the same images (no ``condition``: an attack has none)."""
    table = result.per_image
    rows = []
    for patch in patches:
        correct = per_image.correct(table, patch)
        robust = correct & ~table[f"broken_{patch}"]
        certified = {cond: correct & per_image.certified(table, cond, patch)
                     for cond in result.conditions}
        rows.append({"patch": str(patch), "patch_h": patch.height, "patch_w": patch.width,
                     "patch_area": patch.area, "aspect": patch.width / patch.height,
                     "metric": "empirical", "n_images": len(table),
                     "n_correct": int(correct.sum()), "n_robust": int(robust.sum()),
                     "clean_accuracy": float(correct.mean()),
                     "empirical_accuracy": float(robust.mean()),
                     **{f"certified_accuracy_{c}": float(v.mean()) for c, v in certified.items()},
                     "n_attacked": int(table[f"attacked_{patch}"].sum()),
                     "n_violations": sum(v.patch == patch for v in result.violations)})
    return pd.DataFrame(rows)
