"""Attacks as cells: one trained model attacked on one split, resumable like a sweep's cells.

``plan_attack`` finds the model (an explicit checkpoint, or the one trained for the
configuration: nothing is trained here) and names the attack's cell before any work, so a
finished attack is skipped; ``run_attack`` attacks and writes ``rows/<cell>.csv`` and
``per_image/<cell>.csv.gz`` beside the certification cells, where ``patchbench report`` shows
empirical next to certified accuracy. The attack itself is ``attack.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from patchbench.defense import get_defense
from patchbench.patches import PatchShape, check_fits, parse_patches
from patchbench.running.attack import (
    AttackBudget,
    AttackResult,
    AttackUnsupportedError,
    attack_split,
    summarize_attack,
)
from patchbench.running.cache import find_checkpoint, model_key
from patchbench.running.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    parameter_clash,
)
from patchbench.running.data import ImageData, load_dataset
from patchbench.running.results import (
    atomic_write_csv,
    cell_id,
    is_finished,
    model_columns,
    per_image_path,
    prepare,
    provenance_columns,
    rows_path,
)
from patchbench.running.sweep import SweepError
from patchbench.running.train import TrainConfig


@dataclass(frozen=True)
class AttackPlan:
    """An attack ready to run: the model (certify-only parameters applied), images, shapes."""

    cell: str
    checkpoint: Checkpoint
    data: ImageData
    patches: tuple[PatchShape, ...]
    budget: AttackBudget


@dataclass(frozen=True)
class AttackOutcome:
    cell: str
    status: str  # "computed" or "skipped" (finished earlier)
    path: Path  # the rows file
    result: AttackResult | None = None  # None when skipped
    summary: pd.DataFrame | None = None


def plan_attack(defense: str, patches: str | Sequence[str | PatchShape],
                dataset: str = "fashion-mnist", params: Mapping[str, Any] | None = None, *,
                split: str = "test", n_images: int | None = None,
                train: Mapping[str, Any] | None = None, checkpoint: str | Path | None = None,
                budget: AttackBudget | None = None, data_dir: str | Path | None = None,
                download: bool = False) -> AttackPlan:
    """The attack of one model: ``checkpoint``, else the model trained for the defense's
    parameters and recipe (``train`` overrides it) on ``dataset``. ``params`` (one value each)
    must match the trained ones, except certify-only ones (a vote threshold), which apply.
    Raises SweepError (bad shapes or parameters), CheckpointError (no such model) or
    AttackUnsupportedError (a defense without the attack's hooks); nothing has run then."""
    params = dict(params or {})
    try:
        shapes = tuple(parse_patches([patches] if isinstance(patches, str) else
                                     [str(p) for p in patches]))
    except ValueError as err:
        raise SweepError(str(err), "--patch") from None
    data = load_dataset(dataset, split, data_dir, download).subset(n_images)
    try:
        check_fits(shapes, data.in_shape[1:])
    except ValueError as err:
        raise SweepError(str(err), "--patch") from None
    cls = get_defense(defense)
    try:
        configured = cls.from_params(params)
    except ValueError as err:
        raise SweepError.of_parameter(err) from None
    if checkpoint is None:
        key = model_key(configured, dataset, TrainConfig(**{**cls.train_defaults,
                                                             **(train or {})}))
        checkpoint = find_checkpoint(key)
        if checkpoint is None:
            raise CheckpointError(f"no trained model {key}: train it first (patchbench train "
                                  f"--defense {defense} ...), or pass --model NAME "
                                  "(patchbench models lists them) or --checkpoint")
    loaded = load_checkpoint(checkpoint, defense=defense, dataset=dataset)
    given = {k: configured.params()[k] for k in params}
    clash = parameter_clash(loaded, given)
    if clash:
        raise SweepError(clash)
    loaded = dataclasses.replace(loaded, defense=cls.from_params(
        {**loaded.defense.params(), **given}))
    try:
        loaded.defense.check(tuple(data.in_shape))
    except ValueError as err:
        raise SweepError.of_parameter(err) from None
    unsupported = loaded.defense.unsupported("attack")
    if unsupported:
        raise AttackUnsupportedError(unsupported)
    budget = budget or AttackBudget()
    return AttackPlan(attack_cell_id(loaded, data, budget, [str(p) for p in shapes]), loaded,
                      data, shapes, budget)


def run_attack(plan: AttackPlan, results_dir: str | Path = "results",
               device: str | torch.device = "cpu", batch_size: int = 256,
               force: bool = False) -> AttackOutcome:
    """Attack (unless the cell is finished and not ``force``) and write the cell's files.
    Violations are in ``outcome.result.violations``; the files are written first."""
    results_dir = Path(results_dir)
    path = rows_path(results_dir, plan.cell)
    if is_finished(results_dir, plan.cell) and not force:
        return AttackOutcome(plan.cell, "skipped", path)
    prepare(results_dir)
    device = torch.device(device)
    loaded = plan.checkpoint
    result = attack_split(loaded.defense, loaded.model, plan.data, list(plan.patches),
                          plan.budget, batch_size, device)
    summary = summarize_attack(result, list(plan.patches))
    write_attack_cell(results_dir, plan.cell, loaded, plan.data, result, summary, device)
    return AttackOutcome(plan.cell, "computed", path, result, summary)


def attack_cell_id(checkpoint: Checkpoint, data: ImageData, budget: AttackBudget,
                   patches: Sequence[str]) -> str:
    """The cell of an attack: known before attacking, so a finished one can be skipped."""
    defense = checkpoint.defense
    return cell_id({"kind": "attack", "budget": dataclasses.asdict(budget),
                    "defense": defense.name, "params": defense.params(), "dataset": data.name,
                    "split": data.split, "n_images": len(data), "checkpoint": checkpoint.sha256,
                    "patches": list(patches)})


def write_attack_cell(results_dir: Path, cell: str, checkpoint: Checkpoint, data: ImageData,
                      result: AttackResult, summary: pd.DataFrame, device: torch.device) -> Path:
    """Write ``rows/<cell>.csv`` and ``per_image/<cell>.csv.gz`` like ``results.write_cell``
    (``cell`` from ``attack_cell_id``: its hash includes "attack" and the budget, so it never
    collides with a certified cell); return the rows path."""
    budget = dataclasses.asdict(result.budget)
    rows = summary.assign(
        **model_columns(cell, checkpoint, data),
        **{f"attack_{k}": v for k, v in budget.items()},
        attack_seconds=result.attack_seconds,
        **provenance_columns(device))
    atomic_write_csv(result.per_image.assign(cell=cell), per_image_path(results_dir, cell))
    path = rows_path(results_dir, cell)
    atomic_write_csv(rows, path)
    return path
