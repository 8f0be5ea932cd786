"""The command line with good input: commands, tables and result files.

Bad input (one line, the right exit code, no traceback) is tested in test_bad_input.py.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner, Result

from patchbench import __version__
from patchbench.cli import cli
from tests.conftest import TINY, Checkpoints

RUN = ["run", "--defense", "bagcert", "--dataset", "synthetic", "--n-images", "8"]
DEFENSES = ("bagcert", "ds-column", "ds-row", "ds-block")
ROW_COLUMNS = ("patch", "condition", "clean_accuracy", "certified_accuracy", "n_images",
               "certify_seconds", "forward_seconds", "device", "git_commit", "checkpoint_sha256")


def invoke(*args: str) -> Result:
    """Run the CLI in-process with a wide terminal, so that rich tables do not wrap."""
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})


def assert_clean_exit(result: Result, code: int) -> None:
    """The expected exit code, and no Python exception escaped (so no traceback)."""
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    assert escaped is None, f"uncaught {type(escaped).__name__}: {escaped}"
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default ``--results-dir results`` must land in the test's folder, never the repo."""
    monkeypatch.chdir(tmp_path)


# --- good input ----------------------------------------------------------------------------

def test_help_lists_the_commands() -> None:
    result = invoke("--help")
    assert_clean_exit(result, 0)
    for command in ("defenses", "train", "run"):
        assert command in result.stdout


def test_run_help_shows_the_options() -> None:
    result = invoke("run", "--help")
    assert_clean_exit(result, 0)
    for option in ("--patch", "--defense", "--condition", "--checkpoint", "--device"):
        assert option in result.stdout


def test_version() -> None:
    result = invoke("--version")
    assert_clean_exit(result, 0)
    assert result.stdout.strip() == f"patchbench, version {__version__}"


def test_defenses_lists_the_builtins() -> None:
    result = invoke("defenses")
    assert_clean_exit(result, 0)
    for name in DEFENSES:
        assert name in result.stdout
    assert "rf=" not in result.stdout


def test_defenses_verbose_lists_parameters() -> None:
    result = invoke("defenses", "--verbose")
    assert_clean_exit(result, 0)
    assert "rf=9" in result.stdout and "ablation_size=6" in result.stdout  # the val choices


def read_cell(results_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = list((results_dir / "rows").glob("*.csv"))
    per_image = list((results_dir / "per_image").glob("*.csv.gz"))
    assert len(rows) == 1 and len(per_image) == 1
    assert rows[0].name.removesuffix(".csv") == per_image[0].name.removesuffix(".csv.gz")
    with gzip.open(per_image[0], "rt") as fh:
        return pd.read_csv(rows[0]), pd.read_csv(fh)


def test_run_with_a_checkpoint_writes_rows_and_per_image_tables(checkpoints: Checkpoints,
                                                                 tmp_path: Path) -> None:
    results = tmp_path / "out"
    result = invoke("run", "--defense", "bagcert", "--dataset", "synthetic", "--patch",
                    "5x5,2x12", "--patch", "5x5", "--n-images", "32", "--device", "cpu",
                    "--checkpoint", str(checkpoints.good), "--results-dir", str(results))
    assert_clean_exit(result, 0)
    assert "saved" not in result.stderr  # nothing trained
    rows, per_image = read_cell(results)
    assert f"results: {results / 'rows'}" in result.stderr

    for column in ROW_COLUMNS:
        assert column in rows.columns
    pairs = list(zip(rows["patch"], rows["condition"], strict=True))
    assert sorted(pairs) == sorted((p, c) for p in ("5x5", "2x12") for c in ("tight", "global"))
    assert (rows["n_images"] == 32).all()
    assert (rows["device"] == "cpu").all()
    assert (rows["checkpoint_sha256"] == checkpoints.sha256).all()
    assert (rows["defense"] == "bagcert").all() and (rows["param_rf"] == 5).all()
    assert rows["git_commit"].notna().all()
    assert (rows["certify_seconds"] >= rows["forward_seconds"]).all()
    assert (rows["forward_seconds"] > 0).all()
    assert rows["clean_accuracy"].between(0, 1).all()
    assert (rows["certified_accuracy"] <= rows["clean_accuracy"]).all()

    assert len(per_image) == 32 and per_image["index"].tolist() == list(range(32))
    for column in ("label", "prediction", "margin_tight_5x5", "margin_global_2x12"):
        assert column in per_image.columns
    clean = (per_image["prediction"] == per_image["label"]).mean()
    assert rows["clean_accuracy"].tolist() == pytest.approx([clean] * 4)
    for row in rows.itertuples():
        certified = ((per_image["prediction"] == per_image["label"])
                     & (per_image[f"margin_{row.condition}_{row.patch}"] >= 0)).mean()
        assert row.certified_accuracy == pytest.approx(certified)


def test_run_one_condition(checkpoints: Checkpoints, tmp_path: Path) -> None:
    result = invoke(*RUN, "--patch", "3x3", "--condition", "global", "--checkpoint",
                    str(checkpoints.good), "--results-dir", str(tmp_path / "out"))
    assert_clean_exit(result, 0)
    rows, per_image = read_cell(tmp_path / "out")
    assert rows[["patch", "condition"]].values.tolist() == [["3x3", "global"]]
    assert len(per_image) == 8


@pytest.mark.slow  # trains
def test_run_without_checkpoint_trains_once_then_reuses_the_cache(isolated_cache: Path,
                                                                  tmp_path: Path) -> None:
    args = ("run", "--defense", "bagcert", *TINY, "--patch", "5x5", "--n-images", "16",
            "--device", "cpu", "--results-dir", str(tmp_path / "out"))
    first = invoke(*args)
    assert_clean_exit(first, 0)
    assert "saved" in first.stderr
    cached = list((isolated_cache / "checkpoints").glob("*.pt"))
    assert len(cached) == 1 and cached[0].name.startswith("synthetic-bagcert-")

    second = invoke(*args)
    assert_clean_exit(second, 0)
    assert "saved" not in second.stderr
    assert list((isolated_cache / "checkpoints").glob("*.pt")) == cached
    rows, per_image = read_cell(tmp_path / "out")  # the same cell, written again
    assert len(rows) == 2 and len(per_image) == 16

    third = invoke(*args[:-2], "--rf", "3", "--results-dir", str(tmp_path / "other"))
    assert_clean_exit(third, 0)
    assert "saved" in third.stderr  # another configuration, another checkpoint
    assert len(list((isolated_cache / "checkpoints").glob("*.pt"))) == 2


def test_training_options_default_to_the_defense_recipe():
    from patchbench.cli import TRAIN_OPTIONS, make_train_config
    from patchbench.defenses.bagcert import BagCert
    from patchbench.defenses.smoothing import ColumnSmoothing
    from patchbench.running.train import TrainConfig

    unset = {name.replace("-", "_"): None for name in TRAIN_OPTIONS}
    assert make_train_config(BagCert(), unset) == TrainConfig(**BagCert.train_defaults)
    assert make_train_config(ColumnSmoothing(), unset).epochs == 28
    assert make_train_config(BagCert(), {**unset, "epochs": 3}).epochs == 3


def test_defenses_name_shows_each_parameter_with_type_default_and_help() -> None:
    result = invoke("defenses", "ds-column")
    assert_clean_exit(result, 0)
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines()
             if line.startswith("│ --")}
    assert {"--ablation-size", "--threshold", "--width", "--lr"} <= set(lines)
    assert "int" in lines["--ablation-size"] and " 6 " in lines["--ablation-size"]
    assert "certification only" in result.stdout  # the threshold
    assert "--epochs 28" in result.stdout and "--hold-out-val yes" in result.stdout
    unknown = invoke("defenses", "nope")
    assert_clean_exit(unknown, 2)
    assert "Invalid value for 'NAME': unknown defense 'nope'" in unknown.stderr


@pytest.mark.slow  # spawns interpreters
def test_the_plugin_api_imports_without_the_harness_s_heavy_packages() -> None:
    """What a plugin imports (patchbench.defense, .footprints, .patches, .certify) loads
    torch and nothing of pandas, click, rich, seaborn, matplotlib or joblib."""
    import subprocess
    import sys

    code = ("import sys, patchbench.defense, patchbench.footprints, patchbench.patches, "
            "patchbench.certify; print(' '.join(sorted(m for m in ('pandas', 'click', 'rich', "
            "'seaborn', 'matplotlib', 'joblib') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
