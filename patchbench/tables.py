"""The report's tables and findings, computed from checked, labelled result rows.

Inputs are the frames ``report.py`` prepares: certified rows (one per configuration, patch
shape and condition; accuracies as fractions) and empirical attack rows, both with a
``config`` label and a ``config_key``. Tables hold percentages; findings are sentences
computed from the tables, so no number in a report is ever typed by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from patchbench.certify import CONDITIONS

PER_IMAGES = 10_000  # certification time is reported for this many images, as in the talk
TIME = f"s per {PER_IMAGES:,} images"  # that time's column in the configurations table
NOT_CERTIFIED = ("clean (%)", "empirical (%)")  # the accuracy columns that are no condition


@dataclass
class Table:
    """A named table of the report, written as Markdown, CSV and LaTeX."""

    name: str  # file stem under tables/
    title: str
    frame: pd.DataFrame
    note: str = ""


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column, or NaN where an older results file does not have it."""
    return frame[name] if name in frame else pd.Series(np.nan, index=frame.index)


def text_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column as strings, empty where missing."""
    values = column(frame, name)
    return values.astype(object).where(values.notna(), "").astype(str)


def conditions_of(rows: pd.DataFrame) -> list[str]:
    present = set(rows["condition"])
    return [c for c in CONDITIONS if c in present] + sorted(present - set(CONDITIONS))


def accuracy_table(certified: pd.DataFrame, empirical: pd.DataFrame) -> Table:
    """Clean and certified accuracy per configuration and patch, with the attack's next to it."""
    conditions = conditions_of(certified)
    attacked = {(k, p): v for k, p, v in zip(empirical["config_key"], empirical["patch"],
                                              empirical["empirical_accuracy"], strict=True)}
    records = []
    for (key, patch), group in certified.groupby(["config_key", "patch"], sort=False):
        first = group.iloc[0]
        by_condition = dict(zip(group["condition"], group["certified_accuracy"], strict=True))
        record = {"dataset": first["dataset"], "defense": first["defense"],
                  "config": first["config"], "patch": patch, "images": int(first["n_images"]),
                  "clean (%)": 100 * first["clean_accuracy"]}
        record.update({f"{c} (%)": 100 * by_condition.get(c, np.nan) for c in conditions})
        if attacked:
            record["empirical (%)"] = 100 * attacked.get((key, patch), np.nan)
        records.append(record)
    note = ("Certified: correct and certified for every position of the patch, under the "
            "tight or the global condition (README).")
    if attacked:
        note += " Empirical: accuracy under the patch attack, an upper bound of the certified."
    return Table("accuracy", "Clean and certified accuracy (%)", pd.DataFrame(records), note)


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


def configs_table(configs: pd.DataFrame) -> Table:
    return Table("configurations", "Configurations", configs.drop(columns="key"),
                 "Certification time covers every patch shape and condition of the run, "
                 f"scaled to {PER_IMAGES:,} images; the forward share is the defense's vote "
                 "computation.")


def rf_sweep_table(certified: pd.DataFrame, configs: pd.DataFrame,
                   params: dict[str, dict]) -> Table | None:
    """The talk's table: a column per receptive field, then the other defenses for comparison.

    None when no configuration has a receptive field (``rf``) parameter.
    """
    swept = sorted((k for k in configs["key"] if "rf" in params[k]),
                   key=lambda k: (params[k]["rf"], k))
    if not swept:
        return None
    datasets = set(configs.loc[configs["key"].isin(swept), "dataset"])
    keys = swept + [k for k, d in zip(configs["key"], configs["dataset"], strict=True)
                    if k not in swept and d in datasets]
    tight = certified[certified["condition"] == "tight"]
    shapes = tight[tight["config_key"].isin(swept)].drop_duplicates("patch")
    shapes = shapes.sort_values(["patch_area", "patch_h"])["patch"].tolist()
    by_key = configs.set_index("key")
    columns = {}
    for key in keys:
        row = by_key.loc[key]
        header = row["config"]
        if key in swept and "rf=" not in header:
            header = f"{header} rf={params[key]['rf']}"
        mine = tight[tight["config_key"] == key].set_index("patch")["certified_accuracy"]
        columns[header] = [row["clean (%)"],
                           *(100 * mine.get(p, np.nan) for p in shapes),
                           row[TIME], row["parameters"]]
    index = ["clean (%)", *(f"certified {p}, tight (%)" for p in shapes),
             f"cert. time, {PER_IMAGES:,} images (s)", "parameters"]
    frame = pd.DataFrame(columns, index=index, dtype=object).rename_axis("measure").reset_index()
    devices = ", ".join(sorted(set(by_key.loc[keys, "device"].dropna().astype(str))))
    return Table("rf_sweep", "Receptive-field sweep", frame,
                 f"BagCert by receptive field, other defenses for comparison; times measured "
                 f"on {devices or 'an unrecorded device'}.")


def gain_table(accuracy: pd.DataFrame) -> Table | None:
    """Points the tight condition certifies above the global one; None without both."""
    if not {"tight (%)", "global (%)"} <= set(accuracy.columns):
        return None
    both = accuracy.dropna(subset=["tight (%)", "global (%)"])
    frame = both[["dataset", "config", "patch", "tight (%)", "global (%)"]].assign(
        **{"gain (points)": both["tight (%)"] - both["global (%)"]}).reset_index(drop=True)
    return Table("tight_vs_global", "Tight vs global condition", frame,
                 "Same model and votes; the tight condition checks every footprint, the "
                 "global one only the largest.")


def reference_patch(accuracy: pd.DataFrame) -> str:
    """5x5 (the talk's headline shape) when present, else the most common shape."""
    patches = accuracy["patch"]
    return "5x5" if (patches == "5x5").any() else str(patches.value_counts().index[0])


def findings(accuracy: pd.DataFrame, configs: pd.DataFrame, gains: Table | None,
             params: dict[str, dict]) -> list[str]:
    """Sentences computed from the tables."""
    ref = reference_patch(accuracy)
    value = "tight (%)" if "tight (%)" in accuracy else next(
        c for c in accuracy.columns if c.endswith("(%)") and c not in NOT_CERTIFIED)
    cond = value.removesuffix(" (%)")
    out = []
    for dataset, rows in accuracy[accuracy["patch"] == ref].groupby("dataset", sort=False):
        ranked = rows.dropna(subset=[value]).sort_values(value, ascending=False)
        if ranked.empty:
            continue
        best = ranked.iloc[0]
        text = (f"At {ref} on {dataset}, **{best['config']}** certifies the most: "
                f"{best[value]:.1f}% ({cond}; clean {best['clean (%)']:.1f}%, "
                f"{best['images']} images)")
        if len(ranked) > 1:
            second = ranked.iloc[1]
            text += f", ahead of {second['config']} ({second[value]:.1f}%)"
        out.append(text + ".")
    if gains is not None and not gains.frame.empty:
        out.append(gain_sentence(gains.frame, ref))
    out += orientation_sentences(accuracy, value)
    out += speed_sentences(configs)
    out += rf_sentences(accuracy, configs, params, ref)
    if "empirical (%)" in accuracy:
        out += empirical_sentences(accuracy, value)
    return out


def gain_sentence(gains: pd.DataFrame, ref: str) -> str:
    gain = gains["gain (points)"]
    at_ref = gains[gains["patch"] == ref]
    text = ""
    if not at_ref.empty:
        top = at_ref.loc[at_ref["gain (points)"].idxmax()]
        text = (f"The tight condition certifies {at_ref['gain (points)'].mean():.1f} points "
                f"more than the global one on average at {ref} (largest gain "
                f"{top['gain (points)']:.1f} points, {top['config']}). ")
    return text + (f"Over all {len(gains)} shape and configuration pairs the tight condition "
                   f"gains {gain.mean():.1f} points on average (smallest gain "
                   f"{gain.min():.1f}).")


def orientation_sentences(accuracy: pd.DataFrame, value: str) -> list[str]:
    """How much a configuration cares whether a patch is tall or wide (h x w vs w x h)."""
    spread = []
    for config, rows in accuracy.groupby("config", sort=False):
        rows = rows.dropna(subset=[value])
        by_patch = dict(zip(rows["patch"], rows[value], strict=True))
        pairs = [(p, transposed(p)) for p in by_patch
                 if side(p, 0) < side(p, 1) and transposed(p) in by_patch]
        if pairs:
            p, q = max(pairs, key=lambda pq: abs(by_patch[pq[0]] - by_patch[pq[1]]))
            spread.append((abs(by_patch[p] - by_patch[q]), config, p, by_patch[p], q,
                           by_patch[q]))
    if not spread:
        return []
    spread.sort(key=lambda s: s[0])
    gap, config, p, a, q, b = spread[-1]
    text = (f"Patch orientation matters most to **{config}**: {a:.1f}% at {p} vs {b:.1f}% at "
            f"{q} ({gap:.1f} points)")
    if len(spread) > 1:
        gap, config, p, a, q, b = spread[0]
        text += f"; least to {config} ({a:.1f}% at {p} vs {b:.1f}% at {q})"
    return [text + "."]


def side(patch: str, axis: int) -> int:
    return int(patch.split("x")[axis])


def transposed(patch: str) -> str:
    return f"{side(patch, 1)}x{side(patch, 0)}"


def speed_sentences(configs: pd.DataFrame) -> list[str]:
    timed = configs.dropna(subset=[TIME]).sort_values(TIME)
    if timed.empty:
        return []
    devices = ", ".join(sorted(set(timed["device"].dropna().astype(str)))) or "unrecorded"
    fast = timed.iloc[0]
    if len(timed) == 1:
        return [f"{fast['config']} certifies {PER_IMAGES:,} images in {fast[TIME]:.1f} s "
                f"(device: {devices})."]
    slow = timed.iloc[-1]
    return [f"Certifying {PER_IMAGES:,} images takes {fast[TIME]:.1f} s with {fast['config']} "
            f"and {slow[TIME]:.1f} s with {slow['config']}, {slow[TIME] / fast[TIME]:.1f}x "
            f"longer (device: {devices})."]


def rf_sentences(accuracy: pd.DataFrame, configs: pd.DataFrame, params: dict[str, dict],
                 ref: str) -> list[str]:
    swept = configs[[("rf" in params[k]) for k in configs["key"]]]
    rf = {c: params[k]["rf"] for k, c in zip(swept["key"], swept["config"], strict=True)}
    if len(set(rf.values())) < 2 or "tight (%)" not in accuracy:
        return []
    at_ref = accuracy[(accuracy["patch"] == ref) & accuracy["config"].isin(list(rf))]
    at_ref = at_ref.dropna(subset=["tight (%)"])
    if at_ref.empty:
        return []
    best = at_ref.loc[at_ref["tight (%)"].idxmax()]
    times = swept.assign(rf=swept["config"].map(rf)).sort_values("rf")
    return [f"Across receptive fields {', '.join(str(r) for r in sorted(set(rf.values())))}, "
            f"rf {rf[best['config']]} certifies the most at {ref} ({best['tight (%)']:.1f}%, "
            f"{best['config']}); certification time per {PER_IMAGES:,} images goes from "
            f"{times[TIME].iloc[0]:.1f} s (rf {times['rf'].iloc[0]}) to "
            f"{times[TIME].iloc[-1]:.1f} s (rf {times['rf'].iloc[-1]})."]


def empirical_sentences(accuracy: pd.DataFrame, value: str) -> list[str]:
    both = accuracy.dropna(subset=["empirical (%)", value])
    if both.empty:
        return []
    gap = both["empirical (%)"] - both[value]
    out = [f"Under the patch attack the models keep {gap.mean():.1f} points more accuracy "
           f"than is certified ({value.removesuffix(' (%)')}), on average over {len(both)} "
           "shape and configuration pairs: the room a better attack or a tighter certificate "
           "could close."]
    broken = both[gap < -1e-9]
    if not broken.empty:
        cases = ", ".join(f"{r['config']} at {r['patch']}" for _, r in broken.iterrows())
        out.append(f"**Warning**: empirical accuracy is below certified accuracy for {cases}: "
                   "a certificate or the attack is wrong (or they saw different images).")
    return out


def parse_params(text: object) -> dict:
    """The ``params`` JSON of a row ({} when absent); ValueError when malformed."""
    if not isinstance(text, str) or not text:
        return {}
    parsed = json.loads(text)
    if not isinstance(parsed, dict):
        raise ValueError("params is not a JSON object")
    return parsed
