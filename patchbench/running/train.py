"""One training loop for every defense; the defense supplies model, loss and optimiser."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchbench.defense import Defense, TrainStep
from patchbench.running.checkpoint import save_checkpoint
from patchbench.running.data import ImageData, batches
from patchbench.running.progress import progress_bar


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 128
    seed: int = 0
    crop_padding: int = 2  # random-crop augmentation: pad with zeros, crop back at random
    hflip: bool = False
    schedule: str = "cosine"  # "cosine" or "constant" learning rate (Defense.schedule)
    max_images: int = 0  # train on the first N training images only (0: all)
    hold_out_val: bool = False  # leave the "val" split out of training, to select settings on it
    precision: str = "fp32"  # "bf16": autocast mixed precision (weights stay fp32) in the
    #                          channels-last layout; 3x faster for BagCert on CPUs with AMX


TRAIN_PRECISIONS = ("fp32", "bf16")


def train(defense: Defense, data: ImageData, config: TrainConfig,
          device: torch.device | str = "cpu", show_progress: bool = True
          ) -> tuple[nn.Module, dict[str, float]]:
    """Train a fresh model of ``defense`` on ``data``; return it (eval mode) and metrics."""
    torch.manual_seed(config.seed)
    run = Run.start(defense, data, config, torch.device(device))
    start = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0, 0
    with progress_bar(show_progress) as bar:
        task = bar.add_task(f"train {defense.name}", total=run.total, status="")
        for epoch in range(config.epochs):
            loss_sum, correct, seen = 0.0, 0, 0
            for images, labels in batches(run.data, config.batch_size, shuffle=True,
                                          seed=config.seed * 1000 + epoch):
                loss, predictions, labels = run.step(images, labels, epoch)
                loss_sum += loss.item() * len(labels)
                correct += (predictions == labels).sum().item()
                seen += len(labels)
                bar.update(task, advance=1, status=f"epoch {epoch + 1}/{config.epochs} "
                           f"loss {loss_sum / seen:.4f} acc {correct / seen:.3f}")
    run.model.eval()
    metrics = {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
               "train_seconds": time.perf_counter() - start, "train_images": len(run.data),
               **{f"train_{k}": v for k, v in asdict(config).items()}}
    return run.model, metrics


@dataclass
class Run:
    """A training run in progress: what every step needs (one implementation for ``train``
    and for timing steps in ``estimate_seconds``)."""

    defense: Defense
    data: ImageData  # the images trained on (val held out, first max_images)
    config: TrainConfig
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total: int  # steps of the whole run
    steps: int = 0

    @classmethod
    def start(cls, defense: Defense, data: ImageData, config: TrainConfig,
              device: torch.device) -> Run:
        if config.precision not in TRAIN_PRECISIONS:
            raise ValueError(f"training precision must be one of {TRAIN_PRECISIONS}, "
                             f"got {config.precision!r}")
        if config.hold_out_val:
            data = data.without_validation()
        data = data.subset(config.max_images or None)
        model = defense.build_model(data.in_shape, data.num_classes).to(device)
        model = model.to(memory_format=cls.layout_of(config))
        optimizer = defense.optimizer(model)
        total = math.ceil(len(data) / config.batch_size) * config.epochs
        model.train()
        return cls(defense, data, config, device, model, optimizer,
                   defense.schedule(optimizer, total, config.schedule), total)

    @staticmethod
    def layout_of(config: TrainConfig) -> torch.memory_format:
        return torch.channels_last if config.precision == "bf16" else torch.contiguous_format

    def step(self, images: Tensor, labels: Tensor, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        """One optimiser step on a batch; (loss, predictions, labels) on the device."""
        config = self.config
        images = augment(images, config.crop_padding, config.hflip).to(self.device)
        images = images.contiguous(memory_format=self.layout_of(config))
        labels = labels.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=config.precision == "bf16"):
            loss, predictions = self.defense.loss(
                self.model, images, labels, TrainStep(epoch, self.steps, config.epochs,
                                                      self.total))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.steps += 1
        return loss, predictions, labels


def trained_recipe(metrics: dict) -> dict:
    """The TrainConfig fields recorded in a checkpoint's ``train`` metrics (older checkpoints
    lack the newer fields)."""
    return {f.name: metrics[f"train_{f.name}"] for f in dataclasses.fields(TrainConfig)
            if f"train_{f.name}" in metrics}


def estimate_seconds(defense: Defense, data: ImageData, config: TrainConfig,
                     device: torch.device | str = "cpu", timed_steps: int = 3
                     ) -> tuple[float, int, float]:
    """(estimated seconds, steps, measured seconds per step) of training: a few steps of a
    throw-away model timed after one warm-up step (the global RNG is left as it was)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        run = Run.start(defense, data, config, device)
        timings = []
        for images, labels in batches(run.data, config.batch_size, shuffle=True,
                                      seed=config.seed * 1000):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run.step(images, labels, 0)[0].item()  # .item() waits for the step
            timings.append(time.perf_counter() - start)
            if len(timings) > timed_steps:
                break
    per_step = statistics.median(timings[1:] or timings)  # the warm-up step left out
    return per_step * run.total, run.total, per_step


def estimate_text(defense: Defense, data: ImageData, config: TrainConfig,
                  device: torch.device | str = "cpu") -> str:
    """"about 18 min (12,040 steps at 90 ms, measured on cpu)": what a run says before it
    trains."""
    seconds, steps, per_step = estimate_seconds(defense, data, config, device)
    return (f"about {duration_text(seconds)} ({steps:,} steps at {1000 * per_step:.0f} ms, "
            f"measured on {device})")


def duration_text(seconds: float) -> str:
    """"40 s", "18 min", "3.7 h": a duration as an estimate reads it."""
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def train_and_save(defense: Defense, data: ImageData, config: TrainConfig,
                   device: torch.device, output: Path, show_progress: bool = True,
                   log: Callable[[str], None] = lambda message: None) -> str:
    """Train on ``data`` (a training split) and save atomically; the checkpoint's hash.
    Concurrent trainers of one configuration each write a whole file; the last one stays."""
    model, metrics = train(defense, data, config, device, show_progress)
    sha = save_checkpoint(output, defense, model, {
        "dataset": data.name, "in_shape": list(data.in_shape), "classes": list(data.classes),
        "train": metrics, "n_parameters": defense.num_parameters(model)})
    log(f"saved {output} (sha256 {sha[:12]}; train accuracy {metrics['train_accuracy']:.3f} "
        f"in {metrics['train_seconds']:.0f} s)")
    return sha


def augment(images: Tensor, crop_padding: int, hflip: bool) -> Tensor:
    """Random crop after zero padding, and optional horizontal flip, per image."""
    if crop_padding > 0:
        b, _, h, w = images.shape
        padded = F.pad(images, (crop_padding,) * 4)
        offsets = torch.randint(0, 2 * crop_padding + 1, (2, b))
        out = torch.empty_like(images)
        for dy, dx in torch.unique(offsets, dim=1).T.tolist():
            pick = (offsets[0] == dy) & (offsets[1] == dx)
            out[pick] = padded[pick, :, dy:dy + h, dx:dx + w]
        images = out
    if hflip:
        flip = torch.rand(images.shape[0]) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return images
