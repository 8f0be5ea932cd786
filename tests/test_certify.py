"""The certification core against brute force, hand-worked ties, and global => tight."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchbench.certify import certify_votes
from patchbench.footprints import Footprints
from tests.bruteforce import brute_force_certified


@st.composite
def vote_problems(draw):
    """A small vote map and a footprint set (clipped or cyclic), both small enough to enumerate."""
    n_classes = draw(st.integers(2, 3))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    cyclic = draw(st.booleans())
    one_hot = draw(st.booleans())
    # biased densities and ties: few distinct patterns make exact ties common
    style = draw(st.sampled_from(["random", "one-hot", "tied", "sparse"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if style == "one-hot":
        votes = np.eye(n_classes, dtype=np.int64)[rng.integers(0, n_classes, (h, w))]
        votes = votes.transpose(2, 0, 1)
    elif style == "tied":
        base = rng.integers(0, 2, (1, h, w))
        votes = np.repeat(base, n_classes, axis=0)
        flip = rng.random((n_classes, h, w)) < 0.15
        votes = np.where(flip, 1 - votes, votes)
    else:
        p = 0.15 if style == "sparse" else rng.random()
        votes = (rng.random((n_classes, h, w)) < p).astype(np.int64)

    def intervals(size: int) -> tuple[tuple[int, int], ...]:
        max_len = min(size, 2)
        length = draw(st.integers(0 if not cyclic else 1, max_len))
        if cyclic:
            starts = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=3, unique=True))
        else:
            starts = draw(st.lists(st.integers(0, size - max(length, 1)), min_size=1,
                                   max_size=3, unique=True))
        lengths = [length] + [draw(st.integers(0 if not cyclic else 1, max_len))
                              for _ in starts[1:]]
        return tuple((s, n) for s, n in zip(starts, lengths, strict=True)
                     if cyclic or s + n <= size)

    rows, cols = intervals(h), intervals(w)
    if not rows or not cols:
        rows, cols = ((0, 1),), ((0, 1),)
    fp = Footprints((h, w), rows, cols, cyclic)
    return votes, fp, one_hot


@pytest.mark.slow  # thousands of maps; the fast subset checks a hundred below
@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vote_problems())
def test_tight_equals_brute_force_and_global_implies_tight(problem):
    check_against_brute_force(problem)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vote_problems())
def test_tight_equals_brute_force_on_a_hundred_maps(problem):
    check_against_brute_force(problem)


def check_against_brute_force(problem) -> None:
    votes, fp, one_hot = problem
    cert = certify_votes(torch.from_numpy(votes)[None], [fp])
    tight = bool(cert.certified["tight"][0, 0])
    glob = bool(cert.certified["global"][0, 0])
    assert cert.prediction.item() == int(np.argmax(votes.sum(axis=(1, 2))))
    # the tight condition is exact: the attacker's best move is to vote for one rival only
    assert tight == brute_force_certified(votes, fp.cells(), one_hot=one_hot)
    assert (not glob) or tight


def test_hand_worked_tie_rules():
    # 2 classes, a 1x4 map; class 0 has 3 votes, class 1 has 1: n_y - n_c = 2.
    votes = torch.tensor([[[1, 1, 1, 0]], [[0, 0, 0, 1]]])
    one_cell = Footprints((1, 4), ((0, 1),), ((0, 1), (1, 1), (2, 1), (3, 1)), cyclic=False)
    cert = certify_votes(votes[None], [one_cell])
    assert cert.prediction.tolist() == [0]
    # worst cell holds a class-0 vote: 0 drops to 2, 1 rises to 2; tie goes to class 0 -> safe
    assert cert.margin["tight"].tolist() == [[0]]
    # global: 2 >= 2 * 1 with y=0 < c=1 -> certified at exactly the tie
    assert cert.margin["global"].tolist() == [[0]]
    # mirror: class 1 predicted with the same lead; a tie would now go to class 0 -> not safe
    mirrored = certify_votes(votes.flip(0)[None], [one_cell])
    assert mirrored.prediction.tolist() == [1]
    assert mirrored.margin["tight"].tolist() == [[-1]]
    assert mirrored.margin["global"].tolist() == [[-1]]


def test_tight_beats_global_when_footprint_is_empty_of_votes():
    # class 0 votes only at the left, the footprint at the right: tight certifies, global not
    votes = torch.zeros(1, 2, 1, 6, dtype=torch.int64)
    votes[0, 0, 0, :3] = 1
    fp = Footprints((1, 6), ((0, 1),), ((3, 2), (4, 2)), cyclic=False)
    cert = certify_votes(votes, [fp])
    assert cert.certified["tight"].tolist() == [[True]]  # 3 - 0 - 2 >= 0
    assert cert.certified["global"].tolist() == [[False]]  # 3 < 2 * 2


def test_cyclic_footprint_wraps():
    votes = torch.zeros(1, 2, 1, 5, dtype=torch.int64)
    votes[0, 0, 0, [0, 4]] = 1  # the wrapped window (4, 0) holds both class-0 votes
    wrapped = Footprints((1, 5), ((0, 1),), ((4, 2),), cyclic=True)
    inside = Footprints((1, 5), ((0, 1),), ((1, 2),), cyclic=True)
    cert = certify_votes(votes, [wrapped, inside])
    assert cert.margin["tight"].tolist() == [[2 - 2 - 2 - 0, 2 - 0 - 2 - 0]]


def test_chunking_matches_unchunked():
    gen = torch.Generator().manual_seed(0)
    votes = torch.rand(7, 5, 9, 8, generator=gen) < 0.3
    fps = [Footprints((9, 8), tuple((r, 3) for r in range(7)), tuple((c, 2) for c in range(7)),
                      cyclic=False),
           Footprints((9, 8), tuple((r, 4) for r in range(9)), tuple((c, 5) for c in range(8)),
                      cyclic=True)]
    whole = certify_votes(votes, fps)
    tiny = certify_votes(votes, fps, max_elements=50)
    for cond in ("tight", "global"):
        assert torch.equal(whole.margin[cond], tiny.margin[cond])


def test_rejects_unknown_condition_and_mismatched_map():
    votes = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    fp = Footprints((3, 3), ((0, 1),), ((0, 1),), cyclic=False)
    with pytest.raises(ValueError, match="unknown condition"):
        certify_votes(votes, [fp], conditions=["loose"])
    with pytest.raises(ValueError, match="footprints for a"):
        certify_votes(torch.zeros(1, 2, 4, 4, dtype=torch.bool), [fp])


MEMORY_PROBE = """
import resource, torch
from patchbench.certify import certify_votes
from patchbench.footprints import Footprints, clipped_intervals
gen = torch.Generator().manual_seed(0)
votes = torch.rand(64, 1000, 26, 26, generator=gen) < 0.01
votes[torch.arange(64), torch.randint(0, 1000, (64,), generator=gen)] |= (
    torch.rand(64, 26, 26, generator=gen) < 0.5)
shapes = [(1 + s % 10, 1 + (7 * s) % 12) for s in range(30)]
fps = [Footprints((26, 26), clipped_intervals(32, h, 7, 1, 0, 26),
                  clipped_intervals(32, w, 7, 1, 0, 26), cyclic=False) for h, w in shapes]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cert = certify_votes(votes, fps)
assert cert.margin["tight"].shape == (64, 30)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow  # ImageNet-size maps
def test_memory_stays_bounded_for_1000_classes():
    """1000 classes, a 26x26 map, batch 64, 30 shapes: the votes alone are 43 MB as bool."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True,
                         timeout=600, check=True)
    assert int(out.stdout.strip()) < 1536  # MiB above the votes themselves
