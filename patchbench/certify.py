"""The certification core: a vote map and footprints in, predictions and certificates out.

It knows nothing about any defense (DESIGN.md §1). With ``n_c`` the votes of class ``c``,
``y`` the prediction (argmax, ties to the smallest index), ``a_c(R)`` the votes of ``c``
inside footprint ``R``:

* tight:  for every footprint R and c != y:  (n_y - a_y(R)) - (n_c - a_c(R)) - |R| >= [c < y]
* global: for every c != y:                  n_y - n_c - 2 * max_R |R|            >= [c < y]

The ``[c < y]`` term is the tie-break: a tie with a smaller class index would flip the
prediction, so it needs one more vote. We report the *margin*, the smallest left-hand side
minus right-hand side over classes and footprints; an image is certified iff margin >= 0.
(For ``tight``, a non-negative margin may be a lower bound: see ``_tight_margins``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from patchbench.footprints import Footprints

CONDITIONS = ("tight", "global")

# Upper bound on the elements of one int32 box-sum block (64 Mi elements = 256 MiB).
DEFAULT_MAX_ELEMENTS = 1 << 26


@dataclass
class Certificate:
    """Outcome for a batch of B images and S patch shapes.

    ``margin[cond]`` is (B, S) int64; ``certified[cond]`` is ``margin >= 0``.
    """

    prediction: Tensor  # (B,) int64
    counts: Tensor  # (B, C) int64, votes per class
    margin: dict[str, Tensor]

    @property
    def certified(self) -> dict[str, Tensor]:
        return {cond: m >= 0 for cond, m in self.margin.items()}


def certify_votes(votes: Tensor, footprints: Sequence[Footprints],
                  conditions: Sequence[str] = CONDITIONS,
                  max_elements: int = DEFAULT_MAX_ELEMENTS) -> Certificate:
    """Certify every image of ``votes`` (B, C, h, w; bool or 0/1) for each footprint set.

    Memory stays below about ``max_elements`` int32 values per block: images, and if
    needed row intervals, are processed in chunks.
    """
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"unknown condition(s) {sorted(unknown)}; choose from {list(CONDITIONS)}")
    if votes.dim() != 4:
        raise ValueError(f"votes must be (B, C, h, w), got shape {tuple(votes.shape)}")
    batch, n_classes, h, w = votes.shape
    for fp in footprints:
        if fp.map_hw != (h, w):
            raise ValueError(f"footprints for a {fp.map_hw} map, votes are {h}x{w}")
    votes = votes.to(torch.int32)
    counts = votes.sum(dim=(2, 3), dtype=torch.int64)
    prediction = counts.argmax(dim=1)  # first maximum: ties go to the smallest index
    # tiebreak[b, c] = 1 where class c < y would win a tie
    classes = torch.arange(n_classes, device=votes.device)
    tiebreak = (classes[None, :] < prediction[:, None]).to(torch.int64)
    lead = counts.gather(1, prediction[:, None]) - counts - tiebreak  # (B, C)
    not_pred = classes[None, :] != prediction[:, None]
    big = torch.iinfo(torch.int64).max // 4

    margin: dict[str, Tensor] = {}
    if "global" in conditions:
        deltas = torch.tensor([2 * fp.max_size for fp in footprints], device=votes.device)
        worst = lead.masked_fill(~not_pred, big).min(dim=1).values  # (B,)
        margin["global"] = worst[:, None] - deltas[None, :]
    if "tight" in conditions:
        margin["tight"] = _tight_margins(votes, footprints, prediction, lead, not_pred,
                                         max_elements, big)
    return Certificate(prediction=prediction, counts=counts,
                       margin={c: margin[c] for c in conditions})


def _tight_margins(votes: Tensor, footprints: Sequence[Footprints], prediction: Tensor,
                   lead: Tensor, not_pred: Tensor, max_elements: int, big: int) -> Tensor:
    """min over R and c != y of  lead_c + a_c(R) - a_y(R) - |R|,  as (B, S).

    Only *contenders* are box-summed: a class with lead_c >= max_R (a_y(R) + |R|) cannot win
    in any footprint (a_c >= 0), and enters the minimum with that lower bound instead. So a
    negative margin is exact, a non-negative one a lower bound of the exact margin, and the
    certified flag is exact either way; with many classes, few are ever contenders.
    """
    batch, n_classes, h, w = votes.shape
    out = torch.empty(batch, len(footprints), dtype=torch.int64, device=votes.device)
    wrap_h = max((max(n for _, n in fp.rows) for fp in footprints if fp.cyclic), default=1) - 1
    wrap_w = max((max(n for _, n in fp.cols) for fp in footprints if fp.cyclic), default=1) - 1
    cells_per_image = n_classes * (h + wrap_h + 1) * (w + wrap_w + 1)
    chunk = max(1, max_elements // cells_per_image)
    for lo in range(0, batch, chunk):
        sl = slice(lo, lo + chunk)
        integral = _integral(votes[sl], wrap_h, wrap_w)
        for s, fp in enumerate(footprints):
            out[sl, s] = _shape_margin(integral, fp, prediction[sl], lead[sl], not_pred[sl],
                                       max_elements, big)
    return out


def _integral(votes: Tensor, wrap_h: int, wrap_w: int) -> Tensor:
    """Integral image (B, C, h+wrap_h+1, w+wrap_w+1), circularly extended for wrapping."""
    if wrap_h or wrap_w:
        votes = torch.cat([votes, votes[:, :, :wrap_h]], dim=2)
        votes = torch.cat([votes, votes[:, :, :, :wrap_w]], dim=3)
    integral = votes.cumsum(dim=2, dtype=torch.int32).cumsum(dim=3, dtype=torch.int32)
    return F.pad(integral, (1, 0, 1, 0))


def _box_sums(integral: Tensor, fp: Footprints) -> Tensor:
    """Votes inside every footprint: (..., H', W') integral images -> (..., rows * cols)."""
    device = integral.device
    r0 = torch.tensor([r for r, _ in fp.rows], device=device)
    r1 = r0 + torch.tensor([n for _, n in fp.rows], device=device)
    c0 = torch.tensor([c for c, _ in fp.cols], device=device)
    c1 = c0 + torch.tensor([n for _, n in fp.cols], device=device)
    bands = integral.index_select(-2, r1) - integral.index_select(-2, r0)  # separable
    return (bands.index_select(-1, c1) - bands.index_select(-1, c0)).flatten(-2)


def _shape_margin(integral: Tensor, fp: Footprints, prediction: Tensor, lead: Tensor,
                  not_pred: Tensor, max_elements: int, big: int) -> Tensor:
    b = integral.shape[0]
    sizes = torch.tensor([rn * cn for _, rn in fp.rows for _, cn in fp.cols],
                         dtype=torch.int32, device=integral.device)
    own = integral[torch.arange(b, device=integral.device), prediction]  # (b, H', W')
    loss = _box_sums(own, fp) + sizes  # a_y(R) + |R|, (b, F), int32
    bound = lead - loss.amax(dim=1, keepdim=True)  # margin lower bound per class, int64
    contender = not_pred & (bound < 0)
    worst = bound.masked_fill(~not_pred | contender, big).amin(dim=1)
    images, classes = contender.nonzero(as_tuple=True)
    lead32 = lead.to(torch.int32)
    per_chunk = max(1, max_elements // max(1, loss.shape[1]))
    for lo in range(0, len(images), per_chunk):
        bi, ci = images[lo:lo + per_chunk], classes[lo:lo + per_chunk]
        gain = _box_sums(integral[bi, ci], fp)  # a_c(R), (k, F)
        margin = (gain - loss[bi]).amin(dim=1) + lead32[bi, ci]
        worst = worst.scatter_reduce(0, bi, margin.to(torch.int64), reduce="amin")
    return worst
