"""Certify a whole split once for every patch shape and condition, and time it honestly."""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn
from torch.fx.experimental import optimization as fx_optimization

from patchbench.certify import Certificate, certify_votes
from patchbench.defense import Defense, VoteMapDefense
from patchbench.patches import PatchShape, check_fits
from patchbench.running import per_image
from patchbench.running.data import ImageData, batches
from patchbench.running.per_image import batch_columns
from patchbench.running.progress import progress_bar


@dataclass
class Evaluation:
    """Per-image outcomes plus the timings of one certification pass."""

    per_image: pd.DataFrame  # see patchbench.running.per_image
    forward_seconds: float  # a vote-map defense's vote computation (NaN for other families,
    #                         whose forward passes are interleaved with certification)
    certify_seconds: float  # forward passes plus the certification core


# --precision: the dtype votes are computed in
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str) -> torch.dtype:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; choose from "
                         f"{', '.join(PRECISIONS)}") from None


def for_inference(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """The model as certification runs it: an eval-mode copy with every BatchNorm folded into
    the convolution before it, in channels-last layout, with its floating-point parameters and
    buffers at ``precision``; the caller's model is left as it was.

    The same function up to float rounding (the folded weights are rounded once), and on a
    CPU 1.3-2.5x faster for the small convolutional networks here, most of all for the many
    small ablated inputs of smoothing. A model that torch.fx cannot trace (data-dependent
    control flow in a plugin) runs unfolded.
    """
    model = copy.deepcopy(model).eval()
    with contextlib.suppress(Exception):  # tracing arbitrary modules can fail in many ways
        model = fx_optimization.fuse(model)
    return model.to(precision_dtype(precision)).to(memory_format=torch.channels_last)


def at_precision(model: nn.Module, precision: str) -> nn.Module:
    """The model with floating-point parameters and buffers in ``precision``: itself for fp32,
    else a cast copy (so the caller's model is left as it was). Feed it images of that dtype;
    every layer, BatchNorm included, then runs at that precision."""
    dtype = precision_dtype(precision)
    if dtype == torch.float32:
        return model
    return copy.deepcopy(model).to(dtype)


def loader_options(device: torch.device) -> dict[str, object]:
    """How ``batches`` feeds ``device``: on a GPU, pinned batches (asynchronous copies) and
    worker processes for file-backed data; on a CPU, the plain in-process loop."""
    if device.type != "cuda":
        return {}
    return {"pin_memory": True, "num_workers": min(8, os.cpu_count() or 1)}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that clocks measure finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def certify_split(defense: Defense, model: nn.Module, data: ImageData,
                  patches: Sequence[PatchShape], conditions: Sequence[str],
                  batch_size: int = 256, device: torch.device | str = "cpu",
                  show_progress: bool = True, precision: str = "fp32") -> Evaluation:
    """Votes once per image, then every shape and condition from the same vote map.

    The votes are computed by ``for_inference(model, precision)`` (BatchNorm folded, channels
    last, cast to fp32, bf16 or fp16), on images cast to ``precision``.
    """
    device = torch.device(device)
    dtype = precision_dtype(precision)
    check_fits(list(patches), data.in_shape[1:])
    footprints = ([defense.footprints(p, data.in_shape[1:]) for p in patches]
                  if isinstance(defense, VoteMapDefense) else [])
    model = for_inference(model.to(device), precision)
    frames, forward_s, core_s, offset = [], 0.0, 0.0, 0
    with progress_bar(show_progress) as bar, torch.no_grad():
        task = bar.add_task(f"certify {defense.name}", total=len(data), status="")
        for images, labels in batches(data, batch_size, **loader_options(device)):
            images = images.to(device, dtype, non_blocking=True)
            synchronize(device)
            t0 = time.perf_counter()
            if isinstance(defense, VoteMapDefense):  # time the forward passes apart
                votes = defense.votes(model, images)
                synchronize(device)
                t1 = time.perf_counter()
                check_votes(votes, len(labels), data.num_classes, defense.name)
                cert = certify_votes(votes, footprints, conditions)
            else:  # its forward passes and certificate are one computation
                t1 = t0
                cert = defense.certify(model, images, patches, conditions)
                check_certificate(cert, len(labels), conditions, len(patches), defense.name)
            synchronize(device)
            forward_s += t1 - t0
            core_s += time.perf_counter() - t1
            frames.append(pd.DataFrame(batch_columns(offset, labels, cert, patches)))
            offset += len(labels)
            bar.update(task, advance=len(labels))
    table = pd.concat(frames, ignore_index=True)
    timed_apart = isinstance(defense, VoteMapDefense)
    return Evaluation(table, forward_s if timed_apart else float("nan"), forward_s + core_s)


def check_votes(votes: Tensor, n_images: int, n_classes: int, name: str) -> None:
    """A plugin's malformed vote map must fail loudly, not be certified as something else
    (a float map would be truncated to 0/1, extra classes would skew the argmax)."""
    if not (isinstance(votes, Tensor) and votes.dtype == torch.bool and votes.dim() == 4
            and tuple(votes.shape[:2]) == (n_images, n_classes)):
        got = (f"{votes.dtype} {tuple(votes.shape)}" if isinstance(votes, Tensor)
               else type(votes).__name__)
        raise ValueError(f"defense {name!r} returned malformed votes: expected bool "
                         f"({n_images}, {n_classes}, h, w), got {got}")


def check_certificate(cert: Certificate, n_images: int, conditions: Sequence[str],
                      n_shapes: int, name: str) -> None:
    """A plugin's malformed certificate must fail loudly, not be recorded as something else."""
    problems = []
    if tuple(cert.prediction.shape) not in ((n_images,), (n_images, n_shapes)):
        problems.append(f"prediction of shape {tuple(cert.prediction.shape)}")
    if set(cert.certified) != set(conditions):
        problems.append(f"conditions {sorted(cert.certified)} instead of {sorted(conditions)}")
    for cond, flags in cert.certified.items():
        if flags.dtype != torch.bool or tuple(flags.shape) != (n_images, n_shapes):
            problems.append(f"certified[{cond!r}] {flags.dtype} {tuple(flags.shape)}")
    for cond, margin in cert.margin.items():
        if tuple(margin.shape) != (n_images, n_shapes) or not torch.equal(
                margin >= 0, cert.certified.get(cond, margin >= 0)):
            problems.append(f"margin[{cond!r}] that disagrees with its certified flags")
    if problems:
        raise ValueError(f"defense {name!r} returned a malformed certificate: "
                         f"{'; '.join(problems)} (expected bool ({n_images}, {n_shapes}) "
                         f"flags per condition)")


def summarize(evaluation: Evaluation, patches: Sequence[PatchShape],
              conditions: Sequence[str]) -> pd.DataFrame:
    """One row per (patch shape, condition): counts and accuracies."""
    table = evaluation.per_image
    rows = []
    for patch in patches:
        correct = per_image.correct(table, patch)
        for cond in conditions:
            certified = correct & per_image.certified(table, cond, patch)
            rows.append({"patch": str(patch), "patch_h": patch.height, "patch_w": patch.width,
                         "patch_area": patch.area, "aspect": patch.width / patch.height,
                         "condition": cond, "n_images": len(table),
                         "n_correct": int(correct.sum()), "n_certified": int(certified.sum()),
                         "clean_accuracy": float(correct.mean()),
                         "certified_accuracy": float(certified.mean())})
    return pd.DataFrame(rows)
