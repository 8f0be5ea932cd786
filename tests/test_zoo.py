"""The model zoo: every shipped checkpoint has one name, the values a name sets are the study's
choices on val, each built-in's default is its shipped val choice, and ``--model NAME``
certifies a shipped model without training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from patchbench import load_model
from patchbench.cli import cli
from patchbench.defense import get_defense
from patchbench.reporting.choice import val_choices
from patchbench.reporting.readme import find_block
from patchbench.reporting.report import validation_rows
from patchbench.running.cache import SHIPPED, find_checkpoint, model_key
from patchbench.running.checkpoint import read_header
from patchbench.running.results import load_results
from patchbench.running.train import TrainConfig
from patchbench.running.zoo import (
    SHIPPED_RESULTS,
    ZOO_BLOCK,
    model_numbers,
    read_manifest,
    update_readme,
    zoo_models,
    zoo_rows,
)

pytestmark = pytest.mark.slow  # reads every shipped checkpoint and the committed results

ROOT = Path(__file__).resolve().parent.parent
BUILT_INS = ("bagcert", "ds-column", "ds-row", "ds-block", "patchcleanser")
NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)+$")


@pytest.fixture(scope="module")
def committed_val() -> pd.DataFrame:
    return validation_rows(SHIPPED_RESULTS, load_results(SHIPPED_RESULTS))


def shipped():
    return zoo_models(include_cache=False)


def test_every_shipped_checkpoint_has_exactly_one_name() -> None:
    files = [entry.file for entry in read_manifest().values()]
    assert sorted(files) == sorted(p.name for p in SHIPPED.glob("*.pt"))
    assert all(NAME.match(name) for name in read_manifest())


def test_a_names_certification_values_are_the_val_rule_s_choice_for_its_weights(
        committed_val: pd.DataFrame) -> None:
    """Where a defense has certification-only parameters (a threshold, masks per axis), the
    zoo's value is what the study's rule picks among the val rows of those very weights."""
    for model in shipped():
        certify_only = get_defense(model.defense).certify_params
        assert set(model.certify) == set(certify_only), model.name
        if not certify_only:
            continue
        rows = committed_val[committed_val["checkpoint_sha256"] == model.sha256]
        assert not rows.empty, f"{model.name}: no val rows to choose on"
        (choice,) = val_choices(rows).values()
        chosen = json.loads(choice.key.split("|")[2])
        assert {k: chosen[k] for k in certify_only} == model.certify, model.name


@pytest.mark.parametrize("defense", BUILT_INS)
def test_each_built_in_s_default_is_its_shipped_val_choice(defense: str,
                                                          committed_val: pd.DataFrame) -> None:
    cls = get_defense(defense)
    default = cls()
    path = find_checkpoint(model_key(default, "fashion-mnist", TrainConfig(**cls.train_defaults)))
    assert path is not None and path.parent == SHIPPED, f"{defense}: default not shipped"
    choice = val_choices(committed_val)[("fashion-mnist", defense)]
    _, _, params, sha = choice.key.split("|")
    assert sha == read_header(path)[1]
    assert json.loads(params) == default.params()  # certification values included


def test_every_shipped_model_has_test_numbers_from_the_committed_rows() -> None:
    models = shipped()
    numbers = model_numbers(models, zoo_rows())
    assert [m.name for m in models if m.name not in numbers] == []
    for model in models:
        found = numbers[model.name]
        assert found.n_images == 10_000 and found.condition in ("tight", "masking")
        rows = pd.read_csv(SHIPPED_RESULTS / "rows" / f"{found.cell}.csv")
        assert set(rows["checkpoint_sha256"]) == {model.sha256}


def test_readme_s_zoo_table_is_the_generated_one(tmp_path: Path) -> None:
    """README's block is what ``patchbench models --readme`` writes now: it cannot drift."""
    copy = tmp_path / "README.md"
    copy.write_text((ROOT / "README.md").read_text())
    models = zoo_models(include_cache=False)
    update_readme(copy, models, model_numbers(models, zoo_rows()))
    text, start, end = find_block(copy, ZOO_BLOCK)
    committed, c_start, c_end = find_block(ROOT / "README.md", ZOO_BLOCK)
    assert committed[c_start:c_end] == text[start:end], "run: patchbench models --readme README.md"


def test_models_lists_every_model_as_json_and_as_a_table(isolated_cache: Path) -> None:
    result = CliRunner().invoke(cli, ["models", "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["name"] for r in records] == list(read_manifest())
    first = records[0]
    assert {"defense", "params", "recipe", "dataset", "sha256", "size_bytes", "certify",
            "test"} <= set(first)
    assert first["test"]["n_images"] == 10_000
    assert first["test"]["clean_low"] < first["test"]["clean_accuracy"] < first["test"][
        "clean_high"]
    defaults = {r["defense"]: r["name"] for r in records if r["default"]}
    assert defaults == {"bagcert": "fmnist-bagcert-rf9", "ds-column": "fmnist-column-s6",
                        "ds-row": "fmnist-row-s6", "ds-block": "fmnist-block-s14",
                        "patchcleanser": "fmnist-patchcleanser-w48-30ep"}
    table = CliRunner().invoke(cli, ["models"])
    assert table.exit_code == 0
    assert all(name in table.stdout for name in read_manifest())


def test_cached_models_are_listed_by_their_file_name(checkpoints, isolated_cache: Path) -> None:
    folder = isolated_cache / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "synthetic-bagcert-0123456789ab.pt").write_bytes(checkpoints.good.read_bytes())
    (folder / "broken.pt").write_bytes(b"not a checkpoint")
    records = json.loads(CliRunner().invoke(cli, ["models", "--json"]).stdout)
    cached = [r for r in records if r["source"] == "cache"]
    assert [(r["name"], r["sha256"], r["test"]) for r in cached] == [
        ("synthetic-bagcert-0123456789ab", checkpoints.sha256, None)]


def test_load_model_gives_the_weights_with_the_zoo_s_threshold() -> None:
    loaded = load_model("fmnist-column-s4")
    assert loaded.defense.config.threshold == 0.3  # trained at 0.15, chosen 0.3 on val
    assert loaded.path == SHIPPED / "fashion-mnist-ds-column-54a64a525cb4.pt"
    assert not loaded.model.training


@pytest.mark.parametrize("args", [["--model", "no-such-model"],
                                  ["--model", "fmnist-bagcert-rf9", "--checkpoint",
                                   "checkpoints/x.pt"]])
@pytest.mark.parametrize("command", ["run", "attack"])
def test_a_bad_model_option_is_a_one_line_usage_error(command: str, args: list[str]) -> None:
    result = CliRunner().invoke(cli, [command, *args, "--patch", "5x5"])
    assert result.exit_code == 2, result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "Traceback" not in result.output
    if "no-such-model" in args:
        assert "fmnist-bagcert-rf9" in error[0]  # the names there are


@pytest.mark.slow
@pytest.mark.parametrize("name", list(read_manifest()))
def test_run_model_certifies_each_shipped_model_without_training(
        name: str, tmp_path: Path, isolated_cache: Path) -> None:
    result = CliRunner().invoke(cli, ["run", "--model", name, "--patch", "5x5", "--n-images",
                                      "8", "--device", "cpu", "--results-dir",
                                      str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"model {name} (" in result.stderr  # which checkpoint, by name and hash
    assert "trained first" not in result.stderr and not isolated_cache.exists()
    rows = load_results(tmp_path)
    model = next(m for m in shipped() if m.name == name)
    assert set(rows["checkpoint_sha256"]) == {model.sha256}
    params = json.loads(rows["params"].iloc[0])
    assert {k: params[k] for k in model.certify} == model.certify


def test_a_missing_model_is_announced_with_its_time_or_refused_with_no_train(
        tmp_path: Path, isolated_cache: Path) -> None:
    args = ["run", "--defense", "bagcert", "--dataset", "synthetic", "--rf", "5", "--width",
            "4", "--epochs", "1", "--max-train-images", "64", "--patch", "2x2", "--n-images",
            "4", "--device", "cpu", "--results-dir", str(tmp_path)]
    refused = CliRunner().invoke(cli, [*args, "--no-train"])
    assert refused.exit_code == 1, refused.output
    assert refused.stderr.startswith("Error: no trained model for bagcert")
    assert "--no-train" in refused.stderr and not isolated_cache.exists()
    trained = CliRunner().invoke(cli, args)
    assert trained.exit_code == 0, trained.output
    announced = trained.stderr.index("so it is trained first: about ")
    assert re.search(r"trained first: about \d+ (s|min) \([\d,]+ steps at \d+ ms, measured on "
                     r"cpu\)", trained.stderr)
    assert announced < trained.stderr.index("saved ")


@pytest.mark.parametrize(("manifest", "message"), [
    ("[fmnist-x]\nfile = 'nowhere.pt'\n", "model 'fmnist-x': its checkpoint"),
    ("[fmnist-x]\nfile = 3\n", "entry 'fmnist-x' needs file"),
    ("[fmnist-x\n", "malformed model zoo"),
])
def test_a_broken_zoo_is_a_one_line_error(manifest: str, message: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import patchbench.running.zoo as zoo

    path = tmp_path / "zoo.toml"
    path.write_text(manifest)
    monkeypatch.setattr(zoo, "MANIFEST", path)
    for args in (["models"], ["run", "--model", "fmnist-x", "--patch", "5x5"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        (line,) = result.stderr.splitlines()
        assert line.startswith("Error: ") and message in line
