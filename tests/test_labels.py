"""A configuration's label depends on the configuration alone: its naming parameters always,
what differs from the defense's defaults, its training precision; never on which other
configurations share its results folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from patchbench.defense import get_defense
from patchbench.reporting.labels import config_label
from patchbench.reporting.report import build_report
from patchbench.running.train import TrainConfig
from tests.test_choice import identity, write_cell, write_val


def defaults(defense: str) -> tuple[dict, dict]:
    """A defense's parameter defaults and training recipe (as a row records them)."""
    cls = get_defense(defense)
    params = {f.name: f.default for f in dataclasses.fields(cls.Config)
              if f.default is not dataclasses.MISSING}
    return params, {**dataclasses.asdict(TrainConfig()), **cls.train_defaults}


@pytest.mark.parametrize(("defense", "shown"), [
    ("bagcert", "rf=9 train_precision=bf16"),
    ("ds-column", "ablation_size=6 threshold=0.25 train_precision=bf16"),  # s and theta
    ("ds-block", "ablation_size=14 threshold=0.4 train_precision=bf16"),
    ("patchcleanser", "masks_per_axis=6 train_precision=fp32"),
])
def test_the_naming_parameters_are_shown_even_at_their_defaults(defense: str, shown: str):
    params, recipe = defaults(defense)
    assert config_label(defense, params, recipe) == f"{defense} {shown}"


def test_other_parameters_and_recipe_fields_only_where_they_differ():
    params, recipe = defaults("bagcert")
    assert config_label("bagcert", {**params, "rf": 5, "width": 8, "cell_loss": "ce"},
                        {**recipe, "epochs": 4, "hold_out_val": False}) == (
        "bagcert rf=5 width=8 cell_loss=ce epochs=4 hold_out_val=no train_precision=bf16")
    # the recipe is compared with the defense's own defaults: 28 epochs is column smoothing's
    params, recipe = defaults("ds-column")
    assert config_label("ds-column", params, {**recipe, "epochs": 28}) == (
        "ds-column ablation_size=6 threshold=0.25 train_precision=bf16")
    assert "epochs=8" in config_label("ds-column", params, {**recipe, "epochs": 8})


def test_precisions_of_training_and_certification():
    params, recipe = defaults("bagcert")
    assert config_label("bagcert", params, {**recipe, "precision": "fp32"}) == (
        "bagcert rf=9 train_precision=fp32")
    assert config_label("bagcert", params, recipe, cert_precision="fp16") == (
        "bagcert rf=9 train_precision=bf16 cert_precision=fp16")
    assert "cert_precision" not in config_label("bagcert", params, recipe, "fp32")
    # a row without a recipe was trained in fp32 (the default before the field existed)
    assert config_label("bagcert", {"rf": 7}, {}) == "bagcert rf=7 train_precision=fp32"


def test_a_defense_that_is_not_installed_shows_every_parameter():
    assert config_label("elsewhere", {"k": 3, "scale": 0.5, "fast": False}, {}) == (
        "elsewhere k=3 scale=0.5 fast=no train_precision=fp32")


def report_labels(results: Path, out: Path) -> dict[str, str]:
    """checkpoint (12 characters) -> label, from the report's configurations table."""
    build_report(results, out, gallery_images=0)
    configs = pd.read_csv(out / "tables" / "configurations.csv")
    accuracy = pd.read_csv(out / "tables" / "accuracy.csv")
    assert set(accuracy["config"]) == set(configs["config"])  # one label throughout
    return dict(zip(configs["checkpoint"], configs["config"], strict=True))


@pytest.mark.slow  # trains and builds reports
def test_a_configuration_has_one_label_whoever_shares_its_folder(tmp_path: Path):
    """BagCert rf 7, width 8 alone, then beside rf 5 (same recipe), rf 7 in bf16 and column
    smoothing: the same label both times (not the parameters that happen to vary)."""
    base = {**defaults("bagcert")[0], "width": 8}
    recipe = {**defaults("bagcert")[1], "epochs": 8}

    def bagcert(results: Path, cell: str, sha: str, rf: int, precision: str = "fp32") -> None:
        config = {**identity("bagcert", {**base, "rf": rf}, sha * 64),
                  "train_config": json.dumps({**recipe, "precision": precision})}
        write_cell(results, config, cell, 150, {("tight", "5x5"): 80})
        write_val(results / "validation" / cell, config, cell, 0.8, 0.4)

    alone, shared = tmp_path / "alone", tmp_path / "shared"
    bagcert(alone, "mine", "a", 7)
    bagcert(shared, "mine", "a", 7)
    bagcert(shared, "rf5", "b", 5)
    bagcert(shared, "bf16", "c", 7, "bf16")
    write_cell(shared, identity("ds-column", {"ablation_size": 4, "threshold": 0.2}, "d" * 64),
               "column", 150, {("tight", "5x5"): 60})
    mine = "bagcert rf=7 width=8 train_precision=fp32"
    assert report_labels(alone, tmp_path / "out-alone") == {"a" * 12: mine}
    assert report_labels(shared, tmp_path / "out-shared") == {
        "a" * 12: mine, "b" * 12: "bagcert rf=5 width=8 train_precision=fp32",
        "c" * 12: "bagcert rf=7 width=8 train_precision=bf16",
        "d" * 12: "ds-column ablation_size=4 threshold=0.2 hold_out_val=no "
                  "train_precision=fp32"}
