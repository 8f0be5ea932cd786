"""A configuration's label in a report: the same for the same model in every report.

A label depends on the configuration alone, never on which others share its results folder:
the defense, its naming parameters (``Defense.label_params``) always, every other defense
parameter and training-recipe field only where it differs from the defense's default, then
the training precision (``train_precision``) and a certification precision other than fp32
(``cert_precision``). A defense that is not installed shows all its parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from patchbench.defense import Defense, UnknownDefenseError, get_defense
from patchbench.running.train import TrainConfig

RECIPE_SKIP = ("precision",)  # shown as train_precision, always


def defaults(defense: str) -> tuple[tuple[str, ...], dict[str, Any] | None, dict[str, Any]]:
    """(naming parameters, parameter defaults or None if the defense is not installed,
    recipe defaults) of a defense."""
    recipe = dataclasses.asdict(TrainConfig())
    try:
        cls: type[Defense] = get_defense(defense)
    except UnknownDefenseError:
        return (), None, recipe
    params = {f.name: f.default for f in dataclasses.fields(cls.Config)
              if f.default is not dataclasses.MISSING}
    return cls.label_params, params, {**recipe, **cls.train_defaults}


def value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_label(defense: str, params: dict[str, Any], recipe: dict[str, Any],
                 cert_precision: str = "fp32") -> str:
    """e.g. "ds-column ablation_size=6 threshold=0.25 width=48 epochs=28 hold_out_val=yes
    train_precision=bf16"."""
    parts = [*param_parts(defense, params), *recipe_parts(defense, recipe)]
    if cert_precision and cert_precision != "fp32":
        parts.append(f"cert_precision={cert_precision}")
    return " ".join([defense, *parts])


def param_parts(defense: str, params: dict[str, Any]) -> list[str]:
    """``name=value`` of the naming parameters, then of those that differ from the default."""
    naming, param_defaults, _ = defaults(defense)
    shown = [n for n in naming if n in params]
    shown += [n for n in params if n not in shown and (
        param_defaults is None or n not in param_defaults or params[n] != param_defaults[n])]
    return [f"{n}={value_text(params[n])}" for n in shown]


def recipe_parts(defense: str, recipe: dict[str, Any]) -> list[str]:
    """``name=value`` of the recipe fields that differ from the defense's recipe, then the
    training precision (always)."""
    recipe_defaults = defaults(defense)[2]
    parts = [f"{n}={value_text(recipe[n])}" for n in recipe_defaults  # TrainConfig's order
             if n not in RECIPE_SKIP and n in recipe and recipe[n] != recipe_defaults[n]]
    return [*parts, f"train_precision={recipe.get('precision', 'fp32')}"]
