"""The ``patchbench`` command line: defenses, train, run."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import pandas as pd
import torch
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from patchbench import __version__
from patchbench.defense import (
    Defense,
    DefenseNotFoundError,
    ParameterError,
    UnknownDefenseError,
    get_defense,
    parameters,
    registered_defenses,
)
from patchbench.options import (
    CheckpointPath,
    DeviceType,
    PatchListType,
    flatten_patches,
    parse_extra_params,
)
from patchbench.patches import parse_patches
from patchbench.reporting.claims import ClaimsError
from patchbench.reporting.labels import value_text
from patchbench.reporting.readme import find_block
from patchbench.reporting.report import build_report, headline_block, update_readme
from patchbench.running import zoo
from patchbench.running.attack import AttackBudget, AttackUnsupportedError
from patchbench.running.attacking import plan_attack, run_attack
from patchbench.running.cache import model_key, new_checkpoint_path
from patchbench.running.checkpoint import (
    CheckpointError,
    checkpoint_meta,
)
from patchbench.running.data import (
    DATASETS,
    SPLITS,
    DatasetFormatError,
    DatasetNotFoundError,
    load_dataset,
)
from patchbench.running.results import ResultsError, load_results
from patchbench.running.selection import defense_rows, select_setting, selection_condition
from patchbench.running.study import StudyRun, add_seconds
from patchbench.running.study_file import Study, StudyError
from patchbench.running.sweep import BACKENDS, SweepError, model_text, run_sweep
from patchbench.running.train import (
    TRAIN_PRECISIONS,
    TrainConfig,
    duration_text,
    estimate_text,
    train_and_save,
)
from patchbench.running.zoo import UnknownModelError, ZooModel, find_model

# Errors a user can cause: shown as one line, never as a traceback.
USER_ERRORS = (DatasetNotFoundError, DatasetFormatError, CheckpointError, UnknownDefenseError,
               ResultsError, zoo.ZooError, StudyError, ClaimsError)
EXTRA_ARGS = {"ignore_unknown_options": True, "allow_extra_args": True}


class PatchbenchGroup(click.Group):
    """Turns user errors into one-line messages and Ctrl-C into exit code 130."""

    def invoke(self, ctx: click.Context):
        try:
            _handle_ctrl_c_here()
            return super().invoke(ctx)
        except DefenseNotFoundError as err:  # a mistyped name, like an unknown --dataset
            raise click.BadParameter(str(err), param_hint="'--defense'") from None
        except USER_ERRORS as err:
            raise click.ClickException(str(err).splitlines()[0] if str(err) else
                                       type(err).__name__) from None
        except KeyboardInterrupt:
            click.echo("Interrupted: finished results are kept.", err=True)
            raise click.exceptions.Exit(130) from None


def _handle_ctrl_c_here() -> None:
    """Ctrl-C raises KeyboardInterrupt again (``PatchbenchGroup.invoke`` turns it into exit code
    130), instead of the start-up handler of ``patchbench.__main__`` that exits at once."""
    if getattr(signal.getsignal(signal.SIGINT), "patchbench_startup", False):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def parameter_error(err: ValueError) -> click.UsageError:
    """A refused defense parameter as a usage error, naming its option where it says which."""
    if isinstance(err, ParameterError):
        return click.BadParameter(str(err), param_hint=f"'--{err.param.replace('_', '-')}'")
    return click.UsageError(str(err))


@contextmanager
def sweep_errors() -> Iterator[None]:
    """A library refusal (SweepError, AttackUnsupportedError) as the command's usage error."""
    try:
        yield
    except SweepError as err:
        if err.option:
            raise click.BadParameter(str(err), param_hint=f"'{err.option}'") from None
        raise click.UsageError(str(err)) from None
    except AttackUnsupportedError as err:  # "attack not supported by <defense>: it lacks ..."
        raise click.ClickException(str(err)) from None


@click.group(cls=PatchbenchGroup)
@click.version_option(__version__, prog_name="patchbench")
def cli() -> None:
    """Certified defenses against adversarial patches, benchmarked side by side."""


def main() -> None:
    cli(prog_name="patchbench")


@cli.command("defenses")
@click.argument("name", required=False)
@click.option("-v", "--verbose", is_flag=True, help="Also list each defense's parameters.")
def defenses_command(name: str | None, verbose: bool) -> None:
    """List the registered defenses (built-in and plugins), or one defense's parameters."""
    if name is not None:
        try:
            show_parameters(get_defense(name))
        except DefenseNotFoundError as err:
            raise click.BadParameter(str(err), param_hint="'NAME'") from None
        return
    table = Table("name", "distribution", "description", *(["parameters"] if verbose else []))
    for key, reg in registered_defenses().items():
        try:
            cls = reg.load()
        except Exception as err:  # a broken plugin is a warning, not a failure
            click.echo(f"warning: defense {key!r} from {reg.distribution} failed to load: "
                       f"{type(err).__name__}: {err}", err=True)
            continue
        row = [key, reg.distribution, cls.description]
        if verbose:
            row.append(", ".join(f"{k}={v}" for k, v in cls().params().items()))
        table.add_row(*row)
    Console().print(table)
    click.echo("parameters of one: patchbench defenses NAME", err=True)


def show_parameters(cls: type[Defense]) -> None:
    """``patchbench defenses NAME``: every parameter as an option, with type, default, help."""
    table = Table("option", "type", "default", "help",
                  title=f"{cls.name}: {cls.description}; conditions {', '.join(cls.conditions)}")
    for param in parameters(cls):
        note = " (certification only: one trained model serves every value)" \
            if param.certify_only else ""
        table.add_row(f"--{param.name.replace('_', '-')}", param.kind, str(param.default),
                      param.help + note)
    Console().print(table)
    recipe = make_train_config(cls(), {name.replace("-", "_"): None for name in TRAIN_OPTIONS})
    click.echo("training recipe (options of run and train): " + ", ".join(
        f"--{option} {value_text(getattr(recipe, field))}"
        for option, (field, _, _) in TRAIN_OPTIONS.items()))


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="One JSON list, every field, for tools.")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=zoo.SHIPPED_RESULTS, show_default="the repository's results/",
              help="Where the numbers come from: rows whose checkpoint hash is the model's.")
@click.option("--readme", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Also write the table into this file's zoo block.")
def models_command(as_json: bool, results_dir: Path, readme: Path | None) -> None:
    """List the trained models by name: shipped in checkpoints/, then cached on this machine,
    with clean and certified test accuracy at 5x5 (95% Wilson intervals)."""
    if readme is not None:
        find_block(readme, zoo.ZOO_BLOCK)  # a README without the block fails before any work
    models = zoo.zoo_models()
    numbers = zoo.model_numbers(models, zoo.zoo_rows(results_dir))
    if as_json:
        click.echo(json.dumps([zoo.model_record(m, numbers.get(m.name)) for m in models],
                              indent=1))
    else:
        table = Table(title=f"{len(models)} models; numbers: test split, from {results_dir}")
        for column in zoo.ZOO_COLUMNS:
            table.add_column(column, no_wrap=column == "name")
        for row in zoo.zoo_table(models, numbers):
            table.add_row(*row)
        # a pipe or file gets whole lines (rich would fold them at 80 columns)
        Console(width=None if sys.stdout.isatty() else 240).print(table)
        click.echo("certify one: patchbench run --model NAME --patch 5x5", err=True)
    if readme is not None:
        zoo.update_readme(readme, models, numbers)
        click.echo(f"model zoo written into {readme}", err=True)


def dataset_options(fn):
    fn = click.option("--download", is_flag=True,
                      help="Allow fetching the dataset from the internet when missing.")(fn)
    fn = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                      help="Folder holding the dataset files.")(fn)
    return click.option("--dataset", type=click.Choice(sorted(DATASETS)),
                        default="fashion-mnist", show_default=True)(fn)


TRAIN_OPTIONS = {  # option name -> (TrainConfig field, type, help)
    "epochs": ("epochs", click.IntRange(min=1), "Training epochs."),
    "train-batch-size": ("batch_size", click.IntRange(min=1), "Training batch size."),
    "seed": ("seed", int, "Seed for initialisation, shuffling and augmentation."),
    "crop-padding": ("crop_padding", click.IntRange(min=0),
                     "Random-crop augmentation padding in pixels."),
    "max-train-images": ("max_images", click.IntRange(min=0),
                         "Train on the first N images only (0: all)."),
    "hold-out-val": ("hold_out_val", click.BOOL,
                     "yes: leave the 'val' split out of training, to select settings on it."),
    "train-precision": ("precision", click.Choice(list(TRAIN_PRECISIONS)),
                        "Training arithmetic: fp32, or bf16 autocast (weights stay fp32)."),
}


def train_options(fn):
    """Training options; unset ones take the defense's recipe (``Defense.train_defaults``)."""
    for name, (_, kind, help_text) in reversed(TRAIN_OPTIONS.items()):
        fn = click.option(f"--{name}", type=kind, default=None,
                          help=f"{help_text} [default: the defense's recipe]")(fn)
    return fn


def train_overrides(kwargs: dict) -> dict:
    """The TrainConfig fields given on the command line."""
    return {field: kwargs[name.replace("-", "_")] for name, (field, _, _) in
            TRAIN_OPTIONS.items() if kwargs[name.replace("-", "_")] is not None}


def make_train_config(defense: Defense, kwargs: dict) -> TrainConfig:
    return TrainConfig(**{**defense.train_defaults, **train_overrides(kwargs)})


def make_defense(name: str, params: dict[str, str]) -> Defense:
    """A defense by name with the ``--param value`` pairs of the command line."""
    cls = get_defense(name)
    try:
        return cls.from_params(params)
    except ValueError as err:
        raise parameter_error(err) from None


def check_defense(defense: Defense, in_shape: tuple[int, int, int]) -> None:
    """``Defense.check``: parameters that cannot work on these images, before any work."""
    try:
        defense.check(tuple(in_shape))
    except ValueError as err:
        raise parameter_error(err) from None


def train_announced(defense: Defense, dataset: str, data_dir: Path | None, download: bool,
                    config: TrainConfig, device: torch.device, output: Path) -> None:
    """Check the configuration, say how long training will take, train and save."""
    data = load_dataset(dataset, "train", data_dir, download)
    check_defense(defense, data.in_shape)
    try:
        click.echo(f"training {defense.name} on {dataset}: "
                   f"{estimate_text(defense, data, config, device)}", err=True)
        train_and_save(defense, data, config, device, output,
                       log=lambda message: click.echo(message, err=True))
    except ValueError as err:
        raise click.UsageError(str(err)) from None


@cli.command("train", context_settings=EXTRA_ARGS)
@click.option("--defense", "defense_name", required=True, help="A registered defense name.")
@dataset_options
@train_options
@click.option("--device", type=DeviceType(), default="auto", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint path (default: the cache, named by the configuration hash).")
@click.pass_context
def train_command(ctx: click.Context, defense_name: str, dataset: str, data_dir: Path | None,
                  download: bool, device: torch.device, output: Path | None, **kwargs) -> None:
    """Train a defense's model; defense parameters follow as --name value (e.g. --rf 7)."""
    defense = make_defense(defense_name, parse_extra_params(ctx.args))
    config = make_train_config(defense, kwargs)
    output = output or new_checkpoint_path(model_key(defense, dataset, config))
    train_announced(defense, dataset, data_dir, download, config, device, output)
    click.echo(str(output))


def parse_conditions(ctx, param, value: str | None) -> list[str] | None:
    """A comma list; which names exist depends on the defense (checked by the sweep)."""
    if value is None:
        return None
    conditions = [c.strip() for c in value.split(",") if c.strip()]
    if not conditions:
        raise click.BadParameter(f"no condition in {value!r}")
    return conditions


def precision_option(fn):
    """``--precision fp32|bf16|fp16``: the floating-point precision votes are computed in."""
    from patchbench.running.evaluate import PRECISIONS

    return click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32",
                        show_default=True,
                        help="Precision of the model and images the votes come from.")(fn)


@cli.command("run", context_settings=EXTRA_ARGS)
@click.option("--defense", "defense_lists", multiple=True,
              help="Registered defense names, comma list (repeatable) [required, except with "
                   "--model or --checkpoint: the model's defense].")
@click.option("--patch", "patch_lists", type=PatchListType(), multiple=True, required=True,
              help="Patch shapes, e.g. 5x5,2x12 (repeatable).")
@click.option("--condition", callback=parse_conditions,
              help="Certification conditions, comma list [default: every condition of each "
              "defense; vote maps: tight,global; patchcleanser: masking].")
@dataset_options
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@click.option("--n-images", type=click.IntRange(min=1),
              help="Certify the first N images only [default: the whole split].")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="With --backend ray, each worker resolves it (one GPU per cell on CUDA).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@precision_option
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True)
@click.option("--checkpoint", type=CheckpointPath(),
              help="Certify this checkpoint instead of the configuration's cached one; its "
                   "defense, dataset and parameters are the defaults of --defense, --dataset "
                   "and the defense parameters.")
@click.option("--model", "model_name", metavar="NAME",
              help="Certify this zoo model (patchbench models lists them): its checkpoint, "
                   "defense, dataset and certification parameters.")
@click.option("--no-train", is_flag=True,
              help="A model that is neither shipped nor cached is an error, not trained.")
@click.option("--force", is_flag=True, help="Recompute finished cells (their files are replaced).")
@click.option("--backend", type=click.Choice(BACKENDS), default="local", show_default=True,
              help="local: joblib processes on this machine; ray: Ray's joblib backend.")
@click.option("--n-jobs", type=click.IntRange(min=1),
              help="Cells at once [default: 1 locally; on Ray, the cluster's GPUs (CUDA) or "
                   "CPUs].")
@click.option("--ray-address", help="Ray cluster to join, e.g. auto or HOST:6379 [default: "
                                    "RAY_ADDRESS, else a new local instance].")
@train_options
@click.pass_context
def run_command(ctx: click.Context, defense_lists: tuple[str, ...], patch_lists,
                condition: list[str], dataset: str, data_dir: Path | None, download: bool,
                split: str, n_images: int | None, device: str, batch_size: int,
                precision: str, results_dir: Path, checkpoint: Path | None,
                model_name: str | None, no_train: bool, force: bool, backend: str,
                n_jobs: int | None, ray_address: str | None, **kwargs) -> None:
    """Certify every model configuration of a sweep, training missing models.

    Defense parameters follow as --name value or --name v1,v2 (e.g. --rf 5,7,9); the
    cartesian product gives the cells; `patchbench defenses NAME` lists a defense's
    parameters with their types, defaults and meaning. Finished cells are skipped (--force
    recomputes). `patchbench models` lists the shipped models for --model.
    """
    params = {k: v.split(",") for k, v in parse_extra_params(ctx.args).items()}
    if model_name is not None:
        named = zoo_model(model_name, checkpoint)
        checkpoint = named.path
        for name, value in named.certify.items():  # the zoo's, unless given
            params.setdefault(name, [str(value)])
    if not defense_lists:
        name, dataset = model_defaults(ctx, "defense_lists", checkpoint, dataset)
        defense_lists = (name,)
    with sweep_errors():
        frame = run_sweep(list(defense_lists), flatten_patches(patch_lists), dataset, params,
                          split=split, n_images=n_images, conditions=condition,
                          train=train_overrides(kwargs), results_dir=results_dir, force=force,
                          device=device, batch_size=batch_size, data_dir=data_dir,
                          download=download, checkpoint=checkpoint, backend=backend,
                          n_jobs=n_jobs, ray_address=ray_address, precision=precision,
                          allow_train=not no_train)
    show_summary(frame, list(params))
    cells = frame.drop_duplicates("cell")
    counts = cells["status"].value_counts()
    click.echo(f"results: {results_dir / 'rows'} ({len(cells)} cells: "
               + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("computed", "skipped", "failed"))
               + ")", err=True)
    if counts.get("failed", 0):
        click.echo(f"Error: {counts['failed']} of {len(cells)} cells failed (reasons in "
                   f"{results_dir / 'failed'})", err=True)
        ctx.exit(3)


def zoo_model(name: str, checkpoint: Path | None) -> ZooModel:
    """``--model NAME``: the zoo model, or a usage error (unknown name, or a checkpoint too)."""
    if checkpoint is not None:
        raise click.UsageError("--model and --checkpoint each name a model: give one")
    try:
        return find_model(name)
    except UnknownModelError as err:
        raise click.BadParameter(str(err), param_hint="'--model'") from None


def model_defaults(ctx: click.Context, defense_param: str, checkpoint: Path | None,
                   dataset: str) -> tuple[str, str]:
    """(defense, dataset) when --defense is left out: the checkpoint's, its dataset unless
    --dataset was given; without a checkpoint, --defense is missing."""
    if checkpoint is None:
        raise click.MissingParameter(
            ctx=ctx, param=next(p for p in ctx.command.params if p.name == defense_param),
            message="Name one, or pass --model or --checkpoint.")
    meta = checkpoint_meta(checkpoint)
    if (ctx.get_parameter_source("dataset") is ParameterSource.DEFAULT
            and meta.get("dataset") in DATASETS):
        dataset = meta["dataset"]
    return meta["defense"], dataset


def show_summary(frame: pd.DataFrame, swept: list[str]) -> None:
    """One table for the whole sweep: a row per cell, patch shape and condition."""
    columns = [f"param_{k}" for k in swept if f"param_{k}" in frame]
    n_images = ", ".join(str(n) for n in frame["n_images"].dropna().astype(int).unique())
    table = Table("defense", *(c.removeprefix("param_") for c in columns), "patch",
                  "condition", "clean", "certified", "status",
                  title=f"{frame['cell'].nunique()} cells, {n_images} images each")
    for row in frame.to_dict("records"):
        done = row["status"] != "failed"
        table.add_row(row["defense"], *(_value(row[c]) for c in columns),
                      *((row["patch"], row["condition"], f"{row['clean_accuracy']:.1%}",
                         f"{row['certified_accuracy']:.1%}") if done else ("",) * 4),
                      row["status"])
    Console().print(table)


def _value(value) -> str:
    """A parameter as typed (columns that mix defenses turn ints into floats)."""
    if pd.isna(value):
        return ""
    return format(value, "g") if isinstance(value, float) else str(value)


@cli.command("report")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("reports"), show_default=True, help="Folder of report.md.")
@click.option("--dataset", help="Only these datasets (comma list).")
@click.option("--defense", help="Only these defenses (comma list).")
@click.option("--gallery-images", type=click.IntRange(min=0), default=3, show_default=True,
              help="Gallery images per configuration (0: no gallery).")
@click.option("--readme", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Also write the headline table and figures into this file's headline "
                   "block.")
@click.option("--study", "study_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Add what this study file's [report] asks for: its sweep table and its "
                   "published claims.")
def report_command(results_dir: Path, out_dir: Path, dataset: str | None, defense: str | None,
                   gallery_images: int, readme: Path | None, study_file: Path | None) -> None:
    """Tables, figures and findings of a results folder: report.md, CSV and LaTeX."""
    from patchbench.running.study import study_report
    from patchbench.running.study_file import load_study

    if readme is not None:
        headline_block(readme)  # a README without the block fails before any work
    extras = study_report(load_study(study_file).report) if study_file else None
    click.echo(str(build_report(results_dir, out_dir, dataset, defense, gallery_images,
                                extras)))
    if readme is not None:
        update_readme(readme, out_dir)
        click.echo(f"headline written into {readme}", err=True)


@cli.command("study")
@click.argument("study_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True,
              help="List every cell with its state (done, to train, to certify, to attack) "
                   "and estimated cost; nothing is trained, certified or written.")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Results folder [default: the study's [study] results].")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--no-train", is_flag=True,
              help="A model that is neither shipped nor cached is an error, not trained.")
@click.option("--no-report", is_flag=True, help="Leave the report (and README) as they are.")
@click.option("--force", is_flag=True, help="Recompute finished cells and attacks.")
@click.option("--backend", type=click.Choice(BACKENDS), default="local", show_default=True,
              help="Certify steps: local joblib processes, or Ray's joblib backend.")
@click.option("--n-jobs", type=click.IntRange(min=1), help="Cells at once (as for run).")
@click.option("--ray-address", help="Ray cluster to join (as for run).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding the dataset files.")
@click.pass_context
def study_command(ctx: click.Context, study_file: Path, dry_run: bool, results_dir: Path | None,
                  device: str, batch_size: int, no_train: bool, no_report: bool, force: bool,
                  backend: str, n_jobs: int | None, ray_address: str | None,
                  data_dir: Path | None) -> None:
    """Run a whole study file resumably: certify, choose on val, attack, report.

    Finished cells and attacks are skipped, so an interrupted study continues where it
    stopped. Exit code 3 if a cell failed, 4 if an attack broke a certified image.
    """
    from patchbench.running import study as studies
    from patchbench.running.study_file import load_study

    spec = load_study(study_file)
    options = studies.Options(results_dir, device, batch_size, backend, n_jobs, ray_address,
                              force, not no_train, str(data_dir) if data_dir else None)
    with sweep_errors():
        run = studies.run_study(spec, options, dry_run, log=lambda m: click.echo(m, err=True))
    show_study(spec, run, dry_run)
    if not dry_run and spec.report is not None and not no_report:
        report, readme = studies.report_study(spec, options)
        click.echo(f"report: {report}" + (f"; headline written into {readme}" if readme
                                          else ""), err=True)
    if run.failed:
        click.echo(f"Error: {run.failed} cell(s) failed (reasons in the step's failed/)",
                   err=True)
        ctx.exit(3)
    if run.violations:
        click.echo(f"Error: soundness violation: {run.violations} certified image(s) broken",
                   err=True)
        ctx.exit(4)


def show_study(spec: Study, run: StudyRun, dry_run: bool) -> None:
    """The study's cells, one row each, then a line of counts (and cost, on a dry run)."""
    table = Table("step", "kind", "cell", "configuration", "state",
                  *(["estimated"] if dry_run else []), title=spec.title)
    for state in run.states:
        cost = "" if state.seconds is None else duration_text(state.seconds)
        table.add_row(state.step, state.kind, state.cell, state.label,
                      state.state + (f" ({state.note})" if state.note else ""),
                      *([cost] if dry_run else []))
    Console(width=None if sys.stdout.isatty() else 240).print(table)
    counts = ", ".join(f"{n} {state}" for state, n in run.counts().items())
    left = add_seconds(*(s.seconds for s in run.states))
    click.echo(f"{spec.path}: {len(run.states)} entries: {counts}"
               + (f"; estimated {duration_text(left)} left" if dry_run and left else ""),
               err=True)


ATTACK_OPTIONS = {  # option name -> (AttackBudget field, type, help)
    "steps": ("steps", click.IntRange(min=0), "PGD steps per restart."),
    "restarts": ("restarts", click.IntRange(min=1), "Random starts per patch position."),
    "step-size": ("step_size", click.FloatRange(min=0, min_open=True),
                  "Signed-gradient step, in pixel units."),
    "position-stride": ("position_stride", click.IntRange(min=1),
                        "Grid of patch positions: every Nth top and left, and the last (1: all)."),
    "worst-positions": ("worst_positions", click.IntRange(min=0),
                        "Also the N positions per image with the smallest certified margin."),
    "chunk-cells": ("chunk_cells", click.IntRange(min=1),
                    "Relaxed vote cells per PGD batch (bounds memory)."),
    "attack-seed": ("seed", int, "Seed of the random starts."),
}


def attack_options(fn):
    """The attack budget; defaults are those of ``patchbench.running.attack.AttackBudget``."""
    defaults = AttackBudget()
    for name, (field, kind, help_text) in reversed(ATTACK_OPTIONS.items()):
        fn = click.option(f"--{name}", type=kind, default=getattr(defaults, field),
                          show_default=True, help=help_text)(fn)
    return fn


@cli.command("attack", context_settings=EXTRA_ARGS)
@click.option("--defense", "defense_name",
              help="A registered defense name [required, except with --model or --checkpoint: "
                   "the model's defense].")
@click.option("--patch", "patch_lists", type=PatchListType(), multiple=True, required=True,
              help="Patch shapes, e.g. 5x5,2x12 (repeatable).")
@dataset_options
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@click.option("--n-images", type=click.IntRange(min=1),
              help="Attack the first N images only [default: the whole split].")
@click.option("--device", type=DeviceType(), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images voted on and certified at once.")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True)
@click.option("--checkpoint", type=CheckpointPath(),
              help="Attack this checkpoint instead of the configuration's trained one.")
@click.option("--model", "model_name", metavar="NAME",
              help="Attack this zoo model (patchbench models lists them).")
@click.option("--force", is_flag=True, help="Attack again if this attack's cell is finished.")
@attack_options
@train_options
@click.pass_context
def attack_command(ctx: click.Context, defense_name: str | None, patch_lists, dataset: str,
                   data_dir: Path | None, download: bool, split: str, n_images: int | None,
                   device: torch.device, batch_size: int, results_dir: Path,
                   checkpoint: Path | None, model_name: str | None, force: bool,
                   **kwargs) -> None:
    """PGD patch attack on a trained model: empirical robust accuracy next to certified.

    Defense parameters follow as --name value and pick the trained checkpoint (nothing is
    trained here), or --checkpoint names one. Exit code 4 if the attack changes the prediction
    of a certified image (a soundness violation); the results are written first.
    """
    extra = parse_extra_params(ctx.args)
    if model_name is not None:
        named = zoo_model(model_name, checkpoint)
        checkpoint = named.path
        extra = {**{k: str(v) for k, v in named.certify.items()}, **extra}  # given ones win
    if defense_name is None:
        defense_name, dataset = model_defaults(ctx, "defense_name", checkpoint, dataset)
    budget = AttackBudget(**{field: kwargs[name.replace("-", "_")]
                             for name, (field, _, _) in ATTACK_OPTIONS.items()})
    with sweep_errors():
        plan = plan_attack(defense_name, flatten_patches(patch_lists), dataset, extra,
                           split=split, n_images=n_images, train=train_overrides(kwargs),
                           checkpoint=checkpoint, budget=budget, data_dir=data_dir,
                           download=download)
    click.echo(f"model {model_text(plan.checkpoint.path, plan.checkpoint.sha256)}", err=True)
    with sweep_errors():
        outcome = run_attack(plan, results_dir, device, batch_size, force)
    if outcome.status == "skipped":
        click.echo(f"skipped: attack cell {outcome.cell} is finished in {results_dir} (--force "
                   "to redo it)", err=True)
        return
    result, summary = outcome.result, outcome.summary
    table = Table("patch", "clean", *(f"certified ({c})" for c in result.conditions),
                  "empirical", "violations", title=f"{defense_name}: {len(plan.data)} images "
                                                   f"attacked in {result.attack_seconds:.1f} s")
    for row in summary.to_dict("records"):
        table.add_row(row["patch"], *(f"{row[k]:.1%}" for k in (
            "clean_accuracy", *(f"certified_accuracy_{c}" for c in result.conditions),
            "empirical_accuracy")), str(row["n_violations"]))
    Console().print(table)
    click.echo(f"results: {outcome.path}", err=True)
    if result.violations:
        click.echo(f"Error: soundness violation: {len(result.violations)} certified image(s) "
                   f"broken; first: {result.violations[0]}", err=True)
        ctx.exit(4)


# --- bench ----------------------------------------------------------------------------------

def parse_int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        numbers = tuple(dict.fromkeys(int(t) for t in value.split(",")))
    except ValueError:
        raise click.BadParameter(f"expected a comma list of integers, got {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return numbers


@cli.command("bench", context_settings=EXTRA_ARGS)
@click.option("--defense", "defense_names", required=True,
              help="Registered defense names, comma list.")
@click.option("--shape", type=click.Choice(["fashion-mnist", "cifar", "imagenet"]),
              default="fashion-mnist", show_default=True,
              help="Input shape: 1x28x28, 3x32x32 or 3x224x224 (synthetic pixels).")
@click.option("--classes", type=click.IntRange(min=2),
              help="Number of classes [default: 10; 1000 for imagenet].")
@click.option("--batch-size", "batch_sizes", default="16,64,256", show_default=True,
              callback=parse_int_list, help="Batch sizes to time, comma list.")
@click.option("--n-shapes", default="1,20", show_default=True, callback=parse_int_list,
              help="Numbers of patch shapes to certify at once, comma list (at most 20).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed runs per measurement (the median is reported).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
              help="Untimed runs per measurement first.")
@click.option("--device", type=DeviceType(), default="auto", show_default=True)
@precision_option
@click.option("--channels-last", is_flag=True,
              help="Images (and the reference's model) in channels-last layout; the "
                   "certified model always is (see evaluate.for_inference).")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model.")
@click.option("--reference/--no-reference", default=None,
              help="Also time the published-style reference [default: on, except imagenet].")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results/bench"), show_default=True)
@click.pass_context
def bench_command(ctx: click.Context, defense_names: str, shape: str, classes: int | None,
                  batch_sizes: tuple[int, ...], n_shapes: tuple[int, ...], repeats: int,
                  warmup: int, device: torch.device, precision: str, channels_last: bool,
                  compile_model: bool, reference: bool | None, results_dir: Path) -> None:
    """Time certification against the bare forward passes it needs (random weights,
    synthetic images); defense parameters follow as --name value or --name v1,v2."""
    from patchbench.running import bench

    names = [n.strip() for n in defense_names.split(",")]
    if "" in names:
        raise click.BadParameter(f"empty defense name in {defense_names!r}",
                                 param_hint="'--defense'")
    if max(n_shapes) > 20:
        raise click.BadParameter("at most 20 patch shapes", param_hint="'--n-shapes'")
    params = {k: v.split(",") for k, v in parse_extra_params(ctx.args).items()}
    try:
        defenses = bench.defense_configurations(names, params)
    except ValueError as err:
        raise parameter_error(err) from None
    settings = bench.BenchSettings(shape=shape, classes=classes, batch_sizes=batch_sizes,
                                   n_shapes=n_shapes, repeats=repeats, warmup=warmup,
                                   precision=precision, channels_last=channels_last,
                                   compile=compile_model, reference=reference)
    for configured in defenses:
        check_defense(configured, settings.in_shape)
    measurements, rows = bench.run_bench(defenses, settings, device,
                                         log=lambda msg: click.echo(msg, err=True))
    path = bench.write_bench_rows(results_dir, rows)
    Console().print(bench.bench_table(measurements, settings, device))
    click.echo(f"results: {path}", err=True)


def parse_one_patch(ctx, param, value: str) -> str:
    try:
        shapes = parse_patches(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    if len(shapes) != 1:
        raise click.BadParameter(f"one patch shape, not {value!r}")
    return str(shapes[0])


def parse_param_names(ctx, param, value: str) -> list[str]:
    names = [name.strip().replace("-", "_") for name in value.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise click.BadParameter(f"comma-separated distinct parameter names, not {value!r}")
    return names


def parse_where(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    where = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise click.BadParameter(f"NAME=VALUE, not {item!r}")
        where[name.strip().replace("-", "_")] = value.strip()
    return where


@cli.command("select")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results/validation"), show_default=True,
              help="Rows of a sweep certified on the 'val' split.")
@click.option("--defense", "defense_name", required=True, help="The defense whose rows to use.")
@click.option("--param", required=True, callback=parse_param_names,
              help="The swept parameter(s) to choose, jointly if several: threshold, or "
                   "ablation_size,threshold. Prints the chosen values in that order.")
@click.option("--where", multiple=True, callback=parse_where, metavar="NAME=VALUE",
              help="Only rows with this parameter value, e.g. ablation_size=2 (repeatable).")
@click.option("--patch", default="5x5", show_default=True, callback=parse_one_patch,
              help="Patch shape to optimise for.")
@click.option("--condition", help="Certification condition [default: the defense's first: "
              "tight for vote maps, masking for patchcleanser].")
@click.option("--clean-tolerance", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="Candidates may lose at most this much clean accuracy to the best one.")
def select_command(results_dir: Path, defense_name: str, param: list[str],
                   where: dict[str, str], patch: str, condition: str | None,
                   clean_tolerance: float) -> None:
    """Choose settings on validation rows: most certified among the near-best clean ones."""
    rows = load_results(results_dir)
    try:
        condition = selection_condition(rows, defense_name, condition)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--condition'") from None
    try:
        chosen = select_setting(defense_rows(rows, defense_name, results_dir), param, patch,
                                condition, clean_tolerance, where)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    picked = " ".join(f"{name} = {value}" for name, value in zip(param, chosen.value,
                                                                 strict=True))
    fixed = "".join(f", {name} = {value}" for name, value in where.items())
    table = Table(*param, "clean", f"certified {patch} {condition}", "eligible",
                  title=f"{defense_name}: {picked} on {results_dir}{fixed}")
    for row in chosen.table.to_dict("records"):
        table.add_row(*(str(row[name]) for name in param), f"{row['clean']:.1%}",
                      f"{row['certified']:.1%}", "yes" if row["eligible"] else "no")
    Console(stderr=True).print(table)
    click.echo(" ".join(str(value) for value in chosen.value))
