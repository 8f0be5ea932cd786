"""The vote-map certification core: a vote map and footprints in, predictions and certificates
out; and the ``Certificate`` every defense family returns.

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

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from patchbench.footprints import Footprints, Interval

CONDITIONS = ("tight", "global")

# Upper bound on the elements of one box-sum block (64 Mi elements: 256 MiB as int32, half
# that as int16); a few such blocks are alive at once.
DEFAULT_MAX_ELEMENTS = 1 << 26


@dataclass
class Certificate:
    """Outcome for a batch of B images and S patch shapes, for a defense of any family.

    ``prediction`` is the defended prediction, int64: (B,) where it is the same for every
    shape (vote maps), else (B, S) (masking: each shape has its own mask set).
    ``certified[cond]`` is (B, S) bool. ``margin[cond]`` (B, S), any number type, is there for
    the conditions that have one (certified iff margin >= 0); ``counts`` (B, C) holds the votes
    per class of a vote-map defense.
    """

    prediction: Tensor
    certified: dict[str, Tensor]
    margin: dict[str, Tensor] = field(default_factory=dict)
    counts: Tensor | None = None

    def prediction_for(self, shape: int) -> Tensor:
        """(B,) defended prediction for the ``shape``-th patch shape."""
        return self.prediction if self.prediction.dim() == 1 else self.prediction[:, shape]

    @property
    def per_shape(self) -> bool:
        """True where the prediction depends on the patch shape."""
        return self.prediction.dim() == 2


def certify_votes(votes: Tensor, footprints: Sequence[Footprints],
                  conditions: Sequence[str] = CONDITIONS,
                  max_elements: int = DEFAULT_MAX_ELEMENTS) -> Certificate:
    """Certify every image of ``votes`` (B, C, h, w; bool or 0/1) for each footprint set.

    Memory stays below about ``max_elements`` values (int16 or int32) per block: images, and if
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
    if votes.dtype != torch.bool:
        votes = votes != 0
    # summing bytes as int32 is twice as fast as letting sum() widen bools to int64
    counts = votes.view(torch.uint8).sum(dim=(2, 3), dtype=torch.int32).to(torch.int64)
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
    margin = {c: margin[c] for c in conditions}
    return Certificate(prediction=prediction, certified={c: m >= 0 for c, m in margin.items()},
                       margin=margin, counts=counts)


def _tight_margins(votes: Tensor, footprints: Sequence[Footprints], prediction: Tensor,
                   lead: Tensor, not_pred: Tensor, max_elements: int, big: int) -> Tensor:
    """min over R and c != y of  lead_c + a_c(R) - a_y(R) - |R|,  as (B, S).

    Only *contenders* get exact box sums: a class with lead_c >= max_R (a_y(R) + |R|) cannot
    win in any footprint (a_c >= 0), and enters the minimum with that lower bound instead. So
    a negative margin is exact, a non-negative one a lower bound of the exact margin, and the
    certified flag is exact either way. Where most classes are contenders (an untrained or
    uncertain model) every class is box-summed at once; where few are (many classes), only
    the contending (image, class) pairs are.

    The box sums run over the integral image of ``V_c - V_y`` (so a_c(R) - a_y(R) is one box
    sum), only over *maximal* footprints (see ``_plan``), and as slices of that integral image
    over runs of equal-length intervals with consecutive starts, never as gathers. Values are
    int16 where the map is small enough for them to be exact, else int32.
    """
    batch, n_classes, h, w = votes.shape
    plans = [_plan(fp) for fp in footprints]
    if not plans:
        return torch.empty(batch, 0, dtype=torch.int64, device=votes.device)
    wrap_h = max(0, max(p.end_rows for p in plans) - h)
    wrap_w = max(0, max(p.end_cols for p in plans) - w)
    hp, wp = h + wrap_h + 1, w + wrap_w + 1
    small = torch.int16 if 2 * hp * wp < 1 << 15 else torch.int32
    out = torch.empty(batch, len(plans), dtype=torch.int64, device=votes.device)
    cells_per_image = n_classes * hp * wp
    chunk = max(1, max_elements // cells_per_image)
    for lo in range(0, batch, chunk):
        sl = slice(lo, lo + chunk)
        out[sl] = _chunk_margins(votes[sl], plans, prediction[sl], lead[sl], not_pred[sl],
                                 (wrap_h, wrap_w), small, max_elements, big)
    return out


def _chunk_margins(votes: Tensor, plans: list[_Plan], prediction: Tensor, lead: Tensor,
                   not_pred: Tensor, wrap: tuple[int, int], small: torch.dtype,
                   max_elements: int, big: int) -> Tensor:
    b, n_classes, h, w = votes.shape
    # Map axes outermost, (image, class) innermost: every box sum below is then a difference
    # of contiguous blocks, however small the map (a 28 x 1 row map included).
    own = votes[torch.arange(b, device=votes.device), prediction]  # V_y, (b, h, w)
    own = own.permute(1, 2, 0).to(small, memory_format=torch.contiguous_format)  # (h, w, b)
    own_integral = _integral(own, *wrap)
    bounds, contenders = [], []
    for plan in plans:  # lead_c - max_R (a_y(R) + |R|): a lower bound of each class's margin
        most = _extreme(own_integral, plan, maximum=True, max_elements=max_elements)
        bound = lead - most[:, None]
        bounds.append(bound)
        contenders.append(not_pred & (bound < 0))
    union = torch.stack(contenders).any(dim=0)  # (b, C)
    n_union = int(union.sum())
    out = torch.stack([bound.masked_fill(~not_pred | cont, big).amin(dim=1)
                       for bound, cont in zip(bounds, contenders, strict=True)], dim=1)
    if n_union == 0:
        return out
    hp, wp = own_integral.shape[:2]
    if 2 * n_union > b * (n_classes - 1) and b * n_classes * hp * wp <= max_elements:
        # most classes contend: box-sum all of them, no gathers
        diff = votes.permute(2, 3, 0, 1).to(small, memory_format=torch.contiguous_format)
        integral = _integral(diff.sub_(own[..., None]), *wrap)  # of V_c - V_y, (H', W', b, C)
        for s, plan in enumerate(plans):
            exact = lead + _extreme(integral, plan, maximum=False, max_elements=max_elements)
            exact = exact.masked_fill(~contenders[s], big).amin(dim=1)
            out[:, s] = torch.minimum(out[:, s], exact)
        return out
    images, classes = union.nonzero(as_tuple=True)
    per_chunk = max(1, max_elements // (hp * wp))
    for lo in range(0, n_union, per_chunk):
        bi, ci = images[lo:lo + per_chunk], classes[lo:lo + per_chunk]
        diff = votes[bi, ci].permute(1, 2, 0).to(small, memory_format=torch.contiguous_format)
        integral = _integral(diff.sub_(own[:, :, bi]), *wrap)  # (H', W', k)
        for s, plan in enumerate(plans):
            exact = lead[bi, ci] + _extreme(integral, plan, maximum=False,
                                            max_elements=max_elements)
            exact = exact.masked_fill(~contenders[s][bi, ci], big)
            out[:, s] = out[:, s].scatter_reduce(0, bi, exact, reduce="amin")
    return out


def _integral(cells: Tensor, wrap_h: int, wrap_w: int) -> Tensor:
    """Integral image (h+wrap_h+1, w+wrap_w+1, ...) of (h, w, ...), extended circularly by
    ``wrap_h`` rows and ``wrap_w`` columns for footprints that wrap."""
    if wrap_h:
        cells = torch.cat([cells, cells[:wrap_h]], dim=0)
    if wrap_w:
        cells = torch.cat([cells, cells[:, :wrap_w]], dim=1)
    integral = cells.new_zeros((cells.shape[0] + 1, cells.shape[1] + 1) + cells.shape[2:])
    integral[1:, 1:] = cells.cumsum(dim=0, dtype=cells.dtype).cumsum(dim=1, dtype=cells.dtype)
    return integral


def _extreme(integral: Tensor, plan: _Plan, maximum: bool, max_elements: int) -> Tensor:
    """Over the footprints R of ``plan``: max of (box sum + |R|) if ``maximum``, else min of
    (box sum - |R|); (H', W', ...) integral images -> (...) int64.

    Each run of row intervals is a slice difference of the integral image (row bands), each
    run of column intervals a slice difference of those; row runs are split so that one band
    block stays below ``max_elements`` values.
    """
    wp, inner = integral.shape[1], integral[0, 0].numel()
    rows_per_block = max(1, max_elements // max(1, inner * wp))
    sign = 1 if maximum else -1
    best: Tensor | None = None
    for r0, r_len, r_count in plan.row_runs:
        for a in range(0, r_count, rows_per_block):
            s0, k = r0 + a, min(rows_per_block, r_count - a)
            bands = integral[s0 + r_len:s0 + r_len + k] - integral[s0:s0 + k]
            for c0, c_len, c_count in plan.col_runs:
                boxes = bands[:, c0 + c_len:c0 + c_len + c_count] - bands[:, c0:c0 + c_count]
                value = (boxes.amax(dim=(0, 1)) if maximum else
                         boxes.amin(dim=(0, 1))).to(torch.int64) + sign * r_len * c_len
                best = value if best is None else (
                    torch.maximum(best, value) if maximum else torch.minimum(best, value))
    assert best is not None
    return best


Run = tuple[int, int, int]  # (first start, length, count): intervals start, start+1, ...


@dataclass(frozen=True)
class _Plan:
    """The maximal footprints of one shape, as runs of intervals on each axis.

    A footprint inside another is dominated: for R ⊂ R', a_c(R') - a_y(R') - |R'| <=
    a_c(R) - a_y(R) - |R| (each extra cell adds a_c <= 1, a_y >= 0 and 1 to |R|), and
    a_y(R') + |R'| >= a_y(R) + |R|; so both the margin and its bound only need footprints
    that no other contains, i.e. the product of the maximal intervals of each axis.
    """

    row_runs: tuple[Run, ...]
    col_runs: tuple[Run, ...]
    end_rows: int  # one past the last row any interval reaches (> h where intervals wrap)
    end_cols: int


@functools.lru_cache(maxsize=1024)
def _plan(fp: Footprints) -> _Plan:
    h, w = fp.map_hw
    rows = _runs(_maximal(fp.rows, h, fp.cyclic))
    cols = _runs(_maximal(fp.cols, w, fp.cyclic))
    return _Plan(rows, cols, max(s + n + k - 1 for s, n, k in rows),
                 max(s + n + k - 1 for s, n, k in cols))


def _maximal(intervals: tuple[Interval, ...], n: int, cyclic: bool) -> list[Interval]:
    """The intervals no other one contains (of equal ones, the first)."""
    # a full cyclic interval is the same set from any start: start it at 0 (no wrapping)
    cells = [(0, length) if cyclic and length == n else (start, length)
             for start, length in intervals]

    def inside(a: Interval, b: Interval) -> bool:
        if a[1] == 0 or (cyclic and b[1] == n):
            return True
        offset = (a[0] - b[0]) % n if cyclic else a[0] - b[0]
        return offset >= 0 and offset + a[1] <= b[1]

    kept = []
    for i, a in enumerate(cells):
        if not any(inside(a, b) and (not inside(b, a) or j < i)
                   for j, b in enumerate(cells) if j != i):
            kept.append(a)
    return kept


def _runs(intervals: list[Interval]) -> tuple[Run, ...]:
    """Group intervals into runs of equal length and consecutive starts."""
    runs: list[list[int]] = []
    for start, length in sorted(set(intervals), key=lambda iv: (iv[1], iv[0])):
        if runs and runs[-1][1] == length and runs[-1][0] + runs[-1][2] == start:
            runs[-1][2] += 1
        else:
            runs.append([start, length, 1])
    return tuple((s, n, k) for s, n, k in runs)
