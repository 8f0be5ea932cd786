"""The report's tables and findings, computed from checked, labelled result rows.

Inputs are the frames ``report.py`` prepares: certified rows (one per configuration, patch
shape and condition; accuracies as fractions) and empirical attack rows (one per
configuration, split and patch shape), both with a ``config`` label and a ``config_key``.
Tables hold percentages; findings are sentences computed from the tables, so no number in a
report is ever typed by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from patchbench.certify import CONDITIONS
from patchbench.reporting.paired import PairedTests, PerImage
from patchbench.reporting.stats import ALPHA, INTERVAL, wilson
from patchbench.running.per_image import certified as per_image_certified
from patchbench.running.per_image import conditions as per_image_conditions
from patchbench.running.per_image import correct as per_image_correct
from patchbench.running.per_image import has_condition as per_image_has

PER_IMAGES = 10_000  # certification time is reported for this many images, as in the talk
TIME = f"s per {PER_IMAGES:,} images"  # that time's column in the configurations table
NOT_CERTIFIED = ("clean (%)",)  # the accuracy columns that are no condition
GAP = "gap (points)"  # empirical minus certified (primary condition), on the same images
OWN_PREFIX = "certified_accuracy_"  # an attack row's own certified accuracy, per condition
# The attack budget as the attack rows record it (attack_<field>), shown as "name value".
BUDGET = (("steps", "steps"), ("restarts", "restarts"), ("step_size", "step"),
          ("position_stride", "stride"), ("worst_positions", "worst"))


@dataclass
class Table:
    """A named table of the report, written as Markdown, CSV and LaTeX."""

    name: str  # file stem under tables/
    title: str
    frame: pd.DataFrame
    note: str = ""
    # accuracy column (%) -> the column of the number of images it is over: each such
    # accuracy is shown with its 95% Wilson interval (stats.py)
    intervals: dict[str, str] = field(default_factory=dict)


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column, or NaN where an older results file does not have it."""
    return frame[name] if name in frame else pd.Series(np.nan, index=frame.index)


def text_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column as strings, empty where missing."""
    values = column(frame, name)
    return values.astype(object).where(values.notna(), "").astype(str)


def conditions_of(rows: pd.DataFrame) -> list[str]:
    return ordered(set(rows["condition"]))


def ordered(conditions: set[str] | list[str]) -> list[str]:
    """Condition names in reading order: the vote-map ones (tight, global), then any other
    (known only from results), sorted."""
    present = set(conditions)
    return [c for c in CONDITIONS if c in present] + sorted(present - set(CONDITIONS))


def condition_columns(frame: pd.DataFrame, skip: tuple[str, ...] = NOT_CERTIFIED) -> list[str]:
    """The "<condition> (%)" columns of a table, in its column order."""
    return [c for c in frame.columns if c.endswith(" (%)") and c not in skip]


def primary_conditions(accuracy: pd.DataFrame) -> dict[str, str]:
    """defense -> its primary condition: the first (tight, then any other) that its rows of
    the accuracy table have."""
    columns = condition_columns(accuracy)
    out = {}
    for defense, rows in accuracy.groupby("defense", sort=False):
        found = [c for c in columns if rows[c].notna().any()]
        if found:
            out[defense] = found[0].removesuffix(" (%)")
    return out


def primary_of_rows(certified: pd.DataFrame) -> dict[str, str]:
    """defense -> its primary condition, from certification rows."""
    return {defense: conditions_of(rows)[0]
            for defense, rows in certified.groupby("defense", sort=False)}


def primary_values(accuracy: pd.DataFrame) -> pd.Series:
    """Per row of the accuracy table, certified accuracy (%) under its defense's primary
    condition (NaN where it has none)."""
    primary = primary_conditions(accuracy)
    values = pd.Series(np.nan, index=accuracy.index, dtype=float)
    for defense, cond in primary.items():
        mine = accuracy["defense"] == defense
        values[mine] = accuracy.loc[mine, f"{cond} (%)"]
    return values


def either(names: list[str]) -> str:
    """"tight", "tight or the global", "tight, the global or the masking"."""
    if len(names) <= 1:
        return "".join(names)
    return ", the ".join(names[:-1]) + " or the " + names[-1]


def accuracy_table(certified: pd.DataFrame) -> Table:
    """Clean and certified accuracy per configuration and patch (the attack's accuracy, often
    on fewer images, is compared on the same images in ``attack_table``)."""
    conditions = conditions_of(certified)
    records = []
    for (_, patch), group in certified.groupby(["config_key", "patch"], sort=False):
        first = group.iloc[0]
        by_condition = dict(zip(group["condition"], group["certified_accuracy"], strict=True))
        record = {"dataset": first["dataset"], "defense": first["defense"],
                  "config": first["config"], "patch": patch, "images": int(first["n_images"]),
                  "clean (%)": 100 * first["clean_accuracy"]}
        record.update({f"{c} (%)": 100 * by_condition.get(c, np.nan) for c in conditions})
        records.append(record)
    note = ("Certified: correct and certified for every position of the patch, under the "
            f"{either(conditions)} condition, over all images (README). {INTERVALS}")
    frame = pd.DataFrame(records)
    return Table("accuracy", "Clean and certified accuracy (%)", frame, note,
                 accuracy_intervals(frame))


INTERVALS = f"Brackets: {INTERVAL}."


def accuracy_intervals(frame: pd.DataFrame, images: str = "images",
                       skip: tuple[str, ...] = ("forward share (%)", "chance (%)")
                       ) -> dict[str, str]:
    """Every accuracy column (%) of a table -> its image-count column."""
    return {c: images for c in frame.columns if c.endswith(" (%)") and c not in skip}


def configurations(representative: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (``key`` = config_key), from its largest, newest run."""
    seconds = column(representative, "certify_seconds")
    return pd.DataFrame({
        "key": representative["config_key"], "dataset": representative["dataset"],
        "defense": representative["defense"],
        "config": representative["config"], "images": representative["n_images"].astype(int),
        "parameters": column(representative, "n_parameters").astype("Int64"),
        "clean (%)": 100 * representative["clean_accuracy"],
        "certify (s)": seconds,
        TIME: seconds / representative["n_images"] * PER_IMAGES,
        "forward share (%)": 100 * column(representative, "forward_seconds") / seconds,
        "device": column(representative, "device"),
        "checkpoint": text_column(representative, "checkpoint_sha256").str[:12],
    }).reset_index(drop=True)


def configs_table(configs: pd.DataFrame, per_shape: list[str] | None = None) -> Table:
    """``per_shape``: configurations whose clean accuracy depends on the patch shape."""
    note = ("Certification time covers every patch shape and condition of the run, scaled to "
            f"{PER_IMAGES:,} images; the forward share is the defense's vote computation.")
    if per_shape:
        note += (f" Clean of {', '.join(per_shape)} (a prediction per patch shape): at 5x5; "
                 "every shape's is in the accuracy table.")
    frame = configs.drop(columns="key")
    return Table("configurations", "Configurations", frame, f"{note} {INTERVALS}",
                 accuracy_intervals(frame))


@dataclass(frozen=True)
class SweepSpec:
    """A study's parameter sweep, shown as one table (``[report] sweep`` of a study file): a
    column per value of ``param`` among the configurations of ``defense``, then the other
    defenses for comparison."""

    defense: str
    param: str
    title: str = ""  # default: "<defense> by <param>"

    @property
    def heading(self) -> str:
        return self.title or f"{self.defense} by {self.param}"


def sweep_table(certified: pd.DataFrame, configs: pd.DataFrame, params: dict[str, dict],
                spec: SweepSpec) -> Table | None:
    """The sweep's table; None when no configuration of the defense has the parameter."""
    swept = sorted((k for k, d in zip(configs["key"], configs["defense"], strict=True)
                    if d == spec.defense and spec.param in params[k]),
                   key=lambda k: (params[k][spec.param], k))
    if not swept:
        return None
    datasets = set(configs.loc[configs["key"].isin(swept), "dataset"])
    keys = swept + [k for k, d in zip(configs["key"], configs["dataset"], strict=True)
                    if k not in swept and d in datasets]
    primary = primary_of_rows(certified)  # each defense under its primary condition
    mine_rows = certified[certified["condition"] == certified["defense"].map(primary)]
    tight = mine_rows[mine_rows["config_key"].isin(swept)]
    shapes = tight.drop_duplicates("patch").sort_values(["patch_area", "patch_h"])
    shapes = shapes["patch"].tolist()
    by_key = configs.set_index("key")
    columns = {}
    for key in keys:
        row = by_key.loc[key]
        header = row["config"]
        if key in swept and f"{spec.param}=" not in header:
            header = f"{header} {spec.param}={params[key][spec.param]}"
        mine = mine_rows[mine_rows["config_key"] == key].set_index("patch")["certified_accuracy"]
        n = int(row["images"])
        columns[header] = [percent_interval(row["clean (%)"], n),
                           *(percent_interval(100 * mine.get(p, np.nan), n) for p in shapes),
                           row[TIME], row["parameters"]]
    used = ordered({primary[d] for d in by_key.loc[keys, "defense"] if d in primary})
    index = ["clean (%)", *(f"certified {p}, {'/'.join(used)} (%)" for p in shapes),
             f"cert. time, {PER_IMAGES:,} images (s)", "parameters"]
    frame = pd.DataFrame(columns, index=index, dtype=object).rename_axis("measure").reset_index()
    devices = ", ".join(sorted(set(by_key.loc[keys, "device"].dropna().astype(str))))
    defenses = list(dict.fromkeys(by_key.loc[keys, "defense"]))
    conditions = "" if len(used) < 2 else "; each defense under its primary condition: " + (
        ", ".join(f"{cond} ({', '.join(d for d in defenses if primary.get(d) == cond)})"
                  for cond in used))
    return Table(f"{spec.param}_sweep", spec.heading, frame,
                 f"{spec.defense} by {spec.param}, other defenses for comparison{conditions}; "
                 f"times measured on {devices or 'an unrecorded device'}, in separate runs. "
                 f"{INTERVALS}")


def percent_interval(percent: float, images: int) -> str:
    """"47.8 [46.8, 48.8]": an accuracy (%) over ``images`` with its 95% Wilson interval."""
    if pd.isna(percent):
        return "–"
    low, high = wilson(round(percent / 100 * images), images)
    return f"{percent:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def gain_table(accuracy: pd.DataFrame, paired: PairedTests) -> Table | None:
    """Points the tight condition certifies above the global one, with the paired test of
    the two on the same images; None without both conditions."""
    if not {"tight (%)", "global (%)"} <= set(accuracy.columns):
        return None
    both = accuracy.dropna(subset=["tight (%)", "global (%)"])
    tests = [paired.compare((c, p, "tight"), (c, p, "global"))
             for c, p in zip(both["config"], both["patch"], strict=True)]
    frame = both[["dataset", "config", "patch", "images", "tight (%)", "global (%)"]].assign(
        **{"gain (points)": both["tight (%)"] - both["global (%)"],
           "p (McNemar)": [np.nan if t is None else t.p_value for t in tests],
           "significant": [None if t is None else t.significant for t in tests]}
    ).reset_index(drop=True)
    return Table("tight_vs_global", "Tight vs global condition", frame,
                 "Same model and votes; the tight condition checks every footprint, the "
                 "global one only the largest. p: exact McNemar test of the two on the same "
                 f"images; significant at {ALPHA}. {INTERVALS}",
                 accuracy_intervals(frame))


def sweep_configs(configs: pd.DataFrame, params: dict[str, dict], spec: SweepSpec
                  ) -> dict[Any, str]:
    """value -> config of the sweep's configurations that differ only in ``spec.param`` (the
    largest such group, at least two values); {} if there is none."""
    groups: dict[str, dict[Any, str]] = {}
    for key, config, defense in zip(configs["key"], configs["config"], configs["defense"],
                                    strict=True):
        described = params.get(key, {})
        if defense != spec.defense or spec.param not in described:
            continue
        rest = json.dumps({k: v for k, v in described.items() if k != spec.param},
                          sort_keys=True)
        groups.setdefault(rest, {})[described[spec.param]] = config
    sweep = max(groups.values(), key=len, default={})
    return dict(sorted(sweep.items())) if len(sweep) >= 2 else {}


def attack_table(empirical: pd.DataFrame, runs: pd.DataFrame, per_image: PerImage) -> Table:
    """Certified vs attacked: per configuration, split and patch shape, on the images the
    attack ran on, clean, certified and empirical accuracy, the gap and the violations.

    ``empirical`` holds one attack row per configuration, split and shape, ``runs`` every
    certification row (all runs); both have ``config_key``, ``split_key`` and ``cell_key``.
    The certified accuracy of the attacked images comes from a matching run (same model,
    dataset, split and shape): recomputed from its per-image table, or its rows when it ran
    on the same images; else from the attack's own certificate of them.
    """
    records, accuracies, notes = [], [], []
    own_columns = [c for c in empirical.columns if c.startswith(OWN_PREFIX)]
    used = []  # the condition each gap is taken under
    for row in empirical.to_dict("records"):
        patch, config = row["patch"], row["config"]
        attack = usable(per_image(row["cell_key"]), ("index", "label", f"broken_{patch}"))
        if attack is not None and not has_prediction(attack, patch):
            attack = None
        n = len(attack) if attack is not None else int(row["n_images"])
        index = (attack["index"].astype(int).tolist() if attack is not None
                 else list(range(n)))  # an attack runs on the first n images of its split
        own = {c.removeprefix(OWN_PREFIX): row.get(c, np.nan) for c in own_columns}
        own = {c: v for c, v in own.items() if pd.notna(v)}
        found = run_certified(row, index, runs, per_image)
        if found is not None:
            accuracy, by, run_mask = found
            first = ordered(list(accuracy))[0] if accuracy else None
            if (first in own and abs(own[first] - accuracy[first]) > 1e-9):
                notes.append(f"{config} at {patch}: the run certifies "
                             f"{100 * accuracy[first]:.1f}% ({first}) of these images, the "
                             f"attack's own pass {100 * own[first]:.1f}% (another device, "
                             "precision or batch?).")
        else:
            accuracy = own
            by, run_mask = ("attack pass" if accuracy else None), None
        primary = ordered(list(accuracy))[0] if accuracy else None
        used.append(primary)
        accuracies.append(accuracy)
        violations = row.get("n_violations", np.nan)
        if attack is not None:
            # certified under the primary condition (tight, which global implies), by the
            # attack's own certificate of the images or by the run's
            held = ordered(per_image_conditions(attack, patch))
            mine = primary if primary in held else (held[0] if held else None)
            certified = np.zeros(n, dtype=bool)
            if mine is not None:
                certified |= per_image_certified(attack, mine, patch).to_numpy()
            if run_mask is not None:
                certified |= run_mask
            if run_mask is not None or mine is not None:
                found_here = int((attack[f"broken_{patch}"].astype(bool).to_numpy()
                                  & certified).sum())
                violations = found_here if pd.isna(violations) else max(int(violations),
                                                                        found_here)
        empirical_pct = 100 * row["empirical_accuracy"]
        records.append({
            "dataset": row["dataset"], "config": config, "split": row["split_key"] or None,
            "patch": patch, "images": n, "clean (%)": 100 * row["clean_accuracy"],
            "empirical (%)": empirical_pct,
            GAP: empirical_pct - 100 * accuracy.get(primary, np.nan),
            "attacked": row.get("n_attacked", np.nan), "violations": violations,
            "certified by": by, "budget": budget_text(row)})
    # a column per condition: the vote-map ones, then any other these rows have
    frame = pd.DataFrame(records).astype({"attacked": "Int64", "violations": "Int64"})
    at = frame.columns.get_loc("clean (%)") + 1
    for i, cond in enumerate(ordered([*CONDITIONS, *(c for a in accuracies for c in a)])):
        frame.insert(at + i, f"{cond} (%)", [100 * a.get(cond, np.nan) for a in accuracies])
    named = either(ordered({c for c in used if c}) or ["tight"])
    note = ("On the images the attack ran on (`images`, the first of the split). Certified: "
            "correct and certified, from the certification run's per-image table for those "
            "images (`certified by`), else from the attack's own certificate of them. "
            "Empirical: correct and not broken by the attack, an upper bound on robust "
            f"accuracy; {GAP}: empirical minus {named}, >= 0 for a sound certificate. "
            f"Attacked: the images attacked (correct or certified). Violations: certified "
            f"({named}) images whose prediction the attack changed; must be 0.")
    if (frame["violations"].fillna(0) > 0).any():
        note = ("**Soundness violation: certified images were broken (`violations` > 0); a "
                "certificate is wrong.** " + note)
    return Table("certified_vs_attacked", "Certified vs attacked (%)", frame,
                 " ".join([note, INTERVALS, *notes]), accuracy_intervals(frame))


def has_prediction(table: pd.DataFrame, patch: str) -> bool:
    """Whether a per-image table holds a defended prediction for ``patch``."""
    return "prediction" in table or f"prediction_{patch}" in table


def usable(table: pd.DataFrame | None, needed: tuple[str, ...]) -> pd.DataFrame | None:
    """The per-image table if it has the columns needed, else None."""
    if table is None or not set(needed) <= set(table.columns):
        return None
    return table


def run_certified(row: dict, index: list[int], runs: pd.DataFrame, per_image: PerImage
                  ) -> tuple[dict[str, float], str, np.ndarray | None] | None:
    """(accuracy per condition, source, mask of the images certified under the primary
    condition, or None) of the attacked images from the largest, newest matching run that
    covers them; None without one."""
    patch = row["patch"]
    mine = runs[(runs["config_key"] == row["config_key"]) & (runs["split_key"]
                                                             == row["split_key"])
                & (runs["patch"] == patch)]
    by = [c for c in ("n_images", "timestamp") if c in mine]
    mine = mine.sort_values(by, ascending=False, kind="stable", na_position="last")
    for cell, run in mine.groupby("cell_key", sort=False):
        name = f"run {cell[:8]}" if cell else "run"
        conditions = ordered(set(run["condition"]))
        table = usable(per_image(cell), ("index", "label"))
        if (table is not None and has_prediction(table, patch)
                and all(per_image_has(table, c, patch) for c in conditions)
                and set(index) <= set(table["index"])):
            sub = table.drop_duplicates("index").set_index("index").loc[index]
            correct = per_image_correct(sub, patch)
            flags = {c: per_image_certified(sub, c, patch) for c in conditions}
            accuracy = {c: float((correct & flags[c]).mean()) for c in conditions}
            mask = flags[conditions[0]].to_numpy()
            return accuracy, f"{name}: {len(index)} of {len(table)} images", mask
        if int(run["n_images"].iloc[0]) == len(index) and index == list(range(len(index))):
            accuracy = dict(zip(run["condition"], run["certified_accuracy"], strict=True))
            return accuracy, f"{name}: the same {len(index)} images", None
    return None


def budget_text(row: dict) -> str | None:
    """The attack budget of a row, e.g. "steps 10, restarts 2, step 0.15, stride 7, worst 8"."""
    parts = [f"{label} {format(row[f'attack_{key}'], 'g')}" for key, label in BUDGET
             if pd.notna(row.get(f"attack_{key}", np.nan))]
    return ", ".join(parts) or None


def parse_params(text: object) -> dict:
    """The ``params`` JSON of a row ({} when absent); ValueError when malformed."""
    if not isinstance(text, str) or not text:
        return {}
    parsed = json.loads(text)
    if not isinstance(parsed, dict):
        raise ValueError("params is not a JSON object")
    return parsed


HEADLINE_PATCHES = ("2x12", "12x2")  # shown beside 5x5: patches long across one axis


def headline_table(accuracy: pd.DataFrame, configs: pd.DataFrame,
                   chosen: dict[tuple[str, str], str], notes: list[str]) -> Table | None:
    """Per dataset and defense, the test numbers of the configuration chosen on val
    (``chosen``: (dataset, defense) -> its label; choice.py): README's headline numbers.
    Every condition at 5x5, then the primary ones at HEADLINE_PATCHES; a condition no
    headline row has gets no column. ``notes``: why a defense has no row."""
    at_5x5 = accuracy[accuracy["patch"] == "5x5"]
    primary = primary_conditions(at_5x5)
    rows = at_5x5[pd.Series([chosen.get((d, f)) == c for d, f, c in zip(
        at_5x5["dataset"], at_5x5["defense"], at_5x5["config"], strict=True)],
        index=at_5x5.index, dtype=bool)]
    if rows.empty:
        return None
    used = [c.removesuffix(" (%)") for c in condition_columns(rows) if rows[c].notna().any()]
    firsts = ordered({primary[d] for d in rows["defense"]})
    records = []
    for best in rows.to_dict("records"):
        same = (accuracy["dataset"] == best["dataset"]) & (accuracy["config"] == best["config"])
        config = configs[(configs["dataset"] == best["dataset"])
                         & (configs["config"] == best["config"])].iloc[0]
        record = {"dataset": best["dataset"], "defense": best["defense"],
                  "config": best["config"],
                  **({"model": config["model"]} if "model" in config else {}),
                  "images": best["images"],
                  "clean (%)": best["clean (%)"],
                  **{f"5x5 {c} (%)": best.get(f"{c} (%)", np.nan) for c in used}}
        for patch in HEADLINE_PATCHES:
            row = accuracy[same & (accuracy["patch"] == patch)]
            for c in firsts:
                record[f"{patch} {c} (%)"] = (row[f"{c} (%)"].iloc[0] if len(row)
                                              else np.nan)
        record.update({TIME: config[TIME], "parameters": config["parameters"],
                       "device": config["device"]})
        records.append(record)
    frame = pd.DataFrame(records)
    return Table("headline", "Chosen on val: one configuration per defense", frame,
                 " ".join([INTERVALS, f"Time: certifying {PER_IMAGES:,} images for every patch "
                           "shape and condition of the configuration's run (separate runs: "
                           "compare speeds with `patchbench bench`).", *notes]),
                 accuracy_intervals(frame))
