"""Footprints: which cells of a vote map one patch can touch.

Every defense here maps a patch to an axis-aligned rectangle of cells, and the set of patch
positions is a product of row and column positions, so the footprint set of a patch shape is
the product of per-axis *intervals*. An interval is ``(start, length)`` in cells.

* clipped maps (BagCert): cell ``i`` covers pixels ``[i*stride - padding,
  i*stride - padding + rf - 1]``; the interval is every cell that meets the patch, clipped to
  the map.
* cyclic maps (derandomized smoothing): ablation ``j`` keeps pixels ``j .. j+band-1 (mod n)``;
  the interval starts at ``q - band + 1 (mod n)`` and holds ``min(len + band - 1, n)`` cells.

Only patch positions fully inside the image count, and duplicate intervals are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

Interval = tuple[int, int]


@dataclass(frozen=True)
class Footprints:
    """All distinct footprints of one patch shape on an ``h x w`` vote map.

    The footprint set is ``{rows[i] x cols[j]}``; on a cyclic map intervals wrap around.
    """

    map_hw: tuple[int, int]
    rows: tuple[Interval, ...]
    cols: tuple[Interval, ...]
    cyclic: bool

    def __post_init__(self) -> None:
        # hashable plain values only: footprints are cache keys of the core (a list, or a
        # numpy integer, would fail there, far from the defense that built it)
        if not (isinstance(self.map_hw, tuple) and len(self.map_hw) == 2
                and all(_is_int(n) and n > 0 for n in self.map_hw)):
            raise TypeError(f"Footprints map_hw must be a tuple of two positive ints, got "
                            f"{self.map_hw!r}")
        for axis, intervals in (("rows", self.rows), ("cols", self.cols)):
            if not (isinstance(intervals, tuple) and all(
                    isinstance(i, tuple) and len(i) == 2 and all(map(_is_int, i))
                    for i in intervals)):
                raise TypeError(f"Footprints {axis} must be a tuple of (start, length) tuples "
                                f"of ints, got {type(intervals).__name__} {intervals!r}"[:200])
        if not isinstance(self.cyclic, bool):
            raise TypeError(f"Footprints cyclic must be a bool, got {self.cyclic!r}")
        for axis, intervals, size in (("row", self.rows, self.map_hw[0]),
                                      ("column", self.cols, self.map_hw[1])):
            if not intervals:
                raise ValueError(f"footprints need at least one {axis} interval")
            for start, length in intervals:
                if length < 0 or length > size or start < 0 or start >= size:
                    raise ValueError(f"{axis} interval {(start, length)} outside a map of {size}")
                if not self.cyclic and start + length > size:
                    raise ValueError(f"{axis} interval {(start, length)} leaves a clipped map")

    @property
    def max_size(self) -> int:
        """Largest number of cells in one footprint (the Delta of the global condition)."""
        return max(n for _, n in self.rows) * max(n for _, n in self.cols)

    def cells(self) -> list[frozenset[tuple[int, int]]]:
        """Explicit cell sets, one per footprint; slow, for tests and reports."""
        h, w = self.map_hw
        out = []
        for r0, rn in self.rows:
            for c0, cn in self.cols:
                out.append(frozenset(((r0 + i) % h, (c0 + j) % w)
                                     for i in range(rn) for j in range(cn)))
        return out


def clipped_intervals(n_pixels: int, patch_len: int, rf: int, stride: int, padding: int,
                      n_cells: int) -> tuple[Interval, ...]:
    """Cell intervals met by a patch of ``patch_len`` pixels on one axis of a clipped map."""
    _check_len(n_pixels, patch_len)
    seen: dict[Interval, None] = {}
    for q in range(n_pixels - patch_len + 1):
        first = max(0, -((padding + q - rf + 1) // -stride))  # ceil((q - rf + 1 + p) / t)
        last = min(n_cells - 1, (q + patch_len - 1 + padding) // stride)
        interval = (min(first, n_cells - 1), max(0, last - first + 1))
        seen[interval] = None
    return tuple(seen)


def cyclic_intervals(n_pixels: int, patch_len: int, band: int) -> tuple[Interval, ...]:
    """Ablation intervals met by a patch on one axis of a cyclic map (one cell per pixel)."""
    _check_len(n_pixels, patch_len)
    length = min(patch_len + band - 1, n_pixels)
    if length == n_pixels:
        return ((0, n_pixels),)
    starts = dict.fromkeys((q - band + 1) % n_pixels for q in range(n_pixels - patch_len + 1))
    return tuple((start, length) for start in starts)


def _check_len(n_pixels: int, patch_len: int) -> None:
    if not 1 <= patch_len <= n_pixels:
        raise ValueError(f"a patch side of {patch_len} does not fit in {n_pixels} pixels")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
