"""The report's findings: sentences computed from its tables, never typed.

A finding that ranks two configurations says whether the difference is significant (exact
McNemar on the per-image flags of the same images, ``paired.py``); inside the noise it calls
them tied. "Best" configurations are the ones chosen on val (``choice.py``): the test set only
reports. Speeds measured in separate runs are listed, not ranked (``patchbench bench``
measures ratios in one run).
"""

from __future__ import annotations

import pandas as pd

from patchbench.reporting.paired import PairedTests, p_text
from patchbench.reporting.tables import (
    GAP,
    PER_IMAGES,
    TIME,
    SweepSpec,
    Table,
    condition_columns,
    ordered,
    percent_interval,
    primary_conditions,
    primary_values,
    sweep_configs,
)

VALUE = "certified (%)"  # the primary condition's certified accuracy, per row


def reference_patch(accuracy: pd.DataFrame) -> str:
    """5x5 (the talk's headline shape) when present, else the most common shape."""
    patches = accuracy["patch"]
    return "5x5" if (patches == "5x5").any() else str(patches.value_counts().index[0])


def with_interval(percent: float, images: int) -> str:
    """"47.8% [46.8, 48.8]": an accuracy and its 95% Wilson interval."""
    text = percent_interval(percent, images)
    return text.replace(" ", "% ", 1)


def findings(accuracy: pd.DataFrame, configs: pd.DataFrame, gains: Table | None,
             params: dict[str, dict], chosen: dict[tuple[str, str], str],
             paired: PairedTests, sweep: SweepSpec | None = None) -> list[str]:
    """Sentences computed from the tables; ``chosen``: (dataset, defense) -> the label of its
    configuration chosen on val; ``sweep``: the study's swept parameter, if any."""
    ref = reference_patch(accuracy)
    primary = primary_conditions(accuracy)  # each defense is ranked by its primary condition
    ranked_all = accuracy.assign(**{VALUE: primary_values(accuracy),
                                    "condition": accuracy["defense"].map(primary)})
    out = ranking_sentences(ranked_all, ref, chosen, paired)
    if gains is not None and not gains.frame.empty:
        out.append(gain_sentence(gains.frame, ref))
    out += orientation_sentences(ranked_all, paired)
    out += speed_sentences(configs)
    if sweep is not None:
        out += sweep_sentences(accuracy, configs, params, ref, paired, sweep)
    return out


def ranking_sentences(ranked_all: pd.DataFrame, ref: str, chosen: dict[tuple[str, str], str],
                      paired: PairedTests) -> list[str]:
    """Per dataset, the val-chosen configurations ranked at ``ref``: the first, and each
    other one it beats significantly or ties with."""
    out = []
    at_ref = ranked_all[ranked_all["patch"] == ref].dropna(subset=[VALUE])
    for dataset, rows in at_ref.groupby("dataset", sort=False):
        picked = rows[[chosen.get((dataset, d)) == c
                       for d, c in zip(rows["defense"], rows["config"], strict=True)]]
        if picked.empty:
            out.append(f"On {dataset}, no configuration was chosen on val: the report ranks "
                       "none (the accuracy table lists them all).")
            continue
        ranked = picked.sort_values(VALUE, ascending=False, kind="stable")
        best = ranked.iloc[0]
        text = (f"At {ref} on {dataset}, of the configurations chosen on val, "
                f"**{best['config']}** certifies the most: "
                f"{with_interval(best[VALUE], best['images'])} ({best['condition']}; clean "
                f"{best['clean (%)']:.1f}%, {best['images']:,} images)")
        ahead, tied = [], []
        for other in ranked.iloc[1:].to_dict("records"):
            test = paired.compare((best["config"], ref, best["condition"]),
                                  (other["config"], ref, other["condition"]))
            tested = "" if test is None else f", {p_text(test)}"
            what = f"{other['config']} ({other[VALUE]:.1f}%{tested})"
            (tied if test is None or not test.significant else ahead).append(what)
        if ahead:
            text += f"; significantly ahead of {', '.join(ahead)}"
        if tied:
            text += (f"; tied with {', '.join(tied)} (McNemar on the same images, not "
                     "significant at 0.05, or no per-image table)")
        out.append(text + ".")
    return out


def gain_sentence(gains: pd.DataFrame, ref: str) -> str:
    gain = gains["gain (points)"]
    at_ref = gains[gains["patch"] == ref]
    text = ""
    if not at_ref.empty:
        top = at_ref.loc[at_ref["gain (points)"].idxmax()]
        significant = (f" significant for {int(at_ref['significant'].sum())} of {len(at_ref)}"
                       if "significant" in at_ref else "")
        text = (f"The tight condition certifies {at_ref['gain (points)'].mean():.1f} points "
                f"more than the global one on average at {ref}, the same model on the same "
                f"images ({significant.strip() or 'untested'}; largest gain "
                f"{top['gain (points)']:.1f} points, {top['config']}). ")
    return text + (f"Over all {len(gains)} shape and configuration pairs the tight condition "
                   f"gains {gain.mean():.1f} points on average (smallest gain "
                   f"{gain.min():.1f}).")


def orientation_sentences(accuracy: pd.DataFrame, paired: PairedTests) -> list[str]:
    """How much a configuration cares whether a patch is tall or wide (h x w vs w x h)."""
    spread = []
    for config, rows in accuracy.groupby("config", sort=False):
        rows = rows.dropna(subset=[VALUE])
        by_patch = dict(zip(rows["patch"], rows[VALUE], strict=True))
        condition = rows["condition"].iloc[0] if len(rows) else None
        pairs = [(p, transposed(p)) for p in by_patch
                 if side(p, 0) < side(p, 1) and transposed(p) in by_patch]
        if pairs:
            p, q = max(pairs, key=lambda pq: abs(by_patch[pq[0]] - by_patch[pq[1]]))
            spread.append((abs(by_patch[p] - by_patch[q]), config, p, by_patch[p], q,
                           by_patch[q], condition))
    if not spread:
        return []
    spread.sort(key=lambda s: s[0])  # stable: equal spreads keep the table's order

    def tested(config: str, p: str, q: str, condition: str) -> str:
        test = paired.compare((config, p, condition), (config, q, condition))
        if test is None:
            return ""
        return f", {p_text(test)}" + ("" if test.significant else ", not significant")

    gap, config, p, a, q, b, cond = spread[-1]
    text = (f"Patch orientation matters most to **{config}**: {a:.1f}% at {p} vs {b:.1f}% at "
            f"{q} ({gap:.1f} points{tested(config, p, q, cond)})")
    if len(spread) > 1:
        gap, config, p, a, q, b, cond = spread[0]
        text += (f"; least to {config} ({a:.1f}% at {p} vs {b:.1f}% at "
                 f"{q}{tested(config, p, q, cond)})")
    return [text + "."]


def side(patch: str, axis: int) -> int:
    return int(patch.split("x")[axis])


def transposed(patch: str) -> str:
    return f"{side(patch, 1)}x{side(patch, 0)}"


def speed_sentences(configs: pd.DataFrame) -> list[str]:
    """The range of certification times, without a ratio: they come from separate runs on
    a machine whose load differs between them."""
    timed = configs.dropna(subset=[TIME]).sort_values(TIME)
    if timed.empty:
        return []
    devices = ", ".join(sorted(set(timed["device"].dropna().astype(str)))) or "unrecorded"
    fast, slow = timed.iloc[0], timed.iloc[-1]
    if len(timed) == 1:
        return [f"{fast['config']} certifies {PER_IMAGES:,} images in {fast[TIME]:.1f} s "
                f"(device: {devices})."]
    return [f"Certifying {PER_IMAGES:,} images took from {fast[TIME]:.1f} s "
            f"({fast['config']}) to {slow[TIME]:.1f} s ({slow['config']}) on {devices}, in "
            "separate runs: not a speed ranking (`patchbench bench` times defenses in one "
            "run)."]


def sweep_sentences(accuracy: pd.DataFrame, configs: pd.DataFrame, params: dict[str, dict],
                    ref: str, paired: PairedTests, spec: SweepSpec) -> list[str]:
    """What the study's swept parameter changes, on test: reported, not chosen (nothing is
    chosen here unless the val rows choose it)."""
    sweep = sweep_configs(configs, params, spec)
    primary = primary_conditions(accuracy).get(spec.defense)
    column = f"{primary} (%)"
    if not sweep or column not in accuracy:
        return []
    at_ref = accuracy[(accuracy["patch"] == ref) & accuracy["config"].isin(sweep.values())]
    at_ref = at_ref.dropna(subset=[column])
    if at_ref.empty:
        return []
    name = spec.param
    value_of = {config: v for v, config in sweep.items()}
    best = at_ref.loc[at_ref[column].idxmax()]
    tied = [f"{name} {value_of[c]}" for c in at_ref["config"] if c != best["config"] and not (
        (test := paired.compare((best["config"], ref, primary), (c, ref, primary)))
        is not None and test.significant)]
    by_config = configs.set_index("config")
    low, high = min(sweep), max(sweep)
    first, last = by_config.loc[sweep[low]], by_config.loc[sweep[high]]
    return [f"Across {name} {', '.join(str(v) for v in sweep)} ({spec.defense}, one recipe), "
            f"on test, {name} {value_of[best['config']]} certifies the most at {ref} "
            f"({best[column]:.1f}% {primary}, {best['config']})"
            + (f", tied with {', '.join(tied)} (McNemar, not significant)" if tied else
               f", significantly ahead of every other {name}")
            + f"; certification time per {PER_IMAGES:,} images, in separate runs, goes from "
            f"{first[TIME]:.1f} s ({name} {low}) to {last[TIME]:.1f} s ({name} {high})"
            + ("" if pd.isna(first["parameters"]) or pd.isna(last["parameters"]) else
               f", and the parameters from {int(first['parameters']):,} to "
               f"{int(last['parameters']):,}, x{last['parameters'] / first['parameters']:.2f}")
            + "."]


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
