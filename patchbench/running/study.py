"""Running a study file: every step in dependency order, resumably, or a dry run of it.

Certify steps are sweeps (``sweep.run_sweep``: cells named by their configuration, finished
ones skipped, missing models trained, ``backend="ray"`` for a cluster); select steps choose
settings on the ``val`` cells of their candidate steps (``selection.select_setting``) and pass
them to the steps that wait for them; attack steps are ``attacking.run_attack`` cells; bench
steps are ``patchbench bench`` runs (done when a run of the same configurations and settings
is recorded); then the report. A dry run plans the same cells without training, certifying,
attacking or timing anything and says of each whether it is done, what it still needs (a
model to train, a certification, an attack, a benchmark) and what that costs (measured: a few
training steps, one certified batch).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from patchbench.defense import get_defense
from patchbench.patches import parse_patches
from patchbench.reporting.claims import load_claims
from patchbench.reporting.report import StudyReport, build_report, update_readme
from patchbench.running.attacking import plan_attack, run_attack
from patchbench.running.bench import (
    defense_configurations,
    recorded_run,
    run_bench,
    write_bench_rows,
)
from patchbench.running.bench import label as bench_label
from patchbench.running.checkpoint import CheckpointError, checkpoint_meta
from patchbench.running.data import SplitCache
from patchbench.running.evaluate import certify_split
from patchbench.running.results import failure_path, is_finished, read_rows, rows_path
from patchbench.running.selection import defense_rows, select_setting, selection_condition
from patchbench.running.study_file import (
    KINDS,
    Attack,
    Bench,
    Certify,
    Chosen,
    ReportSpec,
    Select,
    Step,
    Study,
    StudyError,
)
from patchbench.running.sweep import Cell, check_device, plan, run_sweep, untrained
from patchbench.running.train import TrainConfig, estimate_seconds
from patchbench.running.zoo import find_model

# Images of the batch certified to estimate a cell's certification time.
ESTIMATE_IMAGES = 32


@dataclass(frozen=True)
class Options:
    """How to run a study (the command line's options); outputs relative to the working
    folder unless absolute."""

    results_dir: Path | None = None  # default: the study's [study] results
    device: str = "auto"
    batch_size: int = 256
    backend: str = "local"
    n_jobs: int | None = None
    ray_address: str | None = None
    force: bool = False
    allow_train: bool = True
    data_dir: str | None = None
    show_progress: bool = True


@dataclass(frozen=True)
class CellState:
    """One line of a study's plan: a cell (or a step that cannot be planned yet)."""

    step: str
    kind: str  # one of study_file.KINDS
    cell: str  # its id; "" while it waits
    label: str
    state: str  # done, to certify, to train, to attack, to time, chosen, waits for ...
    seconds: float | None = None  # estimated cost of what is left (None: none or unknown)
    note: str = ""


@dataclass
class StudyRun:
    """What a study did (or, dry, would do): a state per cell, the choices made on val."""

    states: list[CellState]
    choices: dict[str, dict[str, Any]]
    failed: int = 0  # cells that failed this run
    violations: int = 0  # certified images an attack broke

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for state in self.states:
            key = "waiting" if state.state.startswith("waits") else state.state
            counts[key] = counts.get(key, 0) + 1
        return counts


class Runner:
    """Walks the steps of a study in dependency order (dry or not)."""

    def __init__(self, study: Study, options: Options, dry_run: bool,
                 log: Callable[[str], None]) -> None:
        self.study, self.options, self.dry_run, self.log = study, options, dry_run, log
        self.root = Path(options.results_dir or study.results)
        self.run = StudyRun([], {})
        self.cells: dict[str, list[tuple[Path, str]]] = {}  # certify step -> its cells
        self.splits = SplitCache()

    @functools.cached_property
    def device(self) -> torch.device:
        """Where attacks, benchmarks and cost estimates run: this machine, so the device
        must exist here (certify steps on Ray resolve their own)."""
        return torch.device(check_device(self.options.device, "local"))

    def walk(self) -> StudyRun:
        pending = sorted(self.study.steps, key=lambda s: KINDS.index(s.kind))
        handled: set[str] = set()  # steps whose cells (certify) or choice (select) are known
        while True:
            ready = [s for s in pending if s.spec.needs <= handled]
            if not ready:
                break
            step = ready[0]
            pending.remove(step)
            if getattr(self, step.kind)(step):
                handled.add(step.name)
        for step in pending:
            waits = ", ".join(sorted(step.spec.needs - handled))
            self.add(step, "", self.describe(step), f"waits for {waits}")
        return self.run

    def add(self, step: Step, cell: str, label: str, state: str,
            seconds: float | None = None, note: str = "") -> None:
        self.run.states.append(CellState(step.name, step.kind, cell, label, state, seconds,
                                         note))

    # --- certify -----------------------------------------------------------------------------

    def certify(self, step: Step) -> bool:
        spec: Certify = step.spec
        params, checkpoint = self.model(spec)
        folder = self.root / spec.results
        kwargs = dict(split=spec.split, n_images=spec.n_images, conditions=spec.conditions,
                      train=self.resolve(spec.train), checkpoint=checkpoint,
                      data_dir=self.options.data_dir, download=False, precision=spec.precision)
        defense = spec.defense or self.checkpoint_defense(checkpoint)
        if self.dry_run:
            cells = plan(defense, list(spec.patches), spec.dataset,
                         {k: v if isinstance(v, list) else [v] for k, v in params.items()},
                         splits=self.splits, **kwargs)
            self.cells[step.name] = [(folder, c.id) for c in cells]
            missing = {c.model for c in untrained(cells)}
            for cell in cells:
                self.add(step, cell.id, cell.label, *self.cell_state(cell, folder, missing))
            return True
        self.log(f"study step {step.name!r}: certify {defense} on {spec.split} -> {folder}")
        frame = run_sweep(defense, list(spec.patches), spec.dataset, params,
                          results_dir=folder, force=self.options.force,
                          device=self.options.device, batch_size=self.options.batch_size,
                          backend=self.options.backend, n_jobs=self.options.n_jobs,
                          ray_address=self.options.ray_address,
                          show_progress=self.options.show_progress,
                          allow_train=self.options.allow_train, splits=self.splits,
                          **kwargs)
        cells = frame.drop_duplicates("cell")
        self.cells[step.name] = [(folder, c) for c in cells["cell"]]
        for row in cells.to_dict("records"):
            state = {"computed": "done", "skipped": "done"}.get(row["status"], "failed")
            self.add(step, row["cell"], " ".join([row["defense"], *self.swept(row, params)]),
                     state, note=row.get("reason") or "")
        self.run.failed += int((cells["status"] == "failed").sum())
        return True

    def cell_state(self, cell: Cell, folder: Path, missing: set[str]
                   ) -> tuple[str, float | None, str]:
        """(state, estimated seconds, note) of a planned cell."""
        if is_finished(folder, cell.id) and not self.options.force:
            return "done", None, ""
        note = "failed earlier (failed/ says why); runs again" if failure_path(
            folder, cell.id).is_file() else ""
        seconds = self.certify_seconds(cell)
        if cell.model in missing:
            return "to train", add_seconds(self.train_seconds(cell), seconds), note
        return "to certify", seconds, note

    def train_seconds(self, cell: Cell) -> float | None:
        try:
            defense = get_defense(cell.defense).from_params(cell.params)
            data = self.splits.get(cell.dataset, "train", self.options.data_dir)
            return estimate_seconds(defense, data, TrainConfig(**cell.train), self.device)[0]
        except Exception:  # the cell itself will say what is wrong
            return None

    def certify_seconds(self, cell: Cell) -> float | None:
        """One batch certified with an untrained model of the cell's configuration, scaled
        to the cell's images (the cost does not depend on the weights)."""
        try:
            defense = get_defense(cell.defense).from_params(cell.params)
            data = self.splits.get(cell.dataset, cell.split, self.options.data_dir)
            batch = data.subset(min(ESTIMATE_IMAGES, cell.n_images))
            model = defense.build_model(tuple(data.in_shape), len(data.classes)).eval()
            shapes = parse_patches(list(cell.patches))
            start = time.perf_counter()
            certify_split(defense, model, batch, shapes, cell.conditions, ESTIMATE_IMAGES,
                          self.device, False, cell.precision)
            return (time.perf_counter() - start) * cell.n_images / len(batch)
        except Exception:
            return None

    # --- select ------------------------------------------------------------------------------

    def select(self, step: Step) -> bool:
        spec: Select = step.spec
        cells = [cell for name in spec.among for cell in self.cells.get(name, [])]
        unfinished = [c for folder, c in cells if not is_finished(folder, c)]
        if unfinished or not cells:
            self.add(step, "", self.describe(step),
                     f"waits for {len(unfinished)} val cell(s) of {', '.join(spec.among)}")
            return False
        rows = pd.concat([read_rows(rows_path(folder, c)) for folder, c in cells],
                         ignore_index=True)
        defense = str(rows["defense"].iloc[0])
        source = f"the val cells of {', '.join(spec.among)}"
        try:
            condition = selection_condition(rows, defense, spec.condition)
            chosen = select_setting(defense_rows(rows, defense, source), list(spec.params),
                                    spec.patch, condition, spec.clean_tolerance, spec.where)
        except ValueError as err:
            raise StudyError(f"[[select]] {step.name!r}: {err}") from None
        choice = dict(zip(spec.params, chosen.value, strict=True))
        self.run.choices[step.name] = choice
        text = ", ".join(f"{k} = {v}" for k, v in choice.items())
        self.add(step, "", f"{defense}: {text} (of {len(chosen.table)} candidates, "
                           f"{spec.patch} {condition})", "chosen")
        if not self.dry_run:
            self.log(f"study step {step.name!r}: chose {text} on {source}")
        return True

    # --- attack ------------------------------------------------------------------------------

    def attack(self, step: Step) -> bool:
        spec: Attack = step.spec
        params, checkpoint = self.model(spec)
        defense = spec.defense or self.checkpoint_defense(checkpoint)
        folder = self.root / spec.results
        label = " ".join([defense, *(f"{k}={v}" for k, v in params.items())])
        try:
            attack = plan_attack(defense, list(spec.patches), spec.dataset, params,
                                 split=spec.split, n_images=spec.n_images,
                                 train=self.resolve(spec.train), checkpoint=checkpoint,
                                 budget=spec.budget, data_dir=self.options.data_dir)
        except CheckpointError:
            if not self.dry_run:
                raise
            self.add(step, "", label, "waits for its model (trained by a certify step)")
            return True
        if is_finished(folder, attack.cell) and not self.options.force:
            self.add(step, attack.cell, label, "done")
            return True
        if self.dry_run:
            self.add(step, attack.cell, label, "to attack")
            return True
        self.log(f"study step {step.name!r}: attack {label} -> {folder}")
        outcome = run_attack(attack, folder, self.device, self.options.batch_size,
                             self.options.force)
        broken = len(outcome.result.violations) if outcome.result else 0
        self.run.violations += broken
        self.add(step, attack.cell, label, "done",
                 note=f"{broken} soundness violation(s)" if broken else "")
        return True

    # --- bench -------------------------------------------------------------------------------

    def bench(self, step: Step) -> bool:
        spec: Bench = step.spec
        try:
            defenses = [configured for names, own in self.bench_grids(spec)
                        for configured in defense_configurations(names, own)]
            for defense in defenses:
                defense.check(spec.settings.in_shape)
        except ValueError as err:
            raise StudyError(f"[[bench]] {step.name!r}: {err}") from None
        folder = self.root / spec.results
        label = "; ".join(bench_label(d) for d in defenses) + f" ({spec.settings.shape})"
        recorded = recorded_run(folder, defenses, spec.settings, self.device)
        if recorded and not self.options.force:
            self.add(step, recorded, label, "done")
        elif self.dry_run:
            self.add(step, "", label, "to time")
        else:
            self.log(f"study step {step.name!r}: bench {label} -> {folder}")
            _, rows = run_bench(defenses, spec.settings, self.device, self.log)
            write_bench_rows(folder, rows)
            self.add(step, str(rows["run_id"].iloc[0]), label, "done")
        return True

    def bench_grids(self, spec: Bench) -> list[tuple[list[str], dict[str, list[Any]]]]:
        """(defenses, parameter lists) to multiply out: all defenses sharing one flat table
        (key ""), or each defense with its own."""
        def lists(values: dict[str, Any]) -> dict[str, list[Any]]:
            return {k: v if isinstance(v, list) else [v] for k, v in self.resolve(values).items()}
        if "" in spec.params:
            return [(list(spec.defenses), lists(spec.params[""]))]
        return [([name], lists(spec.params[name])) for name in spec.defenses]

    # --- shared ------------------------------------------------------------------------------

    def model(self, spec: Certify | Attack) -> tuple[dict[str, Any], str | None]:
        """(resolved parameters, checkpoint file) of a step: a zoo model's file and
        certification parameters (the step's own win), else the step's checkpoint."""
        params = self.resolve(spec.params)
        if spec.model is None:
            return params, spec.checkpoint
        named = find_model(spec.model)
        return {**named.certify, **params}, str(named.path)

    def resolve(self, values: dict[str, Any]) -> dict[str, Any]:
        return {k: self.run.choices[v.step][v.name] if isinstance(v, Chosen) else v
                for k, v in values.items()}

    @staticmethod
    def checkpoint_defense(checkpoint: str | None) -> str:
        return checkpoint_meta(checkpoint)["defense"]

    def describe(self, step: Step) -> str:
        spec = step.spec
        if isinstance(spec, Select):
            return f"choose {', '.join(spec.params)} among {', '.join(spec.among)}"
        if isinstance(spec, Bench):
            return ", ".join(spec.defenses)
        return spec.defense or spec.model or str(spec.checkpoint)

    @staticmethod
    def swept(row: dict, params: dict[str, Any]) -> list[str]:
        return [f"{k}={row.get(f'param_{k}')}" for k in params]


def run_study(study: Study, options: Options = Options(), dry_run: bool = False,
              log: Callable[[str], None] = lambda message: None) -> StudyRun:
    """Run (or, with ``dry_run``, plan) every step of ``study``; the report is the
    caller's (``report_study``), so that a dry run writes nothing."""
    return Runner(study, options, dry_run, log).walk()


def report_study(study: Study, options: Options) -> tuple[Path, Path | None]:
    """Write the study's report (and README block); (report path, README or None)."""
    spec = study.report
    root = Path(options.results_dir or study.results)
    report = build_report(root, spec.out, None, None, spec.gallery_images, study_report(spec))
    if spec.readme:
        update_readme(spec.readme, spec.out)
    return report, Path(spec.readme) if spec.readme else None


def study_report(spec: ReportSpec | None) -> StudyReport:
    """What the study adds to its report: the sweep table and the claims file, loaded (nothing
    for a study without a [report])."""
    if spec is None:
        return StudyReport()
    return StudyReport(spec.sweep, load_claims(spec.claims) if spec.claims else None)


def add_seconds(*parts: float | None) -> float | None:
    """The sum of the known parts; None when none is known."""
    known = [p for p in parts if p is not None]
    return sum(known) if known else None
