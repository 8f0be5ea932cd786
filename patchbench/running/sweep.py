"""Sweeps: every model configuration of a grid, certified once each, resumable cell by cell.

A *cell* is one model configuration (defense, parameters, dataset, training recipe) certified
on one split for a set of patch shapes and conditions. Its id hashes that configuration, so a
finished cell is found on disk and skipped before any model is loaded. A cell runs in
isolation: whatever a defense raises fails that cell only (``failed/<cell>.json``) and the
sweep goes on. Cells run through joblib; ``backend="ray"`` hands them to Ray's joblib backend,
so a cluster needs no scheduler of ours.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import pandas as pd
import torch
from joblib import Parallel, delayed, parallel_config

from patchbench.certify import CONDITIONS
from patchbench.defense import (
    Defense,
    ParameterError,
    UnknownDefenseError,
    get_defense,
    registered_defenses,
)
from patchbench.options import DeviceType
from patchbench.patches import PatchShape, check_fits, parse_patches
from patchbench.running.cache import find_checkpoint, model_key, new_checkpoint_path
from patchbench.running.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    parameter_clash,
)
from patchbench.running.data import ImageData, SplitCache, load_dataset
from patchbench.running.evaluate import PRECISIONS, certify_split, summarize
from patchbench.running.progress import progress_bar
from patchbench.running.results import (
    ResultsError,
    cell_id,
    is_finished,
    prepare,
    read_rows,
    rows_path,
    write_cell,
    write_failure,
)
from patchbench.running.train import TrainConfig, estimate_text, train_and_save
from patchbench.running.zoo import name_of

BACKENDS = ("local", "ray")
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class SweepError(ValueError):
    """A sweep that cannot start: bad defense parameters, patch shapes or options. ``option``
    names the command-line option at fault, when there is one."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option

    @classmethod
    def of_parameter(cls, err: ValueError) -> SweepError:
        """A defense's refusal of a parameter value, naming its option where it says which."""
        param = err.param if isinstance(err, ParameterError) else None
        return cls(str(err), f"--{param.replace('_', '-')}" if param else None)


@dataclass(frozen=True)
class Cell:
    """One model configuration certified on one split: what is skipped, run or failed."""

    defense: str
    params: dict[str, Any]  # every parameter if the defense loads, else the given ones
    swept: dict[str, Any]  # the parameters given for the sweep (what summaries show)
    train: dict[str, Any]  # TrainConfig fields
    model: str  # cache.model_key of the weights ("" if the defense does not load)
    dataset: str
    split: str
    n_images: int
    patches: tuple[str, ...]
    conditions: tuple[str, ...] = CONDITIONS
    precision: str = "fp32"  # the votes' precision (evaluate.for_inference)
    checkpoint: str | None = None  # an explicit checkpoint file instead of the cache's
    checkpoint_sha256: str | None = None

    @property
    def identity(self) -> dict[str, Any]:
        """Everything the results depend on: the weights (by model key, which is robust to new
        recipe fields, or by checkpoint hash), every parameter (certify-only ones too) and what
        is certified. Device, batch size and timings are provenance, not identity."""
        model = ({"checkpoint": self.checkpoint_sha256} if self.checkpoint else
                 {"model": self.model} if self.model else {"train": self.train})
        return {"defense": self.defense, "params": self.params, **model,
                "dataset": self.dataset, "split": self.split, "n_images": self.n_images,
                "patches": sorted(self.patches), "conditions": sorted(self.conditions),
                # fp32 cells keep the ids they had before precision was a choice
                **({"precision": self.precision} if self.precision != "fp32" else {})}

    @property
    def id(self) -> str:
        return cell_id(self.identity)

    @property
    def label(self) -> str:
        return " ".join([self.defense, *(f"{k}={v}" for k, v in self.swept.items())])


@dataclass(frozen=True)
class Job:
    """What every cell of a sweep shares; plain data, so that it pickles to any worker."""

    results_dir: str  # absolute: a worker's working folder may differ
    data_dir: str | None
    download: bool
    device: str  # "auto" is resolved by the worker, which may sit on another machine
    batch_size: int
    force: bool
    show_progress: bool
    splits: SplitCache  # this sweep's evaluation splits (a worker loads its own)


@dataclass(frozen=True)
class Outcome:
    cell: str
    status: str  # "computed", "skipped" (finished meanwhile by another run) or "failed"
    reason: str = ""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_sweep(defenses: str | Sequence[str], patches: str | Sequence[str | PatchShape],
              dataset: str = "fashion-mnist", params: Mapping[str, Any] | None = None, *,
              split: str = "test", n_images: int | None = None,
              conditions: str | Sequence[str] | None = None,
              train: Mapping[str, Any] | None = None, results_dir: str | Path = "results",
              force: bool = False, device: str | torch.device = "auto", batch_size: int = 256,
              data_dir: str | Path | None = None, download: bool = False,
              checkpoint: str | Path | None = None, backend: str = "local",
              n_jobs: int | None = None, ray_address: str | None = None,
              show_progress: bool = True, precision: str = "fp32",
              allow_train: bool = True, splits: SplitCache | None = None) -> pd.DataFrame:
    """Certify every model configuration of a grid, training the models that are missing.

    ``defenses``: registered names (a list, or a comma-separated string). ``params``: defense
    parameter -> value or list of values, e.g. ``{"rf": [5, 7], "threshold": 0.2}``; each
    applies to every selected defense that has it, and the cartesian product gives the cells.
    ``train``: TrainConfig fields overriding each defense's recipe (``{"epochs": 2, "seed":
    1}``). Finished cells in ``results_dir`` are skipped unless ``force``. ``backend``:
    ``"local"`` (joblib processes, ``n_jobs`` at once, default 1) or ``"ray"`` (Ray's joblib
    backend on the cluster at ``ray_address``; by default Ray's own choice: ``RAY_ADDRESS``, a
    cluster started on this machine, or a new local instance). A model that is neither shipped
    nor cached is trained first, announced with its estimated time; with ``allow_train``
    False it is a CheckpointError before any work instead. ``splits``: the evaluation splits
    to share with other sweeps (a study's); by default this sweep loads its own.

    Returns the rows of every cell (see README, "Results") plus ``status`` ("computed",
    "skipped" or "failed") and ``reason``; a failed cell has one row with its configuration.
    Raises SweepError when the sweep cannot start; nothing has run then.
    """
    if backend not in BACKENDS:
        raise SweepError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}",
                         "--backend")
    device_text = check_device(device, backend)
    splits = splits or SplitCache()
    cells = plan(defenses, patches, dataset, params or {}, split=split, n_images=n_images,
                 conditions=conditions, train=train or {}, checkpoint=checkpoint,
                 data_dir=data_dir, download=download, precision=precision, splits=splits)
    results_dir = Path(results_dir).resolve()
    prepare(results_dir)
    todo = [cell for cell in cells if force or not is_finished(results_dir, cell.id)]
    todo_ids = {cell.id for cell in todo}
    for cell in cells:
        if cell.id not in todo_ids:
            log(f"cell {cell.id} ({cell.label}): finished earlier, skipped "
                f"({finished_model(cell)}force recomputes)")
    announce_training(todo, allow_train, data_dir, download, device_text)
    outcomes: list[Outcome] = []
    with progress_bar(show_progress) as bar:
        task = bar.add_task("sweep", total=len(cells), status=f"{len(cells)} cells")
        bar.update(task, completed=len(cells) - len(todo))
        if todo:
            with backend_config(backend, n_jobs, ray_address, device_text) as (
                    runner, worker_device, n_workers):
                job = Job(str(results_dir), str(Path(data_dir).resolve()) if data_dir else None,
                          download, worker_device, batch_size, force,
                          show_progress and (backend == "ray" or n_workers == 1), splits)
                done = len(cells) - len(todo)
                outcomes = ReportingParallel(
                    lambda n: bar.update(task, completed=done + n), batch_size=1)(
                    delayed(runner)(cell, job) for cell in todo)
    return collect(results_dir, cells, outcomes)


def check_device(device: str | torch.device, backend: str) -> str:
    """Locally the device must exist here; on Ray each worker resolves it (the driver may have
    no GPU), so only its spelling is checked."""
    text = str(device).strip().lower()
    if backend == "local":
        try:
            return str(DeviceType().convert(text, None, None))
        except click.BadParameter as err:
            raise SweepError(err.message, "--device") from None
    if not _DEVICE.match(text):
        raise SweepError(f"unknown device {device!r}; use auto, cpu or cuda[:N]", "--device")
    return text


def plan(defenses: str | Sequence[str], patches: str | Sequence[str | PatchShape], dataset: str,
         params: Mapping[str, Any], *, split: str, n_images: int | None,
         conditions: str | Sequence[str], train: Mapping[str, Any],
         checkpoint: str | Path | None, data_dir: str | Path | None,
         download: bool, precision: str = "fp32", splits: SplitCache | None = None
         ) -> list[Cell]:
    """The sweep's cells, checked as far as possible without loading any model (the
    evaluation split is loaded, through ``splits`` when given)."""
    names = _names(defenses)
    try:
        shapes = parse_patches([patches] if isinstance(patches, str) else
                               [str(p) for p in patches])
    except ValueError as err:
        raise SweepError(str(err), "--patch") from None
    asked = None if conditions is None else _names(conditions, "condition", "--condition")
    if precision not in PRECISIONS:
        raise SweepError(f"unknown precision {precision!r}; choose from "
                         f"{', '.join(PRECISIONS)}", "--precision")
    unknown = sorted(set(train) - set(TRAIN_FIELDS))
    if unknown:
        raise SweepError(f"unknown training option(s) {unknown}; choose from {TRAIN_FIELDS}")
    classes = load_defenses(names)
    own_conditions = defense_conditions(classes, asked)
    grids = parameter_grids(classes, {k: _values(k, v) for k, v in params.items()})
    data = (splits or SplitCache()).get(dataset, split, data_dir, download).subset(n_images)
    try:
        check_fits(shapes, data.in_shape[1:])
    except ValueError as err:
        raise SweepError(str(err), "--patch") from None
    common = {"dataset": dataset, "split": split, "n_images": len(data),
              "patches": tuple(str(s) for s in shapes), "precision": precision}
    cells: dict[str, Cell] = {}
    for name, cls in classes.items():
        for given in grids[name]:
            cell = Cell(name, *configure(cls, given, dict(train), dataset),
                        conditions=own_conditions[name], **common)
            cells.setdefault(cell.id, cell)
    if checkpoint is None:
        for cell in cells.values():
            check_configuration(classes[cell.defense], cell.params, data.in_shape)
        return list(cells.values())
    if len(cells) != 1:
        raise SweepError(f"a checkpoint is one model, but the sweep has {len(cells)} cells",
                         "--checkpoint")
    cell = with_checkpoint(next(iter(cells.values())), Path(checkpoint))
    check_configuration(classes[cell.defense], cell.params, data.in_shape)
    return [cell]


def check_configuration(cls: type[Defense] | None, params: dict[str, Any],
                        in_shape: Sequence[int]) -> None:
    """``Defense.check`` of one configuration on the images: a ValueError is the user's error
    (nothing has run); anything else a plugin raises is left for its cell."""
    if cls is None:
        return
    try:
        cls.from_params(params).check(tuple(in_shape))
    except ValueError as err:
        raise SweepError.of_parameter(err) from None
    except Exception:  # the cell raises it again and fails alone
        return


def defense_conditions(classes: Mapping[str, type[Defense] | None], asked: list[str] | None
                       ) -> dict[str, tuple[str, ...]]:
    """Each defense's conditions: all of its own, or those of ``asked`` that it has. A name no
    loaded defense has, or a defense left with none, is the user's error."""
    own = {name: tuple(cls.conditions) if cls is not None else tuple(asked or CONDITIONS)
           for name, cls in classes.items()}
    if asked is None:
        return own
    known = list(dict.fromkeys(c for conds in own.values() for c in conds))
    unknown = [c for c in asked if c not in known]
    if unknown:
        raise SweepError(f"unknown condition(s) {unknown}; choose from {', '.join(known)}",
                         "--condition")
    picked = {name: tuple(c for c in asked if c in conds) for name, conds in own.items()}
    empty = [name for name, conds in picked.items() if not conds]
    if empty:
        raise SweepError(f"defense {empty[0]!r} has none of the conditions {asked}; it has "
                         f"{', '.join(own[empty[0]])}", "--condition")
    return picked


def _names(value: str | Sequence[str], what: str = "defense", option: str = "--defense"
           ) -> list[str]:
    """Comma lists and sequences alike, duplicates dropped, order kept."""
    tokens = [t.strip() for part in ([value] if isinstance(value, str) else value)
              for t in str(part).split(",")]
    if not tokens or "" in tokens:
        raise SweepError(f"empty {what} name in {value!r}", option)
    return list(dict.fromkeys(tokens))


def _values(name: str, value: Any) -> list[Any]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values or any(isinstance(v, str) and not v.strip() for v in values):
        raise SweepError(f"empty value for parameter --{name.replace('_', '-')}")
    return list(dict.fromkeys(values))


def load_defenses(names: list[str]) -> dict[str, type[Defense] | None]:
    """Classes by name; None for a registered defense that fails to import (its cells will
    fail, the others run). A name nobody registered is the user's error."""
    classes: dict[str, type[Defense] | None] = {}
    for name in names:
        try:
            classes[name] = get_defense(name)
        except UnknownDefenseError:
            if name not in registered_defenses():
                raise
            classes[name] = None
    return classes


def parameter_grids(classes: Mapping[str, type[Defense] | None],
                    params: Mapping[str, list[Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each defense's share of the parameters, multiplied out. A parameter no loaded defense
    has is an error, unless a defense that failed to load may have it (then it gets it)."""
    own = {name: {f.name for f in dataclasses.fields(cls.Config)}
           for name, cls in classes.items() if cls is not None}
    orphans = [p for p in params if not any(p in fields for fields in own.values())]
    if orphans and len(own) == len(classes):
        if len(own) == 1:
            name, fields = next(iter(own.items()))
            raise SweepError(f"defense {name!r} has no parameter(s) {sorted(orphans)}; "
                             f"it takes {sorted(fields)}")
        raise SweepError(f"none of the defenses {', '.join(own)} has parameter(s) "
                         f"{sorted(orphans)}")
    grids = {}
    for name in classes:
        keys = [p for p in params if (p in own[name] if name in own else p in orphans)]
        grids[name] = [dict(zip(keys, combo, strict=True))
                       for combo in itertools.product(*(params[k] for k in keys))]
    return grids


def configure(cls: type[Defense] | None, given: dict[str, Any], train: dict[str, Any],
              dataset: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
    """(all parameters, the given ones typed, training recipe, model key) of a configuration.
    A bad value is the user's error; anything else a plugin raises is left for its cell."""
    if cls is None:
        return given, given, train, ""
    try:
        defense = cls.from_params(given)
        params = defense.params()
        recipe = {**cls.train_defaults, **train}
        key = model_key(defense, dataset, TrainConfig(**recipe))
    except ValueError as err:
        raise SweepError.of_parameter(err) from None
    except Exception:  # the cell raises it again and fails alone
        return given, given, train, ""
    return params, {k: params[k] for k in given}, asdict(TrainConfig(**recipe)), key


def with_checkpoint(cell: Cell, path: Path) -> Cell:
    """The cell of an explicit checkpoint: its content hash replaces the training recipe.
    Given parameters must match the trained ones, except certify-only ones (a threshold)."""
    loaded = load_checkpoint(path, defense=cell.defense, dataset=cell.dataset)
    clash = parameter_clash(loaded, cell.swept)
    if clash:
        raise SweepError(clash)
    trained = loaded.defense.params()
    return dataclasses.replace(cell, params={**trained, **cell.swept}, train={}, model="",
                               checkpoint=str(path.resolve()), checkpoint_sha256=loaded.sha256)


class ReportingParallel(Parallel):
    """joblib's Parallel calling ``on_done(n_finished)`` as cells finish. joblib calls
    ``print_progress`` after every finished task on every backend, Ray's included, which
    cannot return results as a generator."""

    def __init__(self, on_done: Callable[[int], Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.on_done, self.reported = on_done, 0

    def print_progress(self) -> None:
        if self.n_completed_tasks != self.reported:
            self.reported = self.n_completed_tasks
            self.on_done(self.reported)


@contextmanager
def backend_config(backend: str, n_jobs: int | None, ray_address: str | None, device: str
                   ) -> Iterator[tuple[Callable[[Cell, Job], Outcome], str, int]]:
    """joblib configured for the backend; yields (the cell runner, the device workers get,
    cells at once)."""
    if backend == "local":
        with parallel_config(backend="loky", n_jobs=n_jobs or 1):
            yield run_cell, device, n_jobs or 1
        return
    try:
        import ray
        from ray.util.joblib import register_ray
    except ImportError:
        raise SweepError("the ray backend needs Ray: pip install 'patchbench[ray]'",
                         "--backend") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address)
    try:
        register_ray()
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cuda = device.startswith("cuda") or (device == "auto" and gpus > 0)
        if cuda and not gpus:
            raise SweepError("the Ray cluster has no GPU", "--device")
        workers = n_jobs or (gpus if cuda else int(resources.get("CPU", 1)))
        # Ray gives each worker its own GPU (CUDA_VISIBLE_DEVICES): workers just say "cuda".
        remote_args = {"num_gpus": 1} if cuda else {}
        runner = run_cell
        if workers == 1:  # joblib would run a single worker here, so send each cell to Ray
            remote = ray.remote(run_cell).options(**remote_args)
            runner = functools.partial(_on_ray, ray, remote)
        with parallel_config(backend="ray", n_jobs=workers, ray_remote_args=remote_args or None):
            yield runner, ("cuda" if cuda else "cpu"), workers
    finally:
        if started:
            ray.shutdown()


def _on_ray(ray: Any, remote: Any, cell: Cell, job: Job) -> Outcome:
    return ray.get(remote.remote(cell, job))


def run_cell(cell: Cell, job: Job) -> Outcome:
    """Certify one cell and write its files; anything the defense raises fails this cell only."""
    results_dir = Path(job.results_dir)
    if not job.force and is_finished(results_dir, cell.id):
        return Outcome(cell.id, "skipped")  # a concurrent run finished it meanwhile
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu"
                              ) if job.device == "auto" else torch.device(job.device)
        data = job.splits.get(cell.dataset, cell.split, job.data_dir, job.download)
        data = data.subset(cell.n_images)
        defense = get_defense(cell.defense).from_params(cell.params)
        # the checkpoint's weights, read by the cell's defense: certify-only parameters (a
        # vote threshold) may differ from those the weights were trained with
        loaded = dataclasses.replace(load_model(cell, defense, job, device), defense=defense)
        log(f"cell {cell.id} ({cell.label}): model {model_text(loaded.path, loaded.sha256)}")
        patches = parse_patches(list(cell.patches))
        evaluation = certify_split(defense, loaded.model, data, patches, cell.conditions,
                                   job.batch_size, device, job.show_progress, cell.precision)
        summary = summarize(evaluation, patches, cell.conditions)
        path = write_cell(results_dir, cell.id, loaded, data, summary, evaluation, device,
                          cell.precision)
    except ResultsError:
        raise  # the results folder itself is broken: no cell can be recorded
    except Exception as err:  # isolation: a failing defense fails its own cell only
        message = str(err).splitlines()[0] if str(err) else ""
        reason = f"{type(err).__name__}: {message}"
        write_failure(results_dir, cell.id, cell.identity, reason, traceback.format_exc())
        log(f"cell {cell.id} ({cell.label}): failed: {reason}")
        return Outcome(cell.id, "failed", reason)
    log(f"cell {cell.id} ({cell.label}): {len(data)} images certified in "
        f"{evaluation.certify_seconds:.1f} s -> {path}")
    return Outcome(cell.id, "computed")


def load_model(cell: Cell, defense: Defense, job: Job, device: torch.device) -> Checkpoint:
    """The cell's model: its explicit checkpoint, the cached one, or a newly trained one."""
    if cell.checkpoint:
        loaded = load_checkpoint(cell.checkpoint, defense=cell.defense, dataset=cell.dataset)
        if loaded.sha256 != cell.checkpoint_sha256:
            raise CheckpointError(f"checkpoint {cell.checkpoint} changed during the sweep")
        return loaded
    config = TrainConfig(**{**defense.train_defaults, **cell.train})
    key = model_key(defense, cell.dataset, config)
    path = find_checkpoint(key)
    if path is None:
        path = new_checkpoint_path(key)
        train_and_save(defense, load_dataset(cell.dataset, "train", job.data_dir, job.download),
                       config, device, path, job.show_progress, log)
    return load_checkpoint(path, defense=cell.defense, dataset=cell.dataset)


def model_text(path: str | Path, sha256: str) -> str:
    """How a run names the model it certifies: zoo name or path, and hash."""
    name = name_of(path)
    return f"{name} ({path}, sha256 {sha256[:12]})" if name else f"{path} (sha256 {sha256[:12]})"


def finished_model(cell: Cell) -> str:
    """"model NAME; " (or the file) of a finished cell whose model is at hand, without
    loading it; "" where it is not (trained elsewhere, a plugin's)."""
    path = Path(cell.checkpoint) if cell.checkpoint else (
        find_checkpoint(cell.model) if cell.model else None)
    return f"model {name_of(path) or path}; " if path else ""


def untrained(cells: Sequence[Cell]) -> list[Cell]:
    """One cell per model that is neither shipped nor cached (it will be trained)."""
    found: dict[str, Cell] = {}
    for cell in cells:
        if cell.model and not cell.checkpoint and find_checkpoint(cell.model) is None:
            found.setdefault(cell.model, cell)
    return list(found.values())


def announce_training(cells: Sequence[Cell], allow_train: bool, data_dir: str | Path | None,
                      download: bool, device: str) -> None:
    """Before any work: each model the sweep must train, with its estimated time; with
    ``allow_train`` False, a missing model is an error instead (CheckpointError)."""
    missing = untrained(cells)
    if missing and not allow_train:
        cell, more = missing[0], len(missing) - 1
        raise CheckpointError(
            f"no trained model for {cell.label} ({cell.model}) in checkpoints/ or the cache, "
            f"and --no-train is set{f' ({more} more such models)' if more else ''}; "
            "`patchbench models` lists the shipped ones")
    here = torch.device(device if device.startswith("cuda") and torch.cuda.is_available()
                        else "cpu")
    training_data = functools.cache(lambda name: load_dataset(name, "train", data_dir, download))
    for cell in missing:
        log(f"cell {cell.id} ({cell.label}): no trained model {cell.model} (shipped or "
            f"cached), so it is trained first: {training_estimate(cell, training_data, here)}")


def training_estimate(cell: Cell, training_data: Callable[[str], ImageData],
                      device: torch.device) -> str:
    """``estimate_text`` of the cell's training, or why there is none."""
    try:
        defense = get_defense(cell.defense).from_params(cell.params)
        return estimate_text(defense, training_data(cell.dataset), TrainConfig(**cell.train),
                             device)
    except Exception as err:  # the cell itself reports what is wrong
        return f"time not estimated ({type(err).__name__})"


def collect(results_dir: Path, cells: list[Cell], outcomes: list[Outcome]) -> pd.DataFrame:
    """Rows of every cell as written on disk, with this sweep's status of each."""
    by_cell = {o.cell: o for o in outcomes}
    frames = []
    for cell in cells:
        outcome = by_cell.get(cell.id, Outcome(cell.id, "skipped"))
        if outcome.status == "failed":
            frame = pd.DataFrame([{
                "cell": cell.id, "defense": cell.defense,
                "params": json.dumps(cell.params, sort_keys=True, default=str),
                **{f"param_{k}": v for k, v in cell.params.items()},
                "dataset": cell.dataset, "split": cell.split, "n_images": cell.n_images}])
        else:
            frame = read_rows(rows_path(results_dir, cell.id))
        frames.append(frame.assign(status=outcome.status, reason=outcome.reason))
    return pd.concat(frames, ignore_index=True)
