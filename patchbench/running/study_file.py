"""A study file: a whole benchmark study as data, read with the standard library (TOML).

A study names its patch shapes and training recipes once and lists three kinds of step:
``[[certify]]`` (a sweep: a defense, a parameter grid, a recipe, a split, patch shapes),
``[[select]]`` (settings chosen on the ``val`` rows of earlier certify steps, by
``selection.select_setting``), ``[[attack]]`` (the empirical attack on one trained model)
and ``[[bench]]`` (``patchbench bench``: timings, random weights).
A parameter or recipe value ``{ chosen = "STEP" }`` is the value the select step STEP chose
for it (a recipe field ``f`` as the selected ``train_f``). ``[report]`` says where the
report goes. Outputs are relative to the working folder (``[study] results``; each step's
``results`` inside it), files the study reads (``[report] claims``) to the study file.
Everything is checked when the file is read: a mistake is one ``StudyError`` naming the file,
the step and the key, before any work. See ``studies/fashion-mnist.toml``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchbench.patches import parse_patches
from patchbench.reporting.tables import SweepSpec
from patchbench.running.attack import AttackBudget
from patchbench.running.bench import BenchSettings

KINDS = ("certify", "select", "attack", "bench")


class StudyError(ValueError):
    """A study file that cannot be read or run as written."""


@dataclass(frozen=True)
class Chosen:
    """A value left to a select step: ``{ chosen = "STEP" }``."""

    step: str
    name: str  # the selected parameter: a defense parameter or train_<recipe field>


@dataclass(frozen=True)
class Model:
    """What a certify or attack step certifies: a defense configuration (or one trained model
    by zoo ``model`` name or ``checkpoint`` file) on a dataset split."""

    defense: str | None
    params: dict[str, Any]  # name -> value, list of values (certify only) or Chosen
    train: dict[str, Any]  # TrainConfig field -> value or Chosen
    dataset: str
    split: str
    n_images: int | None
    patches: tuple[str, ...]
    results: str  # inside the study's results folder ("" = the folder itself)
    model: str | None  # a zoo model name
    checkpoint: str | None  # a checkpoint file (relative to the working folder)

    @property
    def needs(self) -> set[str]:
        """The select steps whose choices this step waits for."""
        values = [*self.params.values(), *self.train.values()]
        return {v.step for v in values if isinstance(v, Chosen)}


@dataclass(frozen=True)
class Certify(Model):
    conditions: tuple[str, ...] | None = None  # None: every condition of the defense
    precision: str = "fp32"


@dataclass(frozen=True)
class Attack(Model):
    budget: AttackBudget = field(default_factory=AttackBudget)


@dataclass(frozen=True)
class Select:
    among: tuple[str, ...]  # certify steps on val whose cells are the candidates
    params: tuple[str, ...]  # chosen jointly
    patch: str = "5x5"
    condition: str | None = None  # None: the defense's first condition
    clean_tolerance: float = 0.01
    where: dict[str, Any] = field(default_factory=dict)

    @property
    def needs(self) -> set[str]:
        return set(self.among)


@dataclass(frozen=True)
class Bench:
    """``patchbench bench``: certification timed against the bare forward passes (random
    weights, synthetic images) for each configuration of the defenses' parameter grid."""

    defenses: tuple[str, ...]
    # defense -> its parameters (name -> value, list of values or Chosen); a flat table in
    # the file goes to every defense that has the parameter, as for ``bench`` and ``run``
    params: dict[str, dict[str, Any]]
    settings: BenchSettings
    results: str = "bench"  # inside the study's results folder

    @property
    def needs(self) -> set[str]:
        return {v.step for own in self.params.values() for v in own.values()
                if isinstance(v, Chosen)}


@dataclass(frozen=True)
class Step:
    name: str
    kind: str  # one of KINDS
    spec: Certify | Select | Attack | Bench
    note: str = ""  # the step's ``note``: why it is in the study


@dataclass(frozen=True)
class ReportSpec:
    out: str = "reports"
    readme: str | None = None
    gallery_images: int = 3
    claims: Path | None = None  # a claims file (patchbench.reporting.claims), beside the study file
    sweep: SweepSpec | None = None  # the parameter sweep shown as one table


@dataclass(frozen=True)
class Study:
    path: Path
    title: str
    results: str
    steps: tuple[Step, ...]
    report: ReportSpec | None

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)


def load_study(path: str | Path) -> Study:
    """Read and check a study file (StudyError, one line, on any mistake)."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"no study file {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise StudyError(f"{path}: cannot read the study file: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise StudyError(f"{path}: not valid TOML: {err}") from None
    return Reader(path, doc).study()


class Reader:
    """Turns the TOML document into a Study, naming the place of each mistake."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path, self.doc = path, doc

    def fail(self, where: str, message: str) -> StudyError:
        return StudyError(f"{self.path}: {where}: {message}")

    def study(self) -> Study:
        self.keys(self.doc, "the file", {"study", "shapes", "recipes", "report", *KINDS})
        head = self.table(self.doc, "study", "the file")
        self.keys(head, "[study]", {"title", "dataset", "results"})
        self.dataset = self.text(head, "dataset", "[study]", "fashion-mnist")
        self.shapes = {name: self.patch_list(value, f"[shapes] {name}")
                       for name, value in self.table(self.doc, "shapes", "the file").items()}
        self.recipes = self.table(self.doc, "recipes", "the file")
        for name, recipe in self.recipes.items():
            if not isinstance(recipe, dict):
                raise self.fail(f"[recipes] {name}", "a recipe is a table of training options")
        steps: list[Step] = []
        for kind in KINDS:
            entries = self.doc.get(kind, [])
            if not isinstance(entries, list):
                raise self.fail(f"[[{kind}]]", "steps are an array of tables ([[...]])")
            steps += [self.step(kind, entry, i) for i, entry in enumerate(entries)]
        self.check_names(steps)
        report = self.doc.get("report")
        return Study(self.path, self.text(head, "title", "[study]", self.path.stem),
                     self.text(head, "results", "[study]", "results"), tuple(steps),
                     None if report is None else self.report(report))

    def step(self, kind: str, entry: Any, index: int) -> Step:
        where = f"[[{kind}]] #{index + 1}"
        if not isinstance(entry, dict):
            raise self.fail(where, "a step is a table")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise self.fail(where, "every step needs a name")
        where = f"[[{kind}]] {name!r}"
        note = self.text(entry, "note", where, "")
        entry = {k: v for k, v in entry.items() if k not in ("name", "note")}
        spec = {"certify": self.certify, "select": self.select, "attack": self.attack,
                "bench": self.bench}[kind]
        return Step(name, kind, spec(entry, where), note)

    def model_fields(self, entry: dict, where: str, extra: set[str]) -> dict[str, Any]:
        self.keys(entry, where, {"defense", "params", "train", "dataset", "split", "n_images",
                                 "patches", "results", "model", "checkpoint", *extra})
        if "patches" not in entry:
            raise self.fail(where, "patches is required")
        if not ("defense" in entry or "model" in entry or "checkpoint" in entry):
            raise self.fail(where, "name a defense (or a zoo model or a checkpoint)")
        if "model" in entry and "checkpoint" in entry:
            raise self.fail(where, "model and checkpoint each name a model: give one")
        n_images = entry.get("n_images")
        if n_images is not None and (not isinstance(n_images, int) or n_images < 1):
            raise self.fail(where, f"n_images must be a positive integer, not {n_images!r}")
        split = self.text(entry, "split", where, "test")
        if split not in ("train", "val", "test"):
            raise self.fail(where, f"unknown split {split!r}; choose from train, val, test")
        return {"defense": entry.get("defense"),
                "params": self.values(entry.get("params", {}), f"{where} params"),
                "train": self.recipe(entry.get("train", {}), where),
                "dataset": self.text(entry, "dataset", where, self.dataset), "split": split,
                "n_images": n_images, "patches": self.patches(entry["patches"], where),
                "results": self.text(entry, "results", where, ""),
                "model": entry.get("model"), "checkpoint": entry.get("checkpoint")}

    def certify(self, entry: dict, where: str) -> Certify:
        common = self.model_fields(entry, where, {"conditions", "precision"})
        conditions = entry.get("conditions")
        if conditions is not None and (not isinstance(conditions, list) or not all(
                isinstance(c, str) for c in conditions) or not conditions):
            raise self.fail(where, "conditions is a list of names, e.g. [\"tight\"]")
        return Certify(**common, conditions=tuple(conditions) if conditions else None,
                       precision=self.text(entry, "precision", where, "fp32"))

    def attack(self, entry: dict, where: str) -> Attack:
        common = self.model_fields(entry, where, {"budget"})
        if any(isinstance(v, list) for v in common["params"].values()):
            raise self.fail(where, "an attack is of one model: one value per parameter")
        budget = self.table(entry, "budget", where)
        try:
            return Attack(**common, budget=AttackBudget(**budget))
        except (TypeError, ValueError) as err:
            raise self.fail(f"{where} budget", str(err)) from None

    def select(self, entry: dict, where: str) -> Select:
        self.keys(entry, where, {"among", "params", "patch", "condition", "clean_tolerance",
                                 "where"})
        among = entry.get("among")
        among = [among] if isinstance(among, str) else among
        params = entry.get("params")
        params = [params] if isinstance(params, str) else params
        for key, value in (("among", among), ("params", params)):
            if not value or not all(isinstance(v, str) for v in value):
                raise self.fail(where, f"{key} is a name or a list of names")
        tolerance = entry.get("clean_tolerance", 0.01)
        if not isinstance(tolerance, int | float) or not 0 <= tolerance <= 1:
            raise self.fail(where, f"clean_tolerance is a fraction in [0, 1], not {tolerance!r}")
        patch = self.text(entry, "patch", where, "5x5")
        self.patch_list([patch], f"{where} patch")
        return Select(tuple(among), tuple(params), patch, entry.get("condition"),
                      float(tolerance), dict(self.table(entry, "where", where)))

    def bench(self, entry: dict, where: str) -> Bench:
        fields = {"shape", "classes", "batch_sizes", "n_shapes", "repeats", "warmup",
                  "precision", "channels_last", "compile", "reference"}
        self.keys(entry, where, {"defense", "params", "results", *fields})
        defenses = entry.get("defense")
        defenses = [defenses] if isinstance(defenses, str) else defenses
        if not defenses or not all(isinstance(d, str) for d in defenses):
            raise self.fail(where, "defense is a name or a list of names")
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()
                    if k in fields}
        table = entry.get("params", {})
        per_defense = isinstance(table, dict) and bool(table) and set(table) <= set(defenses) \
            and all(isinstance(v, dict) for v in table.values())
        params = ({d: self.values(table.get(d, {}), f"{where} params {d}") for d in defenses}
                  if per_defense else {"": self.values(table, f"{where} params")})
        try:
            return Bench(tuple(defenses), params, BenchSettings(**settings),
                         self.text(entry, "results", where, "bench"))
        except (TypeError, ValueError) as err:
            raise self.fail(where, str(err)) from None

    def report(self, entry: Any) -> ReportSpec:
        if not isinstance(entry, dict):
            raise self.fail("[report]", "a table")
        self.keys(entry, "[report]", {"out", "readme", "gallery_images", "claims", "sweep"})
        gallery = entry.get("gallery_images", 3)
        if not isinstance(gallery, int) or gallery < 0:
            raise self.fail("[report]", f"gallery_images is a count, not {gallery!r}")
        claims = entry.get("claims")
        if claims is not None:
            claims = self.path.parent / self.text(entry, "claims", "[report]", "")
            if not claims.is_file():
                raise self.fail("[report]", f"no claims file {claims}")
        sweep = self.table(entry, "sweep", "[report]") if "sweep" in entry else None
        if sweep is not None:
            self.keys(sweep, "[report] sweep", {"defense", "param", "title"})
            if not all(isinstance(sweep.get(k), str) for k in ("defense", "param")):
                raise self.fail("[report] sweep", "needs defense and param (text)")
            sweep = SweepSpec(sweep["defense"], sweep["param"],
                              self.text(sweep, "title", "[report] sweep", ""))
        return ReportSpec(self.text(entry, "out", "[report]", "reports"), entry.get("readme"),
                          gallery, claims, sweep)

    # --- values ------------------------------------------------------------------------------

    def values(self, table: Any, where: str) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise self.fail(where, "a table of name = value")
        return {name: self.value(value, f"{where} {name}", name) for name, value in
                table.items()}

    def value(self, value: Any, where: str, name: str) -> Any:
        if isinstance(value, dict):
            if set(value) != {"chosen"} or not isinstance(value["chosen"], str):
                raise self.fail(where, 'a value is a number, text, list or { chosen = "STEP" }')
            return Chosen(value["chosen"], name)
        if isinstance(value, list) and (not value or any(isinstance(v, dict | list)
                                                         for v in value)):
            raise self.fail(where, "a list of values holds plain values, at least one")
        return value

    def recipe(self, value: Any, where: str) -> dict[str, Any]:
        """``train``: a table, or the name of a ``[recipes]`` entry."""
        if isinstance(value, str):
            if value not in self.recipes:
                raise self.fail(where, f"unknown recipe {value!r}; [recipes] has "
                                       f"{', '.join(self.recipes) or 'none'}")
            value = self.recipes[value]
        train = self.values(value, f"{where} train")
        for name, item in train.items():
            if isinstance(item, list):
                raise self.fail(f"{where} train {name}", "one value per recipe field")
            if isinstance(item, Chosen):
                train[name] = Chosen(item.step, f"train_{name}")
        return train

    def patches(self, value: Any, where: str) -> tuple[str, ...]:
        """A ``[shapes]`` name, or a list of shapes."""
        if isinstance(value, str) and value in self.shapes:
            return self.shapes[value]
        return self.patch_list(value, f"{where} patches")

    def patch_list(self, value: Any, where: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str)
                                                                  for v in items):
            raise self.fail(where, "a list of patch shapes, e.g. [\"5x5\", \"2x12\"], or a "
                                   "[shapes] name")
        try:
            return tuple(str(p) for p in parse_patches(items))
        except ValueError as err:
            raise self.fail(where, str(err)) from None

    # --- structure -----------------------------------------------------------------------------

    def keys(self, table: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise self.fail(where, f"unknown key(s) {', '.join(unknown)}; allowed: "
                                   f"{', '.join(sorted(allowed))}")

    def table(self, parent: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
        value = parent.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(where, f"{key} is a table")
        return value

    def text(self, table: Mapping[str, Any], key: str, where: str, default: str) -> str:
        value = table.get(key, default)
        if not isinstance(value, str):
            raise self.fail(where, f"{key} is text, not {value!r}")
        return value

    def check_names(self, steps: list[Step]) -> None:
        """Unique names; references to steps that exist, of the right kind, without cycles."""
        names: dict[str, Step] = {}
        for step in steps:
            if step.name in names:
                raise self.fail(f"[[{step.kind}]] {step.name!r}", "a second step of this name")
            names[step.name] = step
        for step in steps:
            wanted = "certify" if step.kind == "select" else "select"
            for need in sorted(step.spec.needs):
                if need not in names or names[need].kind != wanted:
                    raise self.fail(f"[[{step.kind}]] {step.name!r}",
                                    f"refers to {need!r}, which is no {wanted} step")
            if step.kind == "select":
                for need in step.spec.needs:
                    if names[need].spec.split != "val":
                        raise self.fail(f"[[select]] {step.name!r}",
                                        f"settings are chosen on val; {need!r} certifies "
                                        f"{names[need].spec.split}")
        for step in steps:  # a chain that leads back to itself would wait forever
            seen, todo = set(), [step.name]
            while todo:
                current = names[todo.pop()]
                for need in current.spec.needs:
                    if need == step.name:
                        raise self.fail(f"[[{step.kind}]] {step.name!r}", "waits for itself")
                    if need not in seen:
                        seen.add(need)
                        todo.append(need)
