"""The model zoo: every trained model by a short stable name, with the numbers it reaches.

Shipped models are named in ``checkpoints/zoo.toml`` (a name stands for the weights and, where
the defense has certification-only parameters, the values chosen for them on ``val``); models
trained on this machine are listed from the cache by their file name (the configuration's
model key). The accuracies shown beside a model are read from result rows (by default the
repository's committed ``results/``) whose checkpoint hash is the model's: test split, the
largest run, 5x5, the defense's primary condition, with the report's 95% Wilson interval.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from patchbench.defense import get_defense
from patchbench.reporting.labels import param_parts
from patchbench.reporting.readme import markdown_table, write_block
from patchbench.reporting.stats import INTERVAL, wilson
from patchbench.reporting.tables import ordered, percent_interval
from patchbench.running.cache import SHIPPED, cache_dir, model_key
from patchbench.running.checkpoint import Checkpoint, CheckpointError, load_checkpoint, read_header
from patchbench.running.results import ResultsError, load_results, metric_of
from patchbench.running.train import TrainConfig, trained_recipe

MANIFEST = SHIPPED / "zoo.toml"
SHIPPED_RESULTS = SHIPPED.parent / "results"  # the committed rows the zoo's numbers come from
ZOO_PATCH = "5x5"


class ZooError(ValueError):
    """The zoo's manifest is malformed or names a file that is not there."""


class UnknownModelError(KeyError):
    """No model of that name; the message lists the names there are."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ZooModel:
    """One trained model: its file, what it is, and how it is certified by default."""

    name: str
    path: Path
    source: str  # "shipped" (checkpoints/) or "cache" (trained on this machine)
    defense: str
    dataset: str
    params: dict[str, Any]  # the defense's parameters as certified: trained ones + ``certify``
    certify: dict[str, Any]  # certification-only parameters set by the zoo entry
    recipe: dict[str, Any]  # the TrainConfig the weights were trained with
    sha256: str
    size_bytes: int
    n_parameters: int
    about: str = ""


@dataclass(frozen=True)
class Numbers:
    """A model's test accuracies at ZOO_PATCH, from the rows of one cell."""

    cell: str
    condition: str
    n_images: int
    n_correct: int
    n_certified: int

    @property
    def clean(self) -> tuple[float, float, float]:
        """(accuracy, low, high) as fractions."""
        return (self.n_correct / self.n_images, *wilson(self.n_correct, self.n_images))

    @property
    def certified(self) -> tuple[float, float, float]:
        return (self.n_certified / self.n_images, *wilson(self.n_certified, self.n_images))


@dataclass(frozen=True)
class Entry:
    file: str
    certify: dict[str, Any] = field(default_factory=dict)
    about: str = ""


def read_manifest(path: Path | None = None) -> dict[str, Entry]:
    """name -> entry of ``zoo.toml`` (default MANIFEST); a malformed manifest is a ZooError
    naming the entry."""
    path = path or MANIFEST
    if not path.is_file():
        return {}
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ZooError(f"malformed model zoo {path}: {err}") from None
    entries = {}
    for name, value in table.items():
        keys = set(value) if isinstance(value, dict) else set()
        if not isinstance(value, dict) or not isinstance(value.get("file"), str) or (
                keys - {"file", "certify", "about"}) or not isinstance(
                value.get("certify", {}), dict):
            raise ZooError(f"model zoo {path}: entry {name!r} needs file = \"...\" and may have "
                           "only certify = {...} and about = \"...\"")
        entries[name] = Entry(value["file"], dict(value.get("certify", {})),
                              str(value.get("about", "")))
    return entries


def zoo_models(include_cache: bool = True) -> list[ZooModel]:
    """The shipped models in manifest order, then the cached ones by file name."""
    models = [describe(name, SHIPPED / entry.file, "shipped", entry.certify, entry.about)
              for name, entry in read_manifest().items()]
    if include_cache:
        shipped = {m.path.name for m in models}
        for path in sorted((cache_dir() / "checkpoints").glob("*.pt")):
            if path.name in shipped:
                continue
            try:
                models.append(describe(path.stem, path, "cache", {}, ""))
            except CheckpointError:  # a broken cache file is not the zoo's: skip it
                continue
    return models


def describe(name: str, path: Path, source: str, certify: dict[str, Any], about: str
             ) -> ZooModel:
    """A model from its checkpoint's header (the weights are not rebuilt)."""
    if not path.is_file():
        raise ZooError(f"model {name!r}: its checkpoint {path} is missing")
    meta, sha = read_header(path)
    trained = meta.get("train", {})
    recipe = {**dataclasses.asdict(TrainConfig()), **trained_recipe(trained)}
    return ZooModel(name, path, source, meta["defense"], str(meta.get("dataset", "")),
                    {**meta.get("params", {}), **certify}, certify, recipe, sha,
                    path.stat().st_size, int(meta.get("n_parameters", 0)), about)


def find_model(name: str) -> ZooModel:
    """The model of that name, shipped or cached; UnknownModelError lists the names."""
    models = zoo_models()
    for model in models:
        if model.name == name:
            return model
    names = [m.name for m in models]
    raise UnknownModelError(f"unknown model {name!r}; choose from {', '.join(names)} "
                            "(patchbench models lists them with their numbers)")


def load_model(name: str, device: str | torch.device = "cpu") -> Checkpoint:
    """A zoo model ready to certify: its checkpoint (hash checked) with the defense set to the
    zoo's parameters, e.g. the vote threshold chosen on val for a smoothing model."""
    model = find_model(name)
    loaded = load_checkpoint(model.path, map_location=device)
    defense = type(loaded.defense).from_params(model.params)
    return dataclasses.replace(loaded, defense=defense, model=loaded.model.to(device))


def model_numbers(models: list[ZooModel], rows: pd.DataFrame) -> dict[str, Numbers]:
    """name -> the model's test numbers at ZOO_PATCH: the rows of its checkpoint hash and
    parameters (a threshold of its own), its largest, newest test cell."""
    needed = {"checkpoint_sha256", "split", "patch", "condition", "params", "n_images"}
    if rows.empty or not needed <= set(rows.columns):
        return {}
    rows = rows[(metric_of(rows) == "certified") & (rows["split"] == "test")
                & (rows["patch"] == ZOO_PATCH)]
    found = {}
    for model in models:
        mine = rows[(rows["checkpoint_sha256"] == model.sha256)
                    & rows["params"].map(lambda text, m=model: same_params(text, m.params))]
        if mine.empty:
            continue
        condition = ordered(set(mine["condition"]))[0]
        order = [c for c in ("n_images", "timestamp") if c in mine]
        best = mine[mine["condition"] == condition].sort_values(order, kind="stable").iloc[-1]
        found[model.name] = Numbers(str(best["cell"]), condition, int(best["n_images"]),
                                    int(best["n_correct"]), int(best["n_certified"]))
    return found


def same_params(text: object, params: dict[str, Any]) -> bool:
    """A row's ``params`` JSON holds exactly these values (parameters it lacks are ignored:
    rows of an older version)."""
    try:
        row = json.loads(text) if isinstance(text, str) else {}
    except ValueError:
        return False
    return all(row[k] == v for k, v in params.items() if k in row)


def zoo_rows(results_dir: Path = SHIPPED_RESULTS) -> pd.DataFrame:
    """The rows the numbers come from; none (an empty frame) if the folder holds none."""
    try:
        return load_results(results_dir)
    except ResultsError:
        return pd.DataFrame()


def name_of(path: str | Path) -> str | None:
    """The zoo name of a shipped checkpoint file (None for any other file)."""
    path = Path(path).resolve()
    if path.parent != SHIPPED.resolve():
        return None
    return next((name for name, entry in read_manifest().items() if entry.file == path.name),
                None)


def model_record(model: ZooModel, numbers: Numbers | None) -> dict[str, Any]:
    """Everything about a model as plain JSON types (``patchbench models --json``)."""
    record = {**dataclasses.asdict(model), "path": str(model.path),
              "default": is_default(model)}
    if numbers is None:
        return {**record, "test": None}
    clean, certified = numbers.clean, numbers.certified
    return {**record, "test": {
        "cell": numbers.cell, "patch": ZOO_PATCH, "condition": numbers.condition,
        "n_images": numbers.n_images, "clean_accuracy": clean[0], "clean_low": clean[1],
        "clean_high": clean[2], "certified_accuracy": certified[0],
        "certified_low": certified[1], "certified_high": certified[2]}}


ZOO_COLUMNS = ["name", "defense", "parameters", "training", "dataset", "clean (%)",
               f"{ZOO_PATCH} certified (%)", "test images", "default of", "size", "sha256"]


def zoo_table(models: list[ZooModel], numbers: dict[str, Numbers]) -> list[list[str]]:
    """One row of text per model, in ZOO_COLUMNS order (the CLI's and README's table)."""
    rows = []
    for model in models:
        found = numbers.get(model.name)
        rows.append([
            model.name, model.defense,
            " ".join(param_parts(model.defense, model.params)) or "defaults",
            recipe_text(model.recipe), model.dataset,
            *((percent_interval(100 * found.clean[0], found.n_images),
               percent_interval(100 * found.certified[0], found.n_images)
               + ("" if found.condition in ("tight", "masking") else f" ({found.condition})"),
               str(found.n_images)) if found else ("–", "–", "–")),
            f"--defense {model.defense}" if is_default(model) else "",
            f"{model.size_bytes / 1024:.0f} KiB", model.sha256[:12]])
    return rows


def is_default(model: ZooModel) -> bool:
    """The model ``run --defense <its defense>`` certifies on its dataset: the defense's
    default configuration (parameters and recipe) is this checkpoint's."""
    try:
        cls = get_defense(model.defense)
        default = cls()
    except Exception:  # a plugin that is not installed: not anyone's default here
        return False
    key = model_key(default, model.dataset, TrainConfig(**cls.train_defaults))
    return model.path.stem == key and model.params == default.params()


def recipe_text(recipe: dict[str, Any]) -> str:
    """e.g. "8 epochs, bf16, val held out"."""
    return ", ".join([f"{recipe['epochs']} epochs", str(recipe["precision"]),
                      "val held out" if recipe["hold_out_val"] else "trained on val"])



ZOO_BLOCK = "zoo"


def update_readme(readme: Path, models: list[ZooModel], numbers: dict[str, Numbers]) -> None:
    """README's zoo block: the table of the shipped models (cached ones are this machine's)."""
    shipped = [m for m in models if m.source == "shipped"]
    lines = [*markdown_table(ZOO_COLUMNS, zoo_table(shipped, numbers)), "",
             f"Numbers: the test split at {ZOO_PATCH} under the defense's primary condition "
             "(tight for vote maps, masking for PatchCleanser), from the committed rows whose "
             f"checkpoint hash is the model's (largest run), with {INTERVAL}s; parameters "
             "other than a defense's defaults are shown. `patchbench models --json` has every "
             "field.", ""]
    write_block(readme, ZOO_BLOCK, "patchbench models --readme", lines)


def shipped_names() -> dict[str, str]:
    """Checkpoint hash -> zoo name of every shipped model (how a report names its models)."""
    return {m.sha256: m.name for m in zoo_models(include_cache=False)}
