"""``patchbench bench``: what certification costs next to the model's own forward passes.

For each defense configuration and batch size, on synthetic images of a standard input shape
and a model with random weights (timing does not depend on training), it measures:

(a) ``forward``: the bare forward passes the defense needs: one per image for BagCert; W, H or
    H*W per image for smoothing, run on encoded ablations built beforehand, in the blocks the
    defense uses, so (a) excludes building them. Any other defense (PatchCleanser) gives them
    through its ``forward_passes(model, images, patches)`` hook, and as they depend on the
    patch shapes, (a) is timed for each number of shapes (``forward_<n>``): for PatchCleanser
    every two-mask image (k^2 (k^2 + 1) / 2 per image and mask set, no early exit), built
    beforehand, predictions only;
(b) ``certify``: the whole certification of the same images, ``defense.votes`` and
    ``certify_votes`` for both conditions (another family: ``defense.certify`` for its
    ``conditions``), for 1 and for 20 patch shapes; ``core`` is the ``certify_votes`` part
    alone (votes computed beforehand; vote maps only);
(r) ``reference``: a straightforward implementation of the same certification in the style
    of the published code (see ``reference_smoothing``, ``reference_bagcert`` and
    ``reference_patchcleanser``, the last through the defense's ``reference_certify`` hook),
    on the same model and images; every run also checks that its decisions equal
    patchbench's;
(m) peak memory of (b) with the most patch shapes: the process's resident-set high-water mark
    on a CPU (reset just before, through ``/proc/self/clear_refs``), or
    ``torch.cuda.max_memory_allocated`` on a GPU.

Every measurement is warmed up, the device synchronised before each clock read, and repeated
``repeats`` times in interleaved rounds (a, b1, core1, b20, core20, r1, r20; each round starting
one measurement later), so that a change of load on the machine hits every measurement alike;
the medians are reported, and the minima as well
(``statistic`` column): on a loaded machine the fastest run, the least disturbed one, is the
steadier estimate.

Rows are long and tidy (one number per row, ``benchmark == "bench"`` and ``metric`` naming the
number) and written atomically to ``<results_dir>/rows/bench-<id>.csv``; ``BENCH_COLUMNS``
lists the columns every row has. A defense that lacks the bench hooks (``Defense.missing``)
is not timed: it gets one row, ``metric == "unsupported"``, whose ``note`` says what it lacks.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import math
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.table import Table
from torch import Tensor, nn

from patchbench.certify import CONDITIONS, certify_votes
from patchbench.defense import Defense, VoteMapDefense, get_defense
from patchbench.defenses.bagcert import BagCert, receptive_field
from patchbench.defenses.smoothing import ABLATED_AXES, Smoothing, ablated_blocks, vote_map_hw
from patchbench.patches import PatchShape
from patchbench.running.evaluate import at_precision, for_inference, precision_dtype, synchronize
from patchbench.running.hashing import config_hash
from patchbench.running.results import atomic_write_csv, system_info
from patchbench.running.sweep import parameter_grids

BENCHMARK = "bench"
# --shape: (channels, height, width) and the default number of classes
SHAPES = {"fashion-mnist": (1, 28, 28), "cifar": (3, 32, 32), "imagenet": (3, 224, 224)}
DEFAULT_CLASSES = {"fashion-mnist": 10, "cifar": 10, "imagenet": 1000}
# The patch shapes, on a 32-pixel scale (multiplied by side // 32 on larger images): the
# first alone is the 1-shape run; the first n the n-shape run.
BASE_PATCHES = ((5, 5), (1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (7, 7), (8, 8), (9, 9),
                (10, 10), (2, 12), (12, 2), (3, 8), (8, 3), (1, 10), (10, 1), (4, 6), (6, 4),
                (5, 9), (9, 5))
# At most this much of pre-built encoded ablations for (a); beyond it the first blocks are
# reused in turn (a convolution's cost does not depend on the pixel values).
PREBUILT_BYTES = 1 << 30
STATISTICS: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "min": min}

# Every row has these columns (plus ``param_<name>`` for each defense parameter).
BENCH_COLUMNS = (
    "benchmark", "run_id", "metric", "statistic", "value", "unit", "n_patch_shapes", "defense",
    "params", "shape", "in_channels", "height", "width", "classes", "batch_size", "n_images",
    "forward_inputs_per_image", "n_parameters", "patches", "conditions", "repeats", "warmup",
    "precision", "channels_last", "compile", "device", "device_name", "threads",
    "load_average", "memory_kind", "git_commit", "torch_version", "patchbench_version",
    "timestamp", "note",
)


@dataclass
class BenchSettings:
    """What ``patchbench bench`` measures, as given on its command line."""

    shape: str = "fashion-mnist"
    classes: int | None = None  # None: 10, or 1000 for imagenet
    batch_sizes: tuple[int, ...] = (16, 64, 256)
    n_shapes: tuple[int, ...] = (1, 20)
    repeats: int = 5
    warmup: int = 1
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    reference: bool | None = None  # None: on, except for imagenet (hours of host loops)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose from {', '.join(SHAPES)}")
        precision_dtype(self.precision)
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("need repeats >= 1 and warmup >= 0")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("batch sizes must be positive")
        if not self.n_shapes or not all(1 <= n <= len(BASE_PATCHES) for n in self.n_shapes):
            raise ValueError(f"numbers of patch shapes must be in 1..{len(BASE_PATCHES)}")
        if self.classes is not None and self.classes < 2:
            raise ValueError("need at least 2 classes")

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return SHAPES[self.shape]

    @property
    def num_classes(self) -> int:
        return self.classes or DEFAULT_CLASSES[self.shape]

    @property
    def with_reference(self) -> bool:
        return self.reference if self.reference is not None else self.shape != "imagenet"


@dataclass
class Measurement:
    """Medians of one defense configuration at one batch size."""

    defense: Defense
    batch_size: int
    forward_inputs_per_image: int | None  # None: the defense has no known bare forward
    n_parameters: int
    seconds: dict[str, list[float]] = field(default_factory=dict)  # task -> timed runs
    peak_memory_bytes: int = 0
    memory_kind: str = ""
    reference_agreement: float | None = None  # fraction of images decided alike
    # model inputs per image of (a) per number of patch shapes, where (a) depends on them
    forward_inputs: dict[int, int] = field(default_factory=dict)
    unsupported: str | None = None  # "bench not supported by <defense>: ...": nothing timed

    def time(self, task: str, statistic: str = "median") -> float:
        """Seconds of ``task`` (forward, forward_<n>, certify_<n>, core_<n>, reference_<n>);
        NaN if absent."""
        if task not in self.seconds:
            return math.nan
        return STATISTICS[statistic](self.seconds[task])

    def forward_task(self, n: int) -> str:
        """The (a) that ``n`` patch shapes are compared with: ``forward_<n>`` where (a)
        depends on the shapes, else ``forward``."""
        return f"forward_{n}" if f"forward_{n}" in self.seconds else "forward"

    def ratio(self, num: str, den: str, statistic: str = "median") -> float:
        den_s = self.time(den, statistic)
        return self.time(num, statistic) / den_s if den_s > 0 else math.nan


def bench_patches(image_hw: tuple[int, int], n: int) -> list[PatchShape]:
    """The first ``n`` of ``BASE_PATCHES``, scaled to the image (side // 32, at least 1)."""
    scale = max(1, min(image_hw) // 32)
    return [PatchShape(min(h * scale, image_hw[0]), min(w * scale, image_hw[1]))
            for h, w in BASE_PATCHES[:n]]


def forward_passes(defense: Defense, model: nn.Module, images: Tensor,
                   patches: Sequence[PatchShape] | None = None
                   ) -> tuple[Callable[[], object], int] | None:
    """(a): a callable running the bare forward passes of ``defense`` on ``images``, and the
    number of model inputs per image; None for a defense whose forward passes are unknown.
    Vote maps need the same passes for every patch shape (``patches`` is not used); any other
    defense answers through its ``forward_passes(model, images, patches)`` hook (None where
    it has none or ``patches`` is None)."""
    if isinstance(defense, BagCert):
        return (lambda: model(images)), 1
    if isinstance(defense, Smoothing):
        blocks, n_blocks, kept = [], 0, 0
        for block in ablated_blocks(images, defense.mode, defense.config.ablation_size,
                                    defense.max_forward):
            n_blocks += 1
            if kept + block.numel() * block.element_size() <= PREBUILT_BYTES or not blocks:
                blocks.append(block)
                kept += block.numel() * block.element_size()
        map_h, map_w = vote_map_hw(defense.mode, (images.shape[-2], images.shape[-1]))

        def run() -> None:
            for i in range(n_blocks):
                model(blocks[i % len(blocks)])
        return run, map_h * map_w
    hook = getattr(defense, "forward_passes", None)
    if callable(hook) and patches is not None:
        return hook(model, images, patches)
    return None


def per_shape_forward(defense: Defense) -> bool:
    """True where (a) depends on the patch shapes, so that it is timed for each number of
    shapes (``forward_<n>``): every defense but the vote maps."""
    return not isinstance(defense, VoteMapDefense)


# --- references: the published style, for the speed-up and as a cross-check ------------------

@dataclass
class ReferenceResult:
    prediction: np.ndarray  # (B,), or (B, S) where it depends on the patch shape
    counts: np.ndarray | None  # (B, C) votes per class; None for a defense without votes
    certified: dict[str, np.ndarray]  # condition -> (B, S) bool


def reference_smoothing(model: nn.Module, images: Tensor, mode: str, size: int,
                        threshold: float, patches: Sequence[PatchShape]) -> ReferenceResult:
    """(De)randomized smoothing as the published code does it: a Python loop over ablation
    positions, one forward pass per position over the whole batch (the ablation built by
    zero-filled copies with slice assignment, channels last), the softmax threshold, votes
    counted on the device, then prediction and the global certificate on the host with numpy
    (stable sort, runner-up tie rule). Δ is capped at the number of ablations a patch can
    touch, as patchbench's footprints are."""
    _, _, height, width = images.shape
    map_h, map_w = vote_map_hw(mode, (height, width))
    rows_ablated, cols_ablated = ABLATED_AXES[mode]
    batch = images.permute(0, 2, 3, 1)  # colour channel last, as in the published code
    counts = None
    for i in range(map_h):
        for j in range(map_w):
            out_c1 = torch.zeros_like(batch)
            out_c2 = torch.zeros_like(batch)
            for rows in _wrapped(i, size if rows_ablated else height, height):
                for cols in _wrapped(j, size if cols_ablated else width, width):
                    out_c1[:, rows, cols] = batch[:, rows, cols]
                    out_c2[:, rows, cols] = 1.0 - batch[:, rows, cols]
            out = torch.cat((out_c1.permute(0, 3, 1, 2), out_c2.permute(0, 3, 1, 2)), 1)
            softmx = torch.nn.functional.softmax(model(out).float(), dim=1)
            votes = (softmx >= threshold).int()
            counts = votes if counts is None else counts + votes
    assert counts is not None
    counts_np = counts.cpu().numpy()
    idxsort = np.argsort(-counts_np, axis=1, kind="stable")
    valsort = -np.sort(-counts_np, axis=1, kind="stable")
    val, idx = valsort[:, 0], idxsort[:, 0]
    valsecond, idxsecond = valsort[:, 1], idxsort[:, 1]
    certified = []
    for patch in patches:
        affected = ((min(patch.height + size - 1, height) if rows_ablated else 1)
                    * (min(patch.width + size - 1, width) if cols_ablated else 1))
        gap = val - valsecond
        certified.append((gap > 2 * affected) | ((gap == 2 * affected) & (idx < idxsecond)))
    return ReferenceResult(idx, counts_np, {"global": np.stack(certified, axis=1)})


def _wrapped(start: int, band: int, n: int) -> list[slice]:
    """Slices of ``start .. start + band - 1 (mod n)``: one, or two where the band wraps."""
    if band >= n:
        return [slice(0, n)]
    if start + band <= n:
        return [slice(start, start + band)]
    return [slice(start, n), slice(0, start + band - n)]


def reference_bagcert(model: nn.Module, images: Tensor, patches: Sequence[PatchShape]
                      ) -> ReferenceResult:
    """BagCert the naive way: the vote map to the host, then for every patch shape a Python
    loop over every patch position, its touched cells from the receptive field (cell i sees
    pixels [i*stride - padding, i*stride - padding + rf - 1]), and the per-position margins of
    every class with numpy; the global condition from the largest footprint."""
    net = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    rf, stride, padding = receptive_field(net.geometry())
    votes = (model(images) > 0).cpu().numpy().astype(np.int64)  # (B, C, h, w)
    batch, n_classes, h, w = votes.shape
    counts = votes.sum(axis=(2, 3))
    pred = counts.argmax(axis=1)
    rows = np.arange(batch)
    own = counts[rows, pred]
    tiebreak = (np.arange(n_classes)[None, :] < pred[:, None]).astype(np.int64)
    rival = np.arange(n_classes)[None, :] != pred[:, None]
    height, width = images.shape[-2:]
    tight, glob = [], []
    for patch in patches:
        margin = np.full(batch, np.iinfo(np.int64).max)
        largest = 0
        for q_r in range(height - patch.height + 1):
            r0 = max(0, math.ceil((q_r - rf + 1 + padding) / stride))
            r1 = min(h - 1, (q_r + patch.height - 1 + padding) // stride)
            for q_c in range(width - patch.width + 1):
                c0 = max(0, math.ceil((q_c - rf + 1 + padding) / stride))
                c1 = min(w - 1, (q_c + patch.width - 1 + padding) // stride)
                cells = max(0, r1 - r0 + 1) * max(0, c1 - c0 + 1)
                largest = max(largest, cells)
                inside = votes[:, :, r0:r1 + 1, c0:c1 + 1].sum(axis=(2, 3))  # (B, C)
                kept_y = own - inside[rows, pred]
                per_class = kept_y[:, None] - (counts - inside) - cells - tiebreak
                margin = np.minimum(margin, np.where(rival, per_class, margin[:, None]).min(1))
        tight.append(margin >= 0)
        lead = np.where(rival, own[:, None] - counts - tiebreak, np.iinfo(np.int64).max)
        glob.append(lead.min(axis=1) - 2 * largest >= 0)
    return ReferenceResult(pred, counts, {"tight": np.stack(tight, axis=1),
                                          "global": np.stack(glob, axis=1)})


def reference_patchcleanser(model: nn.Module, images: Tensor, patches: Sequence[PatchShape],
                            masks_per_axis: int, mask_value: float) -> ReferenceResult:
    """PatchCleanser as the published code (``pc_certification.py``, ``utils/defense.py``)
    does it: per patch shape the mask list of ``gen_mask_set`` (boolean keep-masks,
    ``range(0, n - m + 1, s)`` plus the flush start), every two-mask prediction (i <= j) as one
    forward pass over the whole batch with ``torch.where``, stored in a (B, M, M) numpy map and
    made symmetric; then a Python loop over images: ``double_masking_precomputed`` (unanimous
    diagonal; else each disagreeing mask in order wins if its whole row agrees; else the
    majority) and ``certify_precomputed`` (every two-mask prediction equals the prediction;
    the published one compares with the label instead). Where the published code leaves ties
    to numpy's unstable sort, the majority goes to the smallest class index, as patchbench's
    rule; argmax ties go to the smallest index."""
    batch, _, height, width = images.shape
    fill = torch.tensor(mask_value, dtype=images.dtype, device=images.device)
    predictions, certified = [], []
    for patch in patches:
        mask_list = []
        rows = _published_starts(height, patch.height, masks_per_axis)
        cols = _published_starts(width, patch.width, masks_per_axis)
        for x in rows[0]:
            for y in cols[0]:
                mask = torch.ones([1, 1, height, width], dtype=torch.bool, device=images.device)
                mask[..., x:x + rows[1], y:y + cols[1]] = False
                mask_list.append(mask)
        num_mask = len(mask_list)
        prediction_map = np.zeros([batch, num_mask, num_mask], dtype=int)
        for i, mask in enumerate(mask_list):
            for j in range(i, num_mask):
                kept = torch.logical_and(mask, mask_list[j])
                masked_output = model(torch.where(kept, images, fill))
                prediction_map[:, i, j] = masked_output.float().argmax(dim=1).cpu().numpy()
        shape_pred, shape_cert = [], []
        for one in prediction_map:
            one = one + one.T - np.diag(np.diag(one))  # symmetric, from the upper triangle
            label = _double_masking_precomputed(one)
            shape_pred.append(label)
            shape_cert.append(bool(np.all(one == label)))
        predictions.append(shape_pred)
        certified.append(shape_cert)
    return ReferenceResult(np.array(predictions, dtype=np.int64).T.reshape(batch, len(patches)),
                           None, {"masking": np.array(certified, dtype=bool).T.reshape(
                               batch, len(patches))})


def _published_starts(n: int, patch: int, k: int) -> tuple[list[int], int]:
    """``gen_mask_set`` along one axis: the mask starts and the mask side."""
    stride = int(np.ceil((n - patch + 1) / k))
    size = patch + stride - 1
    starts = list(range(0, n - size + 1, stride))
    if (n - size) % stride != 0:
        starts.append(n - size)
    return starts, size


def _double_masking_precomputed(prediction_map: np.ndarray) -> int:
    """The published inference on one image's symmetric (M, M) two-mask prediction map."""
    pred_one_mask = np.diag(prediction_map)
    pred, cnt = np.unique(pred_one_mask, return_counts=True)
    if len(pred) == 1:  # Case I: unanimous first round
        return int(pred[0])
    sorted_idx = np.argsort(-cnt, kind="stable")  # most votes first, ties: smallest class
    majority_pred = pred[sorted_idx][0]
    disagreer_pred = pred[sorted_idx][1:]
    tmp = np.zeros_like(pred_one_mask, dtype=bool)
    for dis in disagreer_pred:
        tmp = np.logical_or(tmp, pred_one_mask == dis)
    for i in np.where(tmp)[0]:
        dis = pred_one_mask[i]
        if np.all(prediction_map[i] == dis):
            return int(dis)  # Case II: a disagreer whose every second-round mask agrees
    return int(majority_pred)  # Case III


def reference_certify(defense: Defense, model: nn.Module, images: Tensor,
                      patches: Sequence[PatchShape]) -> ReferenceResult | None:
    """The reference implementation: the built-in one of a vote-map defense, else the
    defense's own ``reference_certify(model, images, patches)`` hook; None where neither."""
    if isinstance(defense, Smoothing):
        c = defense.config
        return reference_smoothing(model, images, defense.mode, c.ablation_size, c.threshold,
                                   patches)
    if isinstance(defense, BagCert):
        return reference_bagcert(model, images, patches)
    hook = getattr(defense, "reference_certify", None)
    return hook(model, images, patches) if callable(hook) else None


def agreement(defense: Defense, model: nn.Module, images: Tensor,
              patches: Sequence[PatchShape], reference: ReferenceResult) -> float:
    """Fraction of images on which patchbench and the reference agree: same prediction (for
    every patch shape where it depends on the shape), same votes per class where both have
    them, and the same certified decision for every condition the reference has."""
    image_hw = (images.shape[-2], images.shape[-1])
    if isinstance(defense, VoteMapDefense):
        cert = certify_votes(defense.votes(model, images),
                             [defense.footprints(p, image_hw) for p in patches], CONDITIONS)
    else:
        cert = defense.certify(model, images, patches, list(reference.certified))
    shape = (len(images), len(patches))
    mine = cert.prediction.cpu().numpy()
    theirs = reference.prediction
    same = (np.broadcast_to(mine if mine.ndim == 2 else mine[:, None], shape)
            == np.broadcast_to(theirs if theirs.ndim == 2 else theirs[:, None], shape)
            ).all(axis=1)
    if cert.counts is not None and reference.counts is not None:
        same &= (cert.counts.cpu().numpy() == reference.counts).all(axis=1)
    for cond, flags in reference.certified.items():
        same &= (cert.certified[cond].cpu().numpy() == flags).all(axis=1)
    return float(same.mean())


# --- measuring ----------------------------------------------------------------------------

def _reset_peak(device: torch.device) -> str:
    """Start a fresh peak-memory window; returns what the peak will measure."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_memory_allocated"
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return "rss_high_water"
    except OSError:
        return "rss_high_water_since_start"  # no reset here: ru_maxrss covers the whole run


def _read_peak(device: torch.device, kind: str) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if kind == "rss_high_water":
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def measure(defense: Defense, settings: BenchSettings, batch_size: int,
            device: torch.device, log: Callable[[str], None] = lambda _: None) -> Measurement:
    """Time (a), (b), the core and the reference for one configuration and batch size; for a
    defense that lacks the bench hooks, nothing (``Measurement.unsupported`` says why)."""
    torch.manual_seed(settings.seed)
    in_shape, dtype = settings.in_shape, precision_dtype(settings.precision)
    model = defense.build_model(in_shape, settings.num_classes).eval().to(device)
    n_parameters = defense.num_parameters(model)
    unsupported = defense.unsupported(BENCHMARK)
    if unsupported is not None:
        log(unsupported)
        return Measurement(defense, batch_size, None, n_parameters, unsupported=unsupported)
    # the reference runs the model as the published code does; (a) and (b) as `run` does
    plain = at_precision(model, settings.precision)
    model = for_inference(model, settings.precision)
    gen = torch.Generator().manual_seed(settings.seed)
    images = torch.rand(batch_size, *in_shape, generator=gen).to(device, dtype)
    if settings.channels_last:
        plain = plain.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if settings.compile else model
    image_hw = in_shape[1:]
    patches = {n: bench_patches(image_hw, n) for n in settings.n_shapes}
    vote_map = isinstance(defense, VoteMapDefense)
    footprints = ({n: [defense.footprints(p, image_hw) for p in patches[n]] for n in patches}
                  if vote_map else {})
    most = max(settings.n_shapes)
    result = Measurement(defense, batch_size, None, n_parameters)

    def certify(n: int) -> Callable[[], object]:
        if not vote_map:  # it certifies on its own, for its own conditions
            return lambda: defense.certify(net, images, patches[n], defense.conditions)
        return lambda: certify_votes(defense.votes(net, images), footprints[n], CONDITIONS)

    with torch.inference_mode():
        # memory first, before (a)'s pre-built inputs exist: warm once, then the peak of one run
        certify(most)()
        synchronize(device)
        result.memory_kind = _reset_peak(device)
        certify(most)()
        synchronize(device)
        result.peak_memory_bytes = _read_peak(device, result.memory_kind)
        tasks: dict[str, Callable[[], object]] = {}
        if per_shape_forward(defense):
            for n in settings.n_shapes:
                bare = forward_passes(defense, net, images, patches[n])
                if bare is not None:
                    tasks[f"forward_{n}"], result.forward_inputs[n] = bare
            result.forward_inputs_per_image = result.forward_inputs.get(min(settings.n_shapes))
        else:
            bare = forward_passes(defense, net, images)
            if bare is not None:
                tasks["forward"], result.forward_inputs_per_image = bare
        votes = defense.votes(net, images) if vote_map else None
        for n in settings.n_shapes:
            tasks[f"certify_{n}"] = certify(n)
            if votes is not None:
                tasks[f"core_{n}"] = (lambda n=n: certify_votes(votes, footprints[n],
                                                                CONDITIONS))
        if settings.with_reference:
            reference = reference_certify(defense, plain, images, patches[most])
            if reference is not None:
                result.reference_agreement = agreement(defense, net, images, patches[most],
                                                       reference)
                for n in settings.n_shapes:
                    tasks[f"reference_{n}"] = (
                        lambda n=n: reference_certify(defense, plain, images, patches[n]))
        for _ in range(settings.warmup):
            for task in tasks.values():
                task()
        seconds: dict[str, list[float]] = {name: [] for name in tasks}
        names = list(tasks)
        for r in range(settings.repeats):
            log(f"{defense.name} batch {batch_size}: round {r + 1}/{settings.repeats}")
            # each round starts one task later, so that no measurement always runs first
            # (or always right after the long host loops of the reference)
            for name in names[r % len(names):] + names[:r % len(names)]:
                task = tasks[name]
                synchronize(device)
                t0 = time.perf_counter()
                task()
                synchronize(device)
                seconds[name].append(time.perf_counter() - t0)
    result.seconds = seconds
    return result


def run_bench(defenses: Sequence[Defense], settings: BenchSettings, device: torch.device,
              log: Callable[[str], None] = lambda _: None) -> tuple[list[Measurement],
                                                                    pd.DataFrame]:
    """Measure every defense at every batch size; the measurements and their tidy rows."""
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()[0]
    measurements = [measure(defense, settings, batch_size, device, log)
                    for defense in defenses for batch_size in settings.batch_sizes]
    load = (load_before + os.getloadavg()[0]) / 2
    return measurements, bench_rows(measurements, settings, device, started, load)


def bench_rows(measurements: Sequence[Measurement], settings: BenchSettings,
               device: torch.device, started: dt.datetime, load: float) -> pd.DataFrame:
    """Long rows: one number each, with the configuration and provenance on every row."""
    info = system_info(device)
    identity = {"settings": asdict(settings), "device": str(device),
                "defenses": [[m.defense.name, m.defense.params()] for m in measurements],
                "started": started.isoformat()}
    run_id = config_hash(identity)
    c, h, w = settings.in_shape
    one, most = min(settings.n_shapes), max(settings.n_shapes)
    records = []
    for m in measurements:
        params = m.defense.params()
        common = {
            "benchmark": BENCHMARK, "run_id": run_id, "defense": m.defense.name,
            "params": json.dumps(params, sort_keys=True), "shape": settings.shape,
            "in_channels": c, "height": h, "width": w, "classes": settings.num_classes,
            "batch_size": m.batch_size, "n_images": m.batch_size,
            "forward_inputs_per_image": m.forward_inputs_per_image or 0,
            "n_parameters": m.n_parameters, "conditions": ",".join(m.defense.conditions),
            "repeats": settings.repeats, "warmup": settings.warmup,
            "precision": settings.precision, "channels_last": settings.channels_last,
            "compile": settings.compile, "device": info["device"],
            "device_name": info["device_name"], "threads": torch.get_num_threads(),
            "load_average": round(load, 2), "memory_kind": m.memory_kind,
            "git_commit": info["git_commit"], "torch_version": info["torch_version"],
            "patchbench_version": info["patchbench_version"],
            "timestamp": started.isoformat(timespec="seconds"), "note": "",
            **{f"param_{k}": v for k, v in params.items()}}
        if m.unsupported is not None:  # one row that says so, instead of none
            records.append({**common, "metric": "unsupported", "statistic": "",
                            "value": math.nan, "unit": "", "n_patch_shapes": 0, "patches": "",
                            "note": m.unsupported})
            continue

        def add(metric: str, value: float | None, unit: str, n_shapes: int = 0,
                statistic: str = "", common: dict = common, m: Measurement = m) -> None:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return
            patches = bench_patches((h, w), n_shapes) if n_shapes else []
            per_shape = ({"forward_inputs_per_image": m.forward_inputs[n_shapes]}
                         if n_shapes in m.forward_inputs else {})
            records.append({**common, **per_shape, "metric": metric, "statistic": statistic,
                            "value": float(value), "unit": unit, "n_patch_shapes": n_shapes,
                            "patches": ",".join(str(p) for p in patches)})

        for stat in STATISTICS:
            add("forward_seconds", m.time("forward", stat), "s", 0, stat)
            for n in settings.n_shapes:
                add("forward_seconds", m.time(f"forward_{n}", stat), "s", n, stat)
                add("certify_seconds", m.time(f"certify_{n}", stat), "s", n, stat)
                add("core_seconds", m.time(f"core_{n}", stat), "s", n, stat)
                add("reference_seconds", m.time(f"reference_{n}", stat), "s", n, stat)
                add("certify_over_forward", m.ratio(f"certify_{n}", m.forward_task(n), stat),
                    "ratio", n, stat)
                add("over_one_shape", m.ratio(f"certify_{n}", f"certify_{one}", stat),
                    "ratio", n, stat)
                add("speedup_over_reference", m.ratio(f"reference_{n}", f"certify_{n}", stat),
                    "ratio", n, stat)
            add("images_per_second", m.batch_size / m.time(f"certify_{most}", stat),
                "images/s", most, stat)
        add("peak_memory_bytes", m.peak_memory_bytes, "bytes", most)
        add("reference_agreement", m.reference_agreement, "fraction", most)
    frame = pd.DataFrame.from_records(records)
    params = sorted(c for c in frame.columns if c not in BENCH_COLUMNS)
    return frame.reindex(columns=[*BENCH_COLUMNS, *params])


def recorded_run(results_dir: Path, defenses: Sequence[Defense], settings: BenchSettings,
                 device: torch.device) -> str | None:
    """The id of a benchmark run in ``results_dir`` that timed exactly these configurations
    with these settings on this kind of device (a study's bench step is done then), or None.
    Timings are of one machine: a run elsewhere of the same kind (cpu, cuda) counts."""
    wanted_defenses = sorted(json.dumps([d.name, d.params()], sort_keys=True)
                             for d in defenses)
    for path in sorted((Path(results_dir) / "rows").glob("bench-*.csv")):
        run = pd.read_csv(path)
        first = run.iloc[0]
        found = sorted({json.dumps([name, json.loads(params)], sort_keys=True)
                        for name, params in zip(run["defense"], run["params"], strict=True)})
        same = (found == wanted_defenses and first["shape"] == settings.shape
                and int(first["classes"]) == settings.num_classes
                and set(run["batch_size"]) == set(settings.batch_sizes)
                and set(run["n_patch_shapes"]) - {0} == set(settings.n_shapes)
                and int(first["repeats"]) == settings.repeats
                and int(first["warmup"]) == settings.warmup
                and first["precision"] == settings.precision
                and bool(first["channels_last"]) == settings.channels_last
                and bool(first["compile"]) == settings.compile
                and (run["metric"] == "reference_seconds").any() == settings.with_reference
                and str(first["device"]).split(":")[0] == device.type)
        if same:
            return str(first["run_id"])
    return None


def write_bench_rows(results_dir: Path, rows: pd.DataFrame) -> Path:
    """``<results_dir>/rows/bench-<run_id>.csv``, written atomically; returns its path."""
    path = Path(results_dir) / "rows" / f"bench-{rows['run_id'].iloc[0]}.csv"
    atomic_write_csv(rows, path)
    return path


# --- command line helpers -------------------------------------------------------------------

def defense_configurations(names: Sequence[str], params: dict[str, list[str]]
                           ) -> list[Defense]:
    """Each named defense with its share of ``params`` (name -> values), multiplied out
    exactly as ``run`` does (``sweep.parameter_grids``); a parameter no defense has and a bad
    value are ValueErrors."""
    classes = {name: get_defense(name) for name in dict.fromkeys(names)}
    grids = parameter_grids(classes, params)
    return [cls.from_params(given) for name, cls in classes.items() for given in grids[name]]


def label(defense: Defense) -> str:
    """The defense and the parameters that differ from its defaults."""
    defaults = type(defense)().params()
    changed = [f"{k}={v}" for k, v in defense.params().items() if defaults.get(k) != v]
    return defense.name + (f" ({', '.join(changed)})" if changed else "")


def bench_table(measurements: Sequence[Measurement], settings: BenchSettings,
                device: torch.device) -> Table:
    """(b)/(a), (many shapes)/(1 shape) and the speed-up over the reference, side by side."""
    one, most = min(settings.n_shapes), max(settings.n_shapes)
    c, h, w = settings.in_shape
    table = Table(
        "defense", "batch", "(a) forward", f"(b) {one} shape", f"(b) {most} shapes",
        f"(b{one})/(a)", f"(b{most})/(a)", f"{most}/{one} shapes", f"reference ({most})",
        "speed-up", "peak memory", "agree",
        title=(f"patchbench bench: {settings.shape} {c}x{h}x{w}, {settings.num_classes} "
               f"classes, {device}, {settings.precision}"
               f"{', channels-last' if settings.channels_last else ''}"
               f"{', compiled' if settings.compile else ''}; median of {settings.repeats}"),
        caption="median seconds per batch (wall clock); ratios: of the medians (of the "
                f"fastest runs); (a) as 'x / y': for {one} / {most} shapes, where the forward "
                "passes depend on the shapes")

    def ratio(m: Measurement, num: str, den: str) -> str:
        median = m.ratio(num, den)
        return "-" if math.isnan(median) else f"{median:.2f} ({m.ratio(num, den, 'min'):.2f})"

    def seconds(m: Measurement, task: str) -> str:
        return "-" if math.isnan(m.time(task)) else f"{m.time(task):.3f}"

    for m in measurements:
        if m.unsupported is not None:
            table.add_row(label(m.defense), str(m.batch_size), m.unsupported)
            continue
        agree = "-" if m.reference_agreement is None else f"{m.reference_agreement:.0%}"
        forward = seconds(m, "forward")
        if m.forward_task(one) != "forward":  # (a) for each number of shapes
            forward = f"{seconds(m, m.forward_task(one))} / {seconds(m, m.forward_task(most))}"
        table.add_row(
            label(m.defense), str(m.batch_size), forward,
            seconds(m, f"certify_{one}"), seconds(m, f"certify_{most}"),
            ratio(m, f"certify_{one}", m.forward_task(one)),
            ratio(m, f"certify_{most}", m.forward_task(most)),
            ratio(m, f"certify_{most}", f"certify_{one}"), seconds(m, f"reference_{most}"),
            ratio(m, f"reference_{most}", f"certify_{most}"),
            f"{m.peak_memory_bytes / 2**30:.2f} GiB", agree)
    return table
