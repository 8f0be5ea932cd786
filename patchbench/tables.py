"""The report's tables and findings, computed from checked, labelled result rows.

Inputs are the frames ``report.py`` prepares: certified rows (one per configuration, patch
shape and condition; accuracies as fractions) and empirical attack rows (one per
configuration, split and patch shape), both with a ``config`` label and a ``config_key``.
Tables hold percentages; findings are sentences computed from the tables, so no number in a
report is ever typed by hand.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from patchbench.certify import CONDITIONS
from patchbench.per_image import certified as per_image_certified
from patchbench.per_image import conditions as per_image_conditions
from patchbench.per_image import correct as per_image_correct
from patchbench.per_image import has_condition as per_image_has

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
            f"{either(conditions)} condition (README).")
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


def configs_table(configs: pd.DataFrame, per_shape: list[str] | None = None) -> Table:
    """``per_shape``: configurations whose clean accuracy depends on the patch shape."""
    note = ("Certification time covers every patch shape and condition of the run, scaled to "
            f"{PER_IMAGES:,} images; the forward share is the defense's vote computation.")
    if per_shape:
        note += (f" Clean of {', '.join(per_shape)} (a prediction per patch shape): at 5x5; "
                 "every shape's is in the accuracy table.")
    return Table("configurations", "Configurations", configs.drop(columns="key"), note)


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
        if key in swept and "rf=" not in header:
            header = f"{header} rf={params[key]['rf']}"
        mine = mine_rows[mine_rows["config_key"] == key].set_index("patch")["certified_accuracy"]
        columns[header] = [row["clean (%)"],
                           *(100 * mine.get(p, np.nan) for p in shapes),
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
    return Table("rf_sweep", "Receptive-field sweep", frame,
                 f"BagCert by receptive field, other defenses for comparison{conditions}; "
                 f"times measured on {devices or 'an unrecorded device'}.")


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
    primary = primary_conditions(accuracy)  # each defense is ranked by its primary condition
    value = "certified (%)"
    ranked_all = accuracy.assign(**{value: primary_values(accuracy),
                                    "condition": accuracy["defense"].map(primary)})
    out = []
    for dataset, rows in ranked_all[ranked_all["patch"] == ref].groupby("dataset", sort=False):
        ranked = rows.dropna(subset=[value]).sort_values(value, ascending=False, kind="stable")
        if ranked.empty:
            continue
        best = ranked.iloc[0]
        text = (f"At {ref} on {dataset}, **{best['config']}** certifies the most: "
                f"{best[value]:.1f}% ({best['condition']}; clean {best['clean (%)']:.1f}%, "
                f"{best['images']} images)")
        if len(ranked) > 1:
            second = ranked.iloc[1]
            other = ("" if second["condition"] == best["condition"]
                     else f", {second['condition']}")
            text += f", ahead of {second['config']} ({second[value]:.1f}%{other})"
        out.append(text + ".")
    if gains is not None and not gains.frame.empty:
        out.append(gain_sentence(gains.frame, ref))
    out += orientation_sentences(ranked_all, value)
    out += speed_sentences(configs)
    out += rf_sentences(accuracy, configs, params, ref)
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
    spread.sort(key=lambda s: s[0])  # stable: equal spreads keep the table's order
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
    sweep = rf_sweep(configs, params)
    if not sweep or "tight (%)" not in accuracy:
        return []
    at_ref = accuracy[(accuracy["patch"] == ref) & accuracy["config"].isin(sweep.values())]
    at_ref = at_ref.dropna(subset=["tight (%)"])
    if at_ref.empty:
        return []
    rf = {config: r for r, config in sweep.items()}
    best = at_ref.loc[at_ref["tight (%)"].idxmax()]
    by_config = configs.set_index("config")
    first, last = by_config.loc[sweep[min(sweep)]], by_config.loc[sweep[max(sweep)]]
    return [f"Across receptive fields {', '.join(str(r) for r in sweep)} (one recipe), "
            f"rf {rf[best['config']]} certifies the most at {ref} ({best['tight (%)']:.1f}%, "
            f"{best['config']}); certification time per {PER_IMAGES:,} images goes from "
            f"{first[TIME]:.1f} s (rf {min(sweep)}) to {last[TIME]:.1f} s (rf {max(sweep)}), "
            f"x{last[TIME] / first[TIME]:.2f}"
            + ("" if pd.isna(first["parameters"]) or pd.isna(last["parameters"]) else
               f", and the parameters from {int(first['parameters']):,} to "
               f"{int(last['parameters']):,}, x{last['parameters'] / first['parameters']:.2f}")
            + "."]


def rf_sweep(configs: pd.DataFrame, params: dict[str, dict]) -> dict[int, str]:
    """rf -> config of the BagCert configurations that differ only in rf (the largest such
    group, at least two receptive fields); {} if there is none."""
    groups: dict[str, dict[int, str]] = {}
    for key, config, defense in zip(configs["key"], configs["config"], configs["defense"],
                                    strict=True):
        described = params.get(key, {})
        if defense != "bagcert" or "rf" not in described:
            continue
        rest = json.dumps({k: v for k, v in described.items() if k != "rf"}, sort_keys=True)
        groups.setdefault(rest, {})[int(described["rf"])] = config
    sweep = max(groups.values(), key=len, default={})
    return dict(sorted(sweep.items())) if len(sweep) >= 2 else {}


PerImage = Callable[[str], "pd.DataFrame | None"]  # a cell's per-image table, if readable


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
                 " ".join([note, *notes]))


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


def attack_sentences(attacks: pd.DataFrame) -> list[str]:
    """The gap between attacked and certified accuracy, and whether a certificate broke."""
    known = attacks.dropna(subset=[GAP])

    def under(rows: pd.DataFrame) -> str:  # the conditions the gaps of these rows are under
        return " or ".join(gap_conditions(rows)) or "tight"

    broken = attacks[attacks["violations"].fillna(0) > 0]
    out = []
    below = known[known[GAP] < 0]
    if not below.empty:  # only where a certified image was broken, or the bookkeeping is off
        cases = ", ".join(f"{r['config']} at {r['patch']}" for _, r in below.iterrows())
        out.append(f"Under the attack, accuracy falls {-below[GAP].max():.1f}"
                   + (f"–{-below[GAP].min():.1f}" if len(below) > 1 else "")
                   + f" points below the certified ({under(below)}) accuracy of the same "
                   "images for "
                   f"{cases}, which a sound certificate rules out.")
        known = known[known[GAP] >= 0]
    if not known.empty:
        low, high = known[GAP].min(), known[GAP].max()
        span = f"{low:.1f}" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}–{high:.1f}"
        text = (f"Under the attack, accuracy stays {span} points above the certified "
                f"({under(known)}) accuracy of the same images")
        if len(known) > 1:
            widest = known.loc[known[GAP].idxmax()]
            text += f" ({len(known)} configuration and shape pairs" + (
                f"; the widest gap: {widest['config']} at {widest['patch']})" if high > low
                else ")")
        if broken.empty and attacks["violations"].notna().all():
            text += "; no certified image was broken"
        out.append(text + ".")
    if not broken.empty:
        cases = ", ".join(f"{r['config']} at {r['patch']} ({int(r['violations'])})"
                          for _, r in broken.iterrows())
        out.append(f"**Soundness violation**: the attack changed the prediction of "
                   f"{int(broken['violations'].sum())} certified image(s) ({cases}): a "
                   "certificate is wrong.")
    return out


def gap_conditions(attacks: pd.DataFrame) -> list[str]:
    """The conditions the gaps of attack-table rows are taken under: per row its primary, the
    first condition column with a value."""
    columns = condition_columns(attacks, ("clean (%)", "empirical (%)"))
    found = {next((c.removesuffix(" (%)") for c in columns if pd.notna(row[c])), None)
             for _, row in attacks.iterrows()}
    return ordered({c for c in found if c})


def parse_params(text: object) -> dict:
    """The ``params`` JSON of a row ({} when absent); ValueError when malformed."""
    if not isinstance(text, str) or not text:
        return {}
    parsed = json.loads(text)
    if not isinstance(parsed, dict):
        raise ValueError("params is not a JSON object")
    return parsed


HEADLINE_PATCHES = ("2x12", "12x2")  # shown beside 5x5: patches long across one axis


def best_row(at_5x5: pd.DataFrame, value: str = "tight (%)") -> pd.Series:
    """The row that certifies the most (``value``: the defense's primary condition), ties to
    the higher clean accuracy."""
    return at_5x5.sort_values([value, "clean (%)"], ascending=False, kind="stable").iloc[0]


def best_configs(accuracy: pd.DataFrame) -> dict[str, str]:
    """defense -> its headline configuration: most certified at 5x5 (its primary condition:
    tight for vote maps), ties to the higher clean accuracy. For the accuracy table of one
    dataset."""
    at_5x5 = accuracy[accuracy["patch"] == "5x5"]
    primary = primary_conditions(at_5x5)
    return {defense: best_row(group, f"{primary[defense]} (%)")["config"]
            for defense, group in at_5x5.groupby("defense", sort=False) if defense in primary}


def headline_table(accuracy: pd.DataFrame, configs: pd.DataFrame) -> Table | None:
    """Per dataset and defense, the configuration that certifies the most against 5x5 patches
    (under the defense's primary condition, tight for vote maps; ties to the higher clean
    accuracy): README's headline numbers. Every condition at 5x5, then the primary ones at
    HEADLINE_PATCHES; a condition no headline row has gets no column."""
    at_5x5 = accuracy[accuracy["patch"] == "5x5"]
    primary = primary_conditions(at_5x5)
    if not primary:
        return None
    used = [c.removesuffix(" (%)") for c in condition_columns(at_5x5) if at_5x5[c].notna().any()]
    firsts = ordered(set(primary.values()))
    records = []
    for (dataset, defense), group in at_5x5.groupby(["dataset", "defense"], sort=False):
        if defense not in primary:
            continue
        best = best_row(group, f"{primary[defense]} (%)")
        same = (accuracy["dataset"] == dataset) & (accuracy["config"] == best["config"])
        config = configs[(configs["dataset"] == dataset)
                         & (configs["config"] == best["config"])].iloc[0]
        record = {"dataset": dataset, "defense": defense, "config": best["config"],
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
    return Table("headline", "Best configuration per defense (most certified at 5x5, "
                 f"{'/'.join(firsts)})", pd.DataFrame(records),
                 f"Time: certifying {PER_IMAGES:,} images for every patch shape and condition "
                 "of the configuration's run.")
