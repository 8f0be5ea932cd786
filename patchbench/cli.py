"""The ``patchbench`` command line: defenses, train, run."""

from __future__ import annotations

from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from patchbench import __version__
from patchbench.cache import find_checkpoint, model_key, new_checkpoint_path
from patchbench.certify import CONDITIONS
from patchbench.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from patchbench.data import DATASETS, SPLITS, DatasetFormatError, DatasetNotFoundError, load_dataset
from patchbench.defense import Defense, UnknownDefenseError, get_defense, registered_defenses
from patchbench.evaluate import certify_split, summarize
from patchbench.options import DeviceType, PatchListType, flatten_patches, parse_extra_params
from patchbench.patches import check_fits
from patchbench.results import ResultsError, write_cell
from patchbench.train import TrainConfig, train

# Errors a user can cause: shown as one line, never as a traceback.
USER_ERRORS = (DatasetNotFoundError, DatasetFormatError, CheckpointError, UnknownDefenseError,
               ResultsError)
EXTRA_ARGS = {"ignore_unknown_options": True, "allow_extra_args": True}


class PatchbenchGroup(click.Group):
    """Turns user errors into one-line messages and Ctrl-C into exit code 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as err:
            raise click.ClickException(str(err).splitlines()[0] if str(err) else
                                       type(err).__name__) from None
        except KeyboardInterrupt:
            click.echo("Interrupted: finished results are kept.", err=True)
            raise click.exceptions.Exit(130) from None


@click.group(cls=PatchbenchGroup)
@click.version_option(__version__, prog_name="patchbench")
def cli() -> None:
    """Certified defenses against adversarial patches, benchmarked side by side."""


def main() -> None:
    cli(prog_name="patchbench")


@cli.command("defenses")
@click.option("-v", "--verbose", is_flag=True, help="Also list each defense's parameters.")
def defenses_command(verbose: bool) -> None:
    """List the registered defenses (built-in and plugins)."""
    table = Table("name", "distribution", "description", *(["parameters"] if verbose else []))
    for name, reg in registered_defenses().items():
        try:
            cls = reg.load()
        except Exception as err:  # a broken plugin is a warning, not a failure
            click.echo(f"warning: defense {name!r} from {reg.distribution} failed to load: "
                       f"{type(err).__name__}: {err}", err=True)
            continue
        row = [name, reg.distribution, cls.description]
        if verbose:
            row.append(", ".join(f"{k}={v}" for k, v in cls().params().items()))
        table.add_row(*row)
    Console().print(table)


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
}


def train_options(fn):
    """Training options; unset ones take the defense's recipe (``Defense.train_defaults``)."""
    for name, (_, kind, help_text) in reversed(TRAIN_OPTIONS.items()):
        fn = click.option(f"--{name}", type=kind, default=None,
                          help=f"{help_text} [default: the defense's recipe]")(fn)
    return fn


def make_train_config(defense: Defense, kwargs: dict) -> TrainConfig:
    given = {field: kwargs[name.replace("-", "_")] for name, (field, _, _) in
             TRAIN_OPTIONS.items() if kwargs[name.replace("-", "_")] is not None}
    return TrainConfig(**{**defense.train_defaults, **given})


def make_defense(name: str, extra_args: list[str]) -> Defense:
    """A defense by name with ``--param value`` pairs from the command line."""
    cls = get_defense(name)
    try:
        return cls.from_params(parse_extra_params(extra_args))
    except ValueError as err:
        raise click.UsageError(str(err)) from None


def train_and_save(defense: Defense, dataset: str, data_dir: Path | None, download: bool,
                   config: TrainConfig, device: torch.device, output: Path) -> Path:
    data = load_dataset(dataset, "train", data_dir, download)
    try:
        model, metrics = train(defense, data, config, device)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    sha = save_checkpoint(output, defense, model, {
        "dataset": dataset, "in_shape": list(data.in_shape), "classes": list(data.classes),
        "train": metrics, "n_parameters": defense.num_parameters(model)})
    click.echo(f"saved {output} (sha256 {sha[:12]}; train accuracy "
               f"{metrics['train_accuracy']:.3f} in {metrics['train_seconds']:.0f} s)", err=True)
    return output


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
    defense = make_defense(defense_name, ctx.args)
    config = make_train_config(defense, kwargs)
    output = output or new_checkpoint_path(model_key(defense, dataset, config))
    train_and_save(defense, dataset, data_dir, download, config, device, output)
    click.echo(str(output))


def parse_conditions(ctx, param, value: str) -> list[str]:
    conditions = [c.strip() for c in value.split(",") if c.strip()]
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown or not conditions:
        raise click.BadParameter(f"unknown condition(s) {unknown or value!r}; choose from "
                                 f"{', '.join(CONDITIONS)}")
    return conditions


@cli.command("run", context_settings=EXTRA_ARGS)
@click.option("--defense", "defense_name", required=True, help="A registered defense name.")
@click.option("--patch", "patch_lists", type=PatchListType(), multiple=True, required=True,
              help="Patch shapes, e.g. 5x5,2x12 (repeatable).")
@click.option("--condition", default=",".join(CONDITIONS), show_default=True,
              callback=parse_conditions, help="Certification conditions.")
@dataset_options
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@click.option("--n-images", type=click.IntRange(min=1), help="Certify the first N images only.")
@click.option("--device", type=DeviceType(), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="Certify this checkpoint instead of the configuration's cached one.")
@train_options
@click.pass_context
def run_command(ctx: click.Context, defense_name: str, patch_lists, condition: list[str],
                dataset: str, data_dir: Path | None, download: bool, split: str,
                n_images: int | None, device: torch.device, batch_size: int, results_dir: Path,
                checkpoint: Path | None, **kwargs) -> None:
    """Load (or train) a defense's model and certify a split for every patch shape."""
    patches = flatten_patches(patch_lists)
    data = load_dataset(dataset, split, data_dir, download).subset(n_images)
    try:
        check_fits(patches, data.in_shape[1:])
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--patch'") from None
    defense = make_defense(defense_name, ctx.args)
    if checkpoint is None:
        config = make_train_config(defense, kwargs)
        key = model_key(defense, dataset, config)
        checkpoint = find_checkpoint(key) or train_and_save(
            defense, dataset, data_dir, download, config, device, new_checkpoint_path(key))
    loaded = load_checkpoint(checkpoint, defense=defense_name, dataset=dataset)
    given = parse_extra_params(ctx.args)
    clash = {k: v for k, v in defense.params().items()
             if k in given and loaded.defense.params()[k] != v}
    if clash:
        raise click.UsageError(f"checkpoint {checkpoint} was trained with "
                               f"{', '.join(f'{k}={loaded.defense.params()[k]}' for k in clash)}"
                               f", not {', '.join(f'{k}={v}' for k, v in clash.items())}")
    evaluation = certify_split(loaded.defense, loaded.model, data, patches, condition,
                               batch_size, device)
    summary = summarize(evaluation, patches, condition)
    path = write_cell(results_dir, loaded, data, summary, evaluation, device)
    show_summary(defense_name, summary, evaluation.certify_seconds, len(data))
    click.echo(f"results: {path}", err=True)


def show_summary(name: str, summary, seconds: float, n_images: int) -> None:
    table = Table("patch", "condition", "clean", "certified", title=(
        f"{name}: {n_images} images certified in {seconds:.1f} s"))
    for row in summary.itertuples():
        table.add_row(row.patch, row.condition, f"{row.clean_accuracy:.1%}",
                      f"{row.certified_accuracy:.1%}")
    Console().print(table)

