"""``patchbench report``: a results folder in; Markdown with tables, figures and findings out.

Everything but the gallery comes from the tidy rows (results.py) and per-image tables, so a
report can be rebuilt at any time without certifying again. The gallery also needs each
configuration's checkpoint (found by its hash in ``checkpoints/`` or the cache) and its
dataset; without them it is skipped with a note. Tables are written as CSV (full precision)
and LaTeX beside report.md.

Certification rows (``patchbench run``; ``metric`` "certified", or none in older files) and
attack rows (``patchbench attack``, ``metric`` "empirical") are read apart: the certified
vs attacked section compares the two on the images the attack ran on, and a folder of attack
rows alone still gives a report (that section only). Benchmark rows are left out.
"""

from __future__ import annotations

import datetime as dt
import json
import numbers
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

from patchbench.reporting.choice import RULE, Choice, config_identity, val_choices
from patchbench.reporting.claims import ClaimSet, claims_sentence, claims_table
from patchbench.reporting.findings import attack_sentences, findings
from patchbench.reporting.gallery import (
    Example,
    Explanation,
    GalleryUnavailable,
    GalleryUnsupported,
    gallery_examples,
)
from patchbench.reporting.integrity import chance_levels, check_integrity
from patchbench.reporting.labels import config_label
from patchbench.reporting.paired import PairedTests
from patchbench.reporting.readme import find_block, markdown_table, write_block
from patchbench.reporting.stats import INTERVAL, wilson
from patchbench.reporting.tables import (
    OWN_PREFIX,
    TIME,
    SweepSpec,
    Table,
    accuracy_table,
    attack_table,
    column,
    configs_table,
    configurations,
    gain_table,
    headline_table,
    parse_params,
    primary_of_rows,
    sweep_configs,
    sweep_table,
    text_column,
)
from patchbench.running.atomic import atomic_path
from patchbench.running.cache import LEGACY_RECIPE_FIELDS
from patchbench.running.data import ImageData
from patchbench.running.results import (
    CERTIFIED,
    EMPIRICAL,
    ResultsError,
    load_failures,
    load_results,
    metric_of,
    per_image_path,
    read_rows,
)
from patchbench.running.train import TrainConfig
from patchbench.running.zoo import shipped_names

IDENTITY = ("defense", "dataset", "patch")
RECIPE_DEFAULTS = {k: v for k, v in asdict(TrainConfig()).items() if k not in LEGACY_RECIPE_FIELDS}
NUMBERS = ("patch_h", "patch_w", "n_images", "clean_accuracy")  # every row's
CERTIFIED_NUMBERS = ("certified_accuracy",)  # a certification row's, with its "condition"
OPTIONAL_NUMBERS = ("n_parameters", "certify_seconds", "forward_seconds", "robust_accuracy",
                    "empirical_accuracy", "certified_accuracy_tight",
                    "certified_accuracy_global", "n_attacked", "n_violations", "n_robust",
                    "n_correct", "attack_seconds")
# Where an attack row (metric == "empirical") keeps its accuracy: the first column present
# (robust_accuracy: rows of earlier versions).
EMPIRICAL_VALUES = ("empirical_accuracy", "robust_accuracy")


@dataclass
class Selected:
    """The rows a report is made of, named (``config``) and in reading order."""

    certified: pd.DataFrame  # newest certification row per configuration, shape, condition
    empirical: pd.DataFrame  # newest attack row per configuration, split and shape
    runs: pd.DataFrame  # every certification row, to match attacks with
    params: dict[str, dict]  # configuration key -> its parameters and training recipe
    choices: dict[tuple[str, str], Choice]  # (dataset, defense) -> its choice on val
    chance: dict[str, float]  # cell -> share of its images in the most common class


@dataclass(frozen=True)
class StudyReport:
    """What a study file's ``[report]`` adds: its sweep table and its published claims."""

    sweep: SweepSpec | None = None
    claims: ClaimSet | None = None


def build_report(results_dir: str | Path, out_dir: str | Path = "reports",
                 dataset: str | None = None, defense: str | None = None,
                 gallery_images: int = 3, study: StudyReport | None = None) -> Path:
    """Write ``out_dir/report.md`` with its figures and tables; return its path.

    ``study`` adds what a study file's ``[report]`` asks for: its sweep table and its
    published claims.

    ``dataset`` and ``defense`` keep only those rows (comma lists allowed). Raises
    ResultsError, one line, for a missing, empty or malformed results folder, a filter that
    leaves nothing, or an output folder that cannot be written.
    """
    results_dir, out = Path(results_dir), Path(out_dir)
    rows = check_rows(load_results(results_dir), results_dir)
    val = validation_rows(results_dir, rows)
    if (text_column(rows, "split") != "val").any():  # val rows choose; test rows report
        rows = rows[text_column(rows, "split") != "val"]
    rows = select(rows, results_dir, dataset, defense)
    failed = failures(results_dir, dataset, defense)
    choices = val_choices(val[wanted(val["dataset"], dataset) & wanted(val["defense"], defense)]
                          if len(val) else val)
    check_integrity(rows, results_dir)
    selected = split_and_name(rows, results_dir, choices, chance_levels(rows, results_dir))
    filters = " ".join(f"--{k} {v}" for k, v in (("dataset", dataset), ("defense", defense))
                       if v)
    try:
        return write_report(out, results_dir, filters, selected, failed, gallery_images,
                            study or StudyReport())
    except ResultsError:
        raise
    except OSError as err:
        raise ResultsError(f"cannot write the report to {out}: {err.strerror or err}") from None


def check_rows(rows: pd.DataFrame, source: Path) -> pd.DataFrame:
    """The certification and attack rows with their numbers typed (other rows, such as
    benchmarks, left out); a one-line error for a malformed file or when none is left."""
    metric = metric_of(rows)
    good = rows.assign(metric=metric)[metric.isin([CERTIFIED, EMPIRICAL])]
    if good.empty:
        others = sorted(set(metric))
        raise ResultsError(f"results folder {source} holds no result rows of a certification "
                           f"or an attack (only rows with metric {', '.join(others[:3])}"
                           f"{', ...' if len(others) > 3 else ''})")
    certified = (good["metric"] == CERTIFIED).any()
    needed = (*IDENTITY, *(("condition",) if certified else ()), *NUMBERS,
              *(CERTIFIED_NUMBERS if certified else ()))
    missing = [c for c in needed if c not in good]
    if missing:
        raise ResultsError(f"results in {source} lack column(s) {', '.join(missing)}")
    if (good["metric"] == EMPIRICAL).any() and not any(c in good for c in EMPIRICAL_VALUES):
        raise ResultsError(f"attack rows in {source} lack column {EMPIRICAL_VALUES[0]}")
    if good[list(IDENTITY)].isna().any(axis=None):
        raise ResultsError(f"results in {source} hold rows without a defense, dataset or patch")
    own = [c for c in good if c.startswith(OWN_PREFIX) and c not in OPTIONAL_NUMBERS]
    for name in (*NUMBERS, *CERTIFIED_NUMBERS, *OPTIONAL_NUMBERS, *own):
        if name in good:
            try:
                good[name] = pd.to_numeric(good[name])
            except (TypeError, ValueError):
                raise ResultsError(f"results in {source}: column {name} holds a value that "
                                   "is not a number") from None
    for name in IDENTITY:
        good[name] = good[name].astype(str)
    good["patch_area"] = good["patch_h"] * good["patch_w"]
    return good


VALIDATION = "validation"  # <results>/validation/<study>/rows/: the rows settings are chosen on


def validation_rows(results_dir: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """The certification rows of the ``val`` split: those under ``<results>/validation/``
    (one folder per selection study) and any beside the test rows; typed like ``rows``."""
    files = sorted((results_dir / VALIDATION).glob("**/rows/*.csv"))
    found = [rows[text_column(rows, "split") == "val"]]
    for path in files:
        folder = path.parent.parent
        typed = check_rows(read_rows(path), folder)
        found.append(typed[(text_column(typed, "split") == "val")
                           & (typed["metric"] == CERTIFIED)])
    val = pd.concat(found, ignore_index=True)
    return val[val["metric"] == CERTIFIED]


def select(rows: pd.DataFrame, source: Path, dataset: str | None,
           defense: str | None) -> pd.DataFrame:
    """The rows of the asked datasets and defenses; a one-line error when none are left."""
    kept = rows[wanted(rows["dataset"], dataset) & wanted(rows["defense"], defense)]
    if kept.empty:
        raise ResultsError(
            f"no results in {source} match --dataset {dataset or '*'} --defense "
            f"{defense or '*'}; it holds datasets {', '.join(sorted(set(rows['dataset'])))} "
            f"and defenses {', '.join(sorted(set(rows['defense'])))}")
    return kept


def wanted(values: pd.Series, names: str | None) -> pd.Series:
    """Which values a filter (a comma list, or None for all) keeps."""
    if not names:
        return pd.Series(True, index=values.index)
    return values.isin([n.strip() for n in names.split(",")])


def failures(results_dir: Path, dataset: str | None, defense: str | None) -> pd.DataFrame:
    """The cells of the selection that failed and have no rows (results/failed/)."""
    failed = load_failures(results_dir)
    identity = failed["identity"].map(lambda i: i if isinstance(i, dict) else {})
    failed = failed.assign(defense=identity.map(lambda i: i.get("defense", "?")),
                           dataset=identity.map(lambda i: i.get("dataset", "?")),
                           reason=failed["reason"].astype(str).str.split("\n").str[0])
    failed = failed[wanted(failed["dataset"], dataset) & wanted(failed["defense"], defense)]
    return failed[["cell", "defense", "dataset", "reason", "timestamp"]].reset_index(drop=True)


def split_and_name(rows: pd.DataFrame, source: Path, choices: dict[tuple[str, str], Choice],
                   chance: dict[str, float]) -> Selected:
    """Certified and empirical rows, newest per configuration and shape, named and ordered.

    A configuration is (dataset, defense, parameters, checkpoint), the same for a model's
    certification and attack rows; ``params`` maps its key to its parameters and training
    recipe (attack rows lack the recipe: it comes from the certification rows). Rows without a
    ``metric`` column (older files) are certified ones.
    """
    sha, text = text_column(rows, "checkpoint_sha256"), text_column(rows, "params")
    try:
        key = config_identity(rows)
    except ValueError:
        raise ResultsError(f"results in {source} hold malformed params") from None
    rows = rows.assign(config_key=key, sha=sha, split_key=text_column(rows, "split"),
                       cell_key=text_column(rows, "cell"))
    recipe = text_column(rows, "train_config")
    params, recipes, described = {}, {}, {}
    # the training recipe of a configuration is in its certification rows (attack rows lack it)
    for key, blob, train in sorted(zip(rows["config_key"], text, recipe, strict=True),
                                   key=lambda r: not r[2]):
        if key not in params:
            try:
                params[key] = parse_params(blob)
                # recipe fields added after a row was written take their defaults, which
                # reproduce what training did before they existed (as in ``cache.model_key``)
                recipes[key] = {**RECIPE_DEFAULTS, **parse_params(train)}
                described[key] = {**recipes[key], **params[key]}
            except ValueError:
                raise ResultsError(f"results in {source} hold malformed params or "
                                   f"train_config {(blob or train)[:60]!r}") from None
    names, order = config_names(rows.drop_duplicates("config_key"), params, recipes)
    rows = rows.assign(config=rows["config_key"].map(names),
                       rank=rows["config_key"].map(order))
    runs = rows[rows["metric"] == CERTIFIED]
    if "condition" in runs and runs["condition"].isna().any():
        raise ResultsError(f"results in {source} hold certified rows without a condition")
    certified = newest(runs, ["config_key", "patch", "condition"]) if len(runs) else runs
    attacked = rows[rows["metric"] == EMPIRICAL]
    value = pd.Series(float("nan"), index=attacked.index)
    for name in EMPIRICAL_VALUES:
        value = value.fillna(column(attacked, name))
    if value.isna().any():
        raise ResultsError(f"results in {source} hold attack rows without an "
                           f"{EMPIRICAL_VALUES[0]}")
    empirical = newest(attacked.assign(empirical_accuracy=value),
                       ["config_key", "split_key", "patch"])
    return Selected(certified, empirical, runs, described, choices, chance)


def config_names(configs: pd.DataFrame, params: dict[str, dict], recipes: dict[str, dict]
                 ) -> tuple[dict[str, str], dict[str, int]]:
    """Unique labels (``labels.config_label``: the same in every report) and a reading order
    (dataset, defense, then the values of the parameters that vary among its configurations)."""
    names, sort_keys = {}, {}
    for defense, group in configs.groupby("defense", sort=False):
        keys = list(group["config_key"])
        described = {k: {**recipes[k], **params[k]} for k in keys}
        varying = [n for n in dict.fromkeys(n for k in keys for n in described[k])
                   if len({json.dumps(described[k].get(n)) for k in keys}) > 1]
        for key, dataset, cert in zip(keys, group["dataset"], text_column(group, "precision"),
                                      strict=True):
            values = [described[key].get(n) for n in varying]
            names[key] = config_label(defense, params[key], recipes[key], cert or "fp32")
            sort_keys[key] = (dataset, defense, [(0, v) if isinstance(v, int | float) else
                                                 (1, str(v)) for v in values])
    if configs["dataset"].nunique() > 1:
        names = {k: f"{d}: {names[k]}" for k, d in zip(configs["config_key"],
                                                      configs["dataset"], strict=True)}
    clashes = Counter(names.values())
    for key, sha in zip(configs["config_key"], configs["sha"], strict=True):
        if clashes[names[key]] > 1:
            names[key] += f" @{sha[:7]}"
    order = {k: i for i, k in enumerate(sorted(sort_keys, key=lambda k: (sort_keys[k], k)))}
    return names, order


def newest(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per ``keys``: the one of the run with most images, then the newest; in
    reading order (configuration, patch area, height, condition)."""
    by = [c for c in ("n_images", "timestamp") if c in rows]
    kept = rows.sort_values(by, kind="stable", na_position="first").drop_duplicates(
        keys, keep="last")
    order = [c for c in ("rank", "patch_area", "patch_h", "condition") if c in kept]
    return kept.sort_values(order, kind="stable")


def write_report(out: Path, results_dir: Path, filters: str, selected: Selected,
                 failed: pd.DataFrame, gallery_images: int, study: StudyReport) -> Path:
    from patchbench.reporting import figures  # plotting libraries load only when a report is drawn

    certified, empirical, params = selected.certified, selected.empirical, selected.params
    configs = all_configurations(certified, empirical)
    tables, figures_dir = out / "tables", out / "figures"
    read = per_image_reader(results_dir)
    attacks = attack_table(empirical, selected.runs, read) if len(empirical) else None
    paired = PairedTests(certified, read)
    chance = chance_of(configs, certified, selected.chance)
    chosen, choice_notes = chosen_configs(configs, selected.choices, chance)
    configs = configs.assign(**{"chosen on val": [chosen_status(row, chosen, selected.choices)
                                                  for row in configs.to_dict("records")],
                                "chance (%)": configs["key"].map(chance)})
    sentences, claimed = [], None
    if len(certified):
        accuracy = accuracy_table(certified)
        gains = gain_table(accuracy.frame, paired)
        sentences += findings(accuracy.frame, configs, gains, params, chosen, paired,
                              study.sweep)
        sentences += chance_sentences(configs)
        sentences += code_sentences(configs)
        if study.claims is not None:
            sweeps = {dataset: sweep_configs(configs[configs["dataset"] == dataset], params,
                                             study.sweep) if study.sweep else {}
                      for dataset in dict.fromkeys(configs["dataset"])}
            claimed = claims_table(study.claims, accuracy.frame, configs, params, chosen,
                                   paired, bench_rows(results_dir), sweeps)
        if claimed is not None:
            sentences.append(claims_sentence(study.claims, claimed))
    if attacks is not None:
        sentences += attack_sentences(attacks.frame)
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    lines = [
        "# patchbench report", "",
        f"Results from `{results_dir}`{f' ({filters})' if filters else ''}: "
        f"{len(configs)} configuration(s) of {', '.join(dict.fromkeys(configs['defense']))} "
        f"on {', '.join(dict.fromkeys(configs['dataset']))}; {len(certified)} certified "
        f"rows{f', {len(empirical)} empirical (attack) rows' if len(empirical) else ''}. "
        f"Built {when} by patchbench {version('patchbench')}.", ""]
    if attacks is not None and (attacks.frame["violations"].fillna(0) > 0).any():
        lines += [f"> **Soundness violation**: the attack broke "
                  f"{int(attacks.frame['violations'].sum())} certified image(s); see "
                  "[Certified vs attacked](#certified-vs-attacked).", ""]
    lines += ["## Findings", "", *(f"- {s}" for s in sentences), ""]
    headline = (headline_table(accuracy.frame, configs, chosen, choice_notes)
                if len(certified) else None)
    if headline is not None:
        lines += ["## Headline", "",
                  f"One configuration per defense, chosen on `val` by the study's rule ({RULE}); "
                  "the numbers are its test results. The test set chooses nothing.", "",
                  *table_lines(headline, tables)]
    elif len(certified):
        why = ("No configuration chosen on val can be headlined (notes below)"
               if any(where in selected.choices for where in zip(
                   configs["dataset"], configs["defense"], strict=True))
               else "No configuration was chosen on val (no `val` rows "
               f"under `{results_dir / VALIDATION}`)")
        lines += ["## Headline", "", f"_{why}: no headline, nothing is ranked._",
                  *(f"- {n}" for n in choice_notes), ""]
    if len(certified) and claimed is not None:
        lines += [f"## {study.claims.title}", "",
                  f"Claims of `{study.claims.path.name}` (the study's `[report] claims`). "
                  "Numbers measured on another dataset are shown, not judged; a verdict is "
                  "given only on what a claim says qualitatively (more, grows, slower), by the "
                  "rule in the last column.", "", *table_lines(claimed, tables)]
    lines += ["## Configurations", "",
              *table_lines(configs_table(configs, per_shape_clean(certified)), tables)]
    if len(certified):
        lines += certified_lines(certified, configs, accuracy, gains, params, tables,
                                 figures_dir, figures, study.sweep)
    else:
        lines += ["## Certified accuracy", "",
                  "_No certification rows (`patchbench run`) in this selection: only the "
                  "attack's own certificates below._", ""]
    if attacks is not None:
        lines += ["## Certified vs attacked", "",
                  "Certified accuracy is a lower bound on robust accuracy, the accuracy under a "
                  "patch attack an upper bound: per configuration and patch shape, both on the "
                  "images the attack ran on.", "", *table_lines(attacks, tables)]
        figures.certified_vs_attacked(attacks.frame, figures_dir / "certified_vs_attacked.png")
        lines += figure_lines("Certified vs attacked accuracy", "certified_vs_attacked.png")
    if len(certified):
        lines += gallery_lines(results_dir, certified, configs, gallery_images, figures_dir,
                               tables, figures.gallery_figure)
    if not failed.empty:
        lines += ["## Failed cells", "",
                  *table_lines(Table("failed", "Cells that failed (no rows)", failed,
                                     "Details: results/failed/<cell>.json."), tables)]
    report = out / "report.md"
    write_text(report, "\n".join(lines))
    return report


HEADLINE_BLOCK = "headline"


def headline_block(readme: Path) -> tuple[str, int, int]:
    """The file's text and where its headline block starts and ends (``readme.find_block``)."""
    return find_block(readme, HEADLINE_BLOCK)


def update_readme(readme: str | Path, out_dir: str | Path) -> None:
    """Replace README's headline block by the headline table of the report in ``out_dir`` and
    its main figures, so that README's numbers come from the tools and are never typed."""
    readme, out = Path(readme), Path(out_dir)
    headline_block(readme)
    path = out / "tables" / "headline.csv"
    if not path.is_file():
        raise ResultsError(f"the report in {out} has no headline table (no 5x5 certification "
                           "rows)")
    frame = rendered(pd.read_csv(path, dtype={"parameters": "Int64"}))
    link = Path(os.path.relpath(out, readme.parent)).as_posix()
    lines = [*markdown_table(list(frame.columns), [list(row) for row in
                                                   frame.itertuples(index=False)]),
             "", f"One configuration per defense, chosen on `val` ({RULE}); test numbers with "
             f"their {INTERVAL}s. Certified accuracy: the share of all test images that are "
             "classified correctly and certified for every position of the patch. Time: "
             "certifying 10,000 images for every patch shape and condition of the "
             "configuration's run (separate runs, not a speed ranking). Full report: "
             f"[{link}/report.md]({link}/report.md).", ""]
    for name, caption in (("certified_vs_patch_size.png", "Certified accuracy vs patch size"),
                          ("certified_vs_attacked.png", "Certified vs attacked accuracy")):
        if (out / "figures" / name).is_file():
            lines += [f"![{caption}]({link}/figures/{name})", ""]
    write_block(readme, HEADLINE_BLOCK, "patchbench report --readme", lines)


def certified_lines(certified: pd.DataFrame, configs: pd.DataFrame, accuracy: Table,
                    gains: Table | None, params: dict[str, dict], tables: Path,
                    figures_dir: Path, figures, sweep_spec: SweepSpec | None) -> list[str]:
    """The sections of the certification rows: accuracy, shapes, the study's sweep, gains,
    time."""
    sweep = sweep_table(certified, configs, params, sweep_spec) if sweep_spec else None
    long = certified.assign(**{figures.CERTIFIED: 100 * certified["certified_accuracy"]})
    primary = primary_of_rows(certified)  # the heatmaps show each defense's primary condition
    condition = ", ".join(dict.fromkeys(primary[d] for d in certified["defense"]))
    lines = ["## Certified accuracy", "", *table_lines(accuracy, tables)]
    if (long["patch_h"] == long["patch_w"]).any():
        figures.patch_size_curves(long, figures_dir / "certified_vs_patch_size.png")
        lines += figure_lines("Certified accuracy vs square patch size",
                              "certified_vs_patch_size.png")
    else:
        lines += ["_No square patch shape was certified: no patch-size curve._", ""]
    figures.shape_heatmaps(long, figures_dir / "patch_shapes.png", primary)
    lines += ["## Patch shapes", "",
              f"Certified accuracy ({condition}) by patch height and width: a defense robust "
              "to the aspect ratio has similar values for `h x w` and `w x h`.", "",
              *figure_lines("Certified accuracy by patch shape", "patch_shapes.png")]
    if sweep_spec is not None:  # the study's [report] sweep
        lines += [f"## {sweep_spec.heading}", ""]
        lines += (table_lines(sweep, tables) if sweep is not None else
                  [f"_No configuration of {sweep_spec.defense} has the parameter "
                   f"`{sweep_spec.param}`._", ""])
    lines += ["## Tight vs global", ""]
    lines += (table_lines(gains, tables) if gains is not None else
              ["_Only one condition was certified._", ""])
    lines += ["## Certification time vs parameters", ""]
    timed = configs.dropna(subset=["parameters", TIME])
    if timed.empty:
        lines += ["_No configuration records both its size and its time._", ""]
    else:
        figures.time_vs_parameters(timed.astype({"parameters": float}),
                                   figures_dir / "time_vs_parameters.png", "parameters", TIME)
        lines += figure_lines("Certification time vs parameters", "time_vs_parameters.png")
    return lines


BENCH = "bench"  # <results>/bench/rows/: the benchmark runs speeds are compared with


def bench_rows(results_dir: Path) -> pd.DataFrame:
    """Throughput rows (median images per second) of the benchmark runs beside the results;
    empty without any."""
    try:
        rows = load_results(results_dir / BENCH)
    except ResultsError:
        return pd.DataFrame()
    keep = (metric_of(rows) == "images_per_second") & (text_column(rows, "statistic")
                                                      == "median")
    return rows[keep]


def chance_of(configs: pd.DataFrame, certified: pd.DataFrame,
              chance: dict[str, float]) -> dict[str, float]:
    """Configuration key -> chance level (%) of its test images: the most common class's
    share, the largest over its certification cells."""
    cells = certified.groupby("config_key")["cell_key"].agg(set) if len(certified) else {}
    out = {}
    for key in configs["key"]:
        levels = [chance[c] for c in cells.get(key, ()) if c in chance]
        if levels:
            out[key] = 100 * max(levels)
    return out


def chosen_configs(configs: pd.DataFrame, choices: dict[tuple[str, str], Choice],
                   chance: dict[str, float]) -> tuple[dict[tuple[str, str], str], list[str]]:
    """(dataset, defense) -> the label of the configuration chosen on val, for those whose
    choice has test rows and beats chance; and a note for every defense left without one."""
    rows = {r["key"]: r for r in configs.to_dict("records")}
    chosen, notes = {}, []
    for dataset, defense in dict.fromkeys(zip(configs["dataset"], configs["defense"],
                                              strict=True)):
        choice = choices.get((dataset, defense))
        where = f"{defense} on {dataset}"
        if choice is None:
            notes.append(f"{where}: not chosen on val (no `val` rows); not in the headline "
                         "and not ranked.")
        elif choice.key not in rows:
            notes.append(f"{where}: the configuration chosen on val has no test rows here.")
        elif at_chance(rows[choice.key], chance):
            notes.append(f"{where}: the configuration chosen on val, "
                         f"{rows[choice.key]['config']}, is at or below chance on test "
                         "(clean accuracy no better than always predicting the most common "
                         "class); not headlined.")
        else:
            chosen[(dataset, defense)] = rows[choice.key]["config"]
    return chosen, notes


def at_chance(config: dict, chance: dict[str, float]) -> bool:
    level = chance.get(config["key"])
    return level is not None and config["clean (%)"] <= level


def chosen_status(config: dict, chosen: dict[tuple[str, str], str],
                  choices: dict[tuple[str, str], Choice]) -> str:
    """"yes", "yes, at chance" (chosen on val, not headlined), "no" (val chose another) or
    "no val rows", for the configurations table."""
    where = (config["dataset"], config["defense"])
    if chosen.get(where) == config["config"]:
        return "yes"
    if where not in choices:
        return "no val rows"
    return "yes, at chance" if choices[where].key == config["key"] else "no"


def chance_sentences(configs: pd.DataFrame) -> list[str]:
    """Configurations whose clean accuracy is at or below chance, flagged."""
    low = configs[configs["clean (%)"] <= configs["chance (%)"]]
    if low.empty:
        return []
    return ["**At or below chance** (clean accuracy no better than the most common class): "
            + ", ".join(f"{r['config']} ({r['clean (%)']:.1f}% vs {r['chance (%)']:.1f}%)"
                        for r in low.to_dict("records")) + "; never headlined."]


def all_configurations(certified: pd.DataFrame, empirical: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration, from its certification rows, else its attack rows."""
    only_attacked = empirical[~empirical["config_key"].isin(certified["config_key"])]
    rows = pd.concat([certified, only_attacked]) if len(certified) else only_attacked
    representative = newest(rows, ["config_key"]).sort_values("rank", kind="stable")
    configs = configurations(representative.assign(
        clean_accuracy=[clean_of(row, certified) for row in representative.to_dict("records")]))
    names = shipped_names()  # the zoo's: `patchbench run --model NAME` certifies it again
    return configs.assign(model=text_column(representative, "checkpoint_sha256")
                          .map(lambda sha: names.get(sha, "–")).to_numpy(),
                          **{"defense code": configs["key"].map(
                              code_of(pd.concat([certified, empirical]))).fillna("–").to_numpy()})


def code_of(rows: pd.DataFrame) -> dict[str, str]:
    """config_key -> the defense source hash (12 characters) its rows were computed with,
    "differs: a, b" where its cells come from different code, "–" for rows older than the
    column."""
    if "defense_source_sha256" not in rows:
        return {}
    found = {}
    for key, hashes in rows.groupby("config_key")["defense_source_sha256"]:
        seen = sorted({h[:12] for h in hashes.dropna().astype(str) if h})
        found[key] = ("–" if not seen else seen[0] if len(seen) == 1
                      else "differs: " + ", ".join(seen))
    return found


def code_sentences(configs: pd.DataFrame) -> list[str]:
    """A finding for every configuration whose cells come from different defense code."""
    mixed = configs[configs["defense code"].astype(str).str.startswith("differs")]
    return [f"**Different code**: the cells of {row['config']} were computed by different "
            f"versions of the defense's source ({row['defense code'].removeprefix('differs: ')}"
            "); compare them with care." for row in mixed.to_dict("records")]


def clean_of(row: dict, certified: pd.DataFrame) -> float:
    """A configuration's clean accuracy: its representative row's, the same for every patch
    shape of a vote map; where the prediction depends on the shape (masking), the one at 5x5
    (the headline shape), NaN without one (every shape's is in the accuracy table)."""
    if not len(certified):
        return row["clean_accuracy"]
    run = certified[(certified["config_key"] == row["config_key"])
                    & (certified["cell_key"] == row["cell_key"])]
    if run["clean_accuracy"].nunique() <= 1:
        return row["clean_accuracy"]
    at = run.loc[run["patch"] == "5x5", "clean_accuracy"]
    return float(at.iloc[0]) if len(at) else float("nan")


def per_shape_clean(certified: pd.DataFrame) -> list[str]:
    """The configurations whose clean accuracy depends on the patch shape."""
    if not len(certified):
        return []
    spread = certified.groupby(["config_key", "cell_key"], sort=False)["clean_accuracy"].nunique()
    keys = set(spread[spread > 1].index.get_level_values(0))
    return list(dict.fromkeys(certified.loc[certified["config_key"].isin(keys), "config"]))


def per_image_reader(results_dir: Path) -> Callable[[str], pd.DataFrame | None]:
    """A cell's per-image table (read once), or None where it is missing or unreadable."""
    tables: dict[str, pd.DataFrame | None] = {}

    def read(cell: str) -> pd.DataFrame | None:
        if cell not in tables:
            try:
                tables[cell] = pd.read_csv(per_image_path(results_dir, cell)) if cell else None
            except (OSError, ValueError, pd.errors.ParserError):
                tables[cell] = None
        return tables[cell]
    return read


def gallery_lines(results_dir: Path, certified: pd.DataFrame, configs: pd.DataFrame, n: int,
                  figures_dir: Path, tables: Path, draw: Callable[..., None]) -> list[str]:
    """The gallery section: one figure per configuration whose checkpoint and data are here."""
    lines = ["## Gallery", "",
             "Test images nearest the certification boundary, correct ones first. Left: the "
             "image and the patch position that comes closest to breaking its certificate "
             "(red); middle and right: the votes of the prediction and of the strongest rival "
             "class (black: the cell votes for it), with that patch's footprint outlined. A "
             "margin >= 0 means certified.", ""]
    for stale in figures_dir.glob("gallery_*.png"):  # numbering and names follow the configs
        stale.unlink()
    if n == 0:
        return lines + ["_Gallery turned off (`--gallery-images 0`)._", ""]
    representative = newest(certified, ["config_key"]).set_index("config_key")
    datasets: dict[tuple[str, str], ImageData] = {}
    records, masking, notes = [], [], []
    for number, (key, name) in enumerate(zip(configs["key"], configs["config"], strict=True)):
        if key not in representative.index:
            notes.append(f"- {name}: no gallery, it has no certification rows.")
            continue
        patches = list(dict.fromkeys(certified.loc[certified["config_key"] == key, "patch"]))
        try:
            checkpoint, examples = gallery_examples(results_dir, representative.loc[key],
                                                    patches, n, datasets)
        except GalleryUnsupported as err:  # "gallery not supported by <defense>: ..."
            notes.append(f"- {name}: {err}.")
            continue
        except GalleryUnavailable as err:
            notes.append(f"- {name}: no gallery, {err}.")
            continue
        classes = [str(c) for c in checkpoint.meta["classes"]]
        path = figures_dir / f"gallery_{number + 1}_{slug(name)}.png"
        model = configs.loc[number, "model"]
        draw(examples, classes, f"{name}{'' if model == '–' else f' ({model})'}: patch "
             f"{examples[0].patch}", path)
        lines += figure_lines(f"Gallery of {name}", path.name)
        if all(isinstance(ex, Explanation) for ex in examples):
            masking += [explanation_record(name, ex, classes) for ex in examples]
            if not all(ex.matches for ex in examples):
                notes.append(f"- {name}: the recomputed prediction or certificate differs "
                             "from the stored one for some images (another device or "
                             "checkpoint?).")
            continue
        records += [gallery_record(name, ex, classes) for ex in examples]
        if not all(ex.votes_match for ex in examples):
            notes.append(f"- {name}: recomputed votes differ from the stored ones for some "
                         "images (another device or checkpoint?).")
    if records:
        lines += table_lines(Table("gallery", "Gallery images", pd.DataFrame(records),
                                   "margin: exact tight margin of the worst footprint; stored "
                                   "margin: the run's, a lower bound when >= 0."), tables)
    if masking:
        lines += table_lines(Table(
            "gallery_masking", "Gallery images (masking)", pd.DataFrame(masking),
            "Masking galleries: left, the image; middle, the image under the two masks of the "
            "first two-mask prediction (in mask order) that differs from the defended one, "
            "none where it is certified; right, the label under each single mask, laid out as "
            "the mask grid (red: differs from the prediction). Certified iff every two-mask "
            "prediction equals the prediction."), tables)
    return lines + notes + ([""] if notes else [])


def gallery_record(name: str, ex: Example, classes: list[str]) -> dict:
    (r0, rn), (c0, cn) = ex.footprint
    return {"config": name, "image": ex.index, "label": classes[ex.label],
            "prediction": classes[ex.prediction], "rival": classes[ex.rival],
            "patch": str(ex.patch), "margin": ex.margin, "stored margin": ex.stored_margin,
            "footprint rows": f"{r0}+{rn}", "footprint cols": f"{c0}+{cn}",
            "patch at": "-" if ex.position is None else f"{ex.position[0]},{ex.position[1]}",
            "votes match": ex.votes_match}


def explanation_record(name: str, ex: Explanation, classes: list[str]) -> dict:
    return {"config": name, "image": ex.index, "label": classes[ex.label],
            "prediction": classes[ex.prediction], "patch": str(ex.patch),
            "certified": ex.certified, "stored certified": ex.stored_certified,
            "masks": "-" if ex.pair is None else f"{ex.pair[0]}+{ex.pair[1]}",
            "mask prediction": ("-" if ex.mask_prediction is None
                                else classes[ex.mask_prediction]),
            "pairs": ex.pairs, "matches": ex.matches}


LOW, HIGH = " low", " high"  # suffixes of an accuracy's interval bounds in a table's CSV


def with_interval_columns(table: Table) -> pd.DataFrame:
    """The table's frame with each accuracy's 95% Wilson bounds (%) right after it."""
    frame = table.frame.copy()
    for name, images in table.intervals.items():
        if name not in frame or images not in frame:
            continue
        bounds = [wilson(round(v / 100 * n), int(n)) if pd.notna(v) and pd.notna(n) and n > 0
                  else (np.nan, np.nan) for v, n in zip(frame[name], frame[images], strict=True)]
        at = frame.columns.get_loc(name) + 1
        frame.insert(at, name + LOW, [100 * b[0] for b in bounds])
        frame.insert(at + 1, name + HIGH, [100 * b[1] for b in bounds])
    return frame


def rendered(frame: pd.DataFrame, missing: str = "–") -> pd.DataFrame:
    """Cells for reading: numbers formatted, and each accuracy with bounds in its CSV shown
    as "47.8 [46.8, 48.8]" (the bound columns folded in)."""
    out = frame.map(lambda v: fmt(v, missing))
    for name in frame.columns:
        if name + LOW in frame and name + HIGH in frame:
            out[name] = [v if pd.isna(x) else f"{fmt(x)} [{fmt(lo)}, {fmt(hi)}]"
                         for v, x, lo, hi in zip(out[name], frame[name], frame[name + LOW],
                                                 frame[name + HIGH], strict=True)]
            out = out.drop(columns=[name + LOW, name + HIGH])
    return out


def table_lines(table: Table, folder: Path) -> list[str]:
    """Write the table as CSV (interval bounds as columns) and LaTeX; return its Markdown."""
    frame = with_interval_columns(table)
    write_text(folder / f"{table.name}.csv", frame.to_csv(index=False))
    write_text(folder / f"{table.name}.tex",
               rendered(frame, "--").to_latex(index=False, escape=True))
    cells = rendered(frame)
    return [f"**{table.title}**", "",
            "| " + " | ".join(map(str, cells.columns)) + " |",
            "|" + "---|" * len(cells.columns),
            *("| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)), "",
            *([table.note, ""] if table.note else []),
            f"[CSV](tables/{table.name}.csv) · [LaTeX](tables/{table.name}.tex)", ""]


def figure_lines(caption: str, name: str) -> list[str]:
    return [f"![{caption}](figures/{name})", ""]


def fmt(value: object, missing: str = "–") -> str:
    """Numbers for reading: one decimal for fractions of a whole, integers as they are."""
    if isinstance(value, str):
        return value
    if value is None or pd.isna(value):
        return missing
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return f"{float(value):.1f}"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
