"""The command line: bad input gives one line and the right exit code, good input gives results.

Most cases go through click's CliRunner (in-process, fast); a couple run ``python -m
patchbench`` in a real process to prove the exit code and the absence of a traceback there.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner, Result

from patchbench import __version__
from patchbench.cli import cli

# A model that trains in about a second on two shared CPU cores.
TINY = ["--dataset", "synthetic", "--epochs", "1", "--max-train-images", "64", "--rf", "5",
        "--width", "4"]
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


@dataclass(frozen=True)
class Checkpoints:
    good: Path
    sha256: str
    truncated: Path
    tampered_weights: Path
    tampered_meta: Path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    """One tiny BagCert checkpoint for the module, plus broken copies of it."""
    folder = tmp_path_factory.mktemp("checkpoints")
    good = folder / "bagcert.pt"
    result = invoke("train", "--defense", "bagcert", *TINY, "--device", "cpu",
                    "--output", str(good))
    assert_clean_exit(result, 0)
    assert result.stdout.strip() == str(good)
    assert f"saved {good}" in result.stderr

    truncated = folder / "truncated.pt"
    raw = good.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])

    payload = torch.load(good, weights_only=True)
    state = payload["state_dict"]
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1.0  # one weight changed, the stored sha256 kept
    tampered_weights = folder / "tampered-weights.pt"
    torch.save(payload, tampered_weights)

    payload = torch.load(good, weights_only=True)
    payload["meta"]["params"]["rf"] = 7  # claim another receptive field, same hash
    tampered_meta = folder / "tampered-meta.pt"
    torch.save(payload, tampered_meta)
    return Checkpoints(good, torch.load(good, weights_only=True)["sha256"], truncated,
                       tampered_weights, tampered_meta)


# --- bad input: one table, exact exit codes ------------------------------------------------

@dataclass(frozen=True)
class Bad:
    args: tuple[str, ...]  # "{good}", "{truncated}", ... and "{tmp}" are filled in
    code: int
    fragment: str


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

BAD_INPUT = {
    # malformed patch shapes: click's usage error
    "patch 5x": Bad((*RUN, "--patch", "5x"), 2, "malformed patch shape '5x'"),
    "patch 0x3": Bad((*RUN, "--patch", "0x3"), 2, "has a zero side"),
    "patch axb": Bad((*RUN, "--patch", "axb"), 2, "malformed patch shape 'axb'"),
    "patch -1x2": Bad((*RUN, "--patch", "-1x2"), 2, "malformed patch shape '-1x2'"),
    "patch empty": Bad((*RUN, "--patch", ""), 2, "empty patch shape"),
    "patch empty token": Bad((*RUN, "--patch", "5x5,,2x2"), 2, "empty patch shape"),
    "patch missing": Bad(RUN, 2, "Missing option '--patch'"),
    "patch too large": Bad((*RUN, "--patch", "5x5,30x5"), 2,
                           "patch 30x5 does not fit in the 28x28 images"),
    # names and choices
    "unknown defense": Bad(("run", "--defense", "nope", "--dataset", "synthetic", "--patch",
                            "2x2"), 1,
                           "unknown defense 'nope'; available: bagcert, ds-block, ds-column"),
    "unknown defense (train)": Bad(("train", "--defense", "nope", "--dataset", "synthetic"), 1,
                                   "unknown defense 'nope'; available:"),
    "missing defense": Bad(("run", "--patch", "2x2"), 2, "Missing option '--defense'"),
    "unknown dataset": Bad(("run", "--defense", "bagcert", "--dataset", "mnist", "--patch",
                            "2x2"), 2, "'mnist' is not one of"),
    "unknown split": Bad((*RUN, "--patch", "2x2", "--split", "validation"), 2,
                         "'validation' is not one of"),
    "unknown condition": Bad((*RUN, "--patch", "2x2", "--condition", "tight,loose"), 2,
                             "unknown condition(s) ['loose']; choose from tight, global"),
    "empty condition": Bad((*RUN, "--patch", "2x2", "--condition", ","), 2,
                           "unknown condition(s)"),
    "n-images 0": Bad((*RUN, "--patch", "2x2", "--n-images", "0"), 2, "--n-images"),
    # devices
    "device cuda": pytest.param(Bad((*RUN, "--patch", "2x2", "--device", "cuda"), 2,
                                    "cuda requested but CUDA is not available"), marks=NO_CUDA),
    "device cuda:1": pytest.param(Bad((*RUN, "--patch", "2x2", "--device", "cuda:1"), 2,
                                      "CUDA is not available"), marks=NO_CUDA),
    "device tpu": Bad((*RUN, "--patch", "2x2", "--device", "tpu"), 2,
                      "unknown device 'tpu'; use auto, cpu or cuda[:N]"),
    # checkpoints
    "checkpoint missing": Bad((*RUN, "--patch", "2x2", "--checkpoint", "{tmp}/none.pt"), 1,
                              "checkpoint {tmp}/none.pt does not exist"),
    "checkpoint truncated": Bad((*RUN, "--patch", "2x2", "--checkpoint", "{truncated}"), 1,
                                "is unreadable or truncated"),
    "checkpoint weights altered": Bad((*RUN, "--patch", "2x2", "--checkpoint",
                                       "{tampered_weights}"), 1,
                                      "was altered after it was written"),
    "checkpoint meta altered": Bad((*RUN, "--patch", "2x2", "--checkpoint", "{tampered_meta}"),
                                   1, "was altered after it was written"),
    "checkpoint of another defense": Bad(("run", "--defense", "ds-column", "--dataset",
                                          "synthetic", "--patch", "2x2", "--checkpoint",
                                          "{good}"), 1,
                                         "is for defense 'bagcert', not 'ds-column'"),
    "checkpoint is a folder": Bad((*RUN, "--patch", "2x2", "--checkpoint", "{tmp}"), 2,
                                  "is a directory"),
    # defense parameters
    "unknown parameter": Bad((*RUN, "--patch", "2x2", "--rf-size", "3"), 2,
                             "defense 'bagcert' has no parameter(s) ['rf_size']"),
    "bad parameter value": Bad((*RUN, "--patch", "2x2", "--rf", "abc"), 2,
                               "parameter 'rf' expects int, got 'abc'"),
    "parameter without value": Bad((*RUN, "--patch", "2x2", "--rf"), 2,
                                   "option --rf needs a value"),
    "stray argument": Bad((*RUN, "--patch", "2x2", "stray"), 2, "unexpected argument 'stray'"),
    "bad parameter value (train)": Bad(("train", "--defense", "bagcert", "--dataset",
                                        "synthetic", "--width", "wide"), 2,
                                       "parameter 'width' expects int, got 'wide'"),
    "unknown parameter next to --checkpoint": pytest.param(
        Bad((*RUN, "--patch", "2x2", "--checkpoint", "{good}", "--rf-size", "3"), 2,
            "has no parameter(s) ['rf_size']")),
    "stray argument next to --checkpoint": pytest.param(
        Bad((*RUN, "--patch", "2x2", "--checkpoint", "{good}", "stray"), 2,
            "unexpected argument 'stray'")),
    # training budget
    "epochs 0": pytest.param(Bad(("train", "--defense", "bagcert", *TINY, "--epochs", "0",
                                  "--output", "{tmp}/x.pt"), 2, "--epochs")),
    "train batch size 0": pytest.param(Bad(("train", "--defense", "bagcert", *TINY,
                                            "--train-batch-size", "0", "--output",
                                            "{tmp}/x.pt"), 2, "--train-batch-size")),
    # data and results folders
    "fashion-mnist data dir missing": Bad(("run", "--defense", "bagcert", "--patch", "2x2",
                                           "--data-dir", "{tmp}/nonexistent"), 1,
                                          "Fashion-MNIST IDX files not found in "
                                          "{tmp}/nonexistent: run 'apt-get install "
                                          "dataset-fashion-mnist'"),
    "fashion-mnist data dir is a file": Bad(("run", "--defense", "bagcert", "--patch", "2x2",
                                             "--data-dir", "{good}"), 2, "is a file"),
    "imagenet without data dir": Bad(("run", "--defense", "bagcert", "--dataset", "imagenet",
                                      "--patch", "2x2"), 1,
                                     "ImageNet must be given as an ImageFolder tree"),
    "results dir is a file": Bad((*RUN, "--patch", "2x2", "--checkpoint", "{good}",
                                  "--results-dir", "{good}"), 2, "is a file"),
    "results dir under a file": pytest.param(
        Bad((*RUN, "--patch", "2x2", "--checkpoint", "{good}", "--results-dir",
             "{good}/results"), 1, "Error:")),
}


@pytest.mark.parametrize("case", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line_and_the_right_exit_code(case: Bad, checkpoints: Checkpoints,
                                                       tmp_path: Path) -> None:
    fill = {"tmp": str(tmp_path), "good": str(checkpoints.good),
            "truncated": str(checkpoints.truncated),
            "tampered_weights": str(checkpoints.tampered_weights),
            "tampered_meta": str(checkpoints.tampered_meta)}
    result = invoke(*(arg.format(**fill) for arg in case.args))
    assert_clean_exit(result, case.code)
    assert case.fragment.format(**fill) in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: ")
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("args", "code", "fragment"), [
    (("run", "--defense", "bagcert", "--dataset", "synthetic", "--patch", "5x"), 2,
     "malformed patch shape '5x'"),
    (("run", "--defense", "nope", "--dataset", "synthetic", "--patch", "2x2"), 1,
     "unknown defense 'nope'"),
], ids=["usage error", "user error"])
def test_a_real_process_exits_cleanly(args: tuple[str, ...], code: int, fragment: str,
                                      tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "patchbench", *args], cwd=tmp_path,
                         env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == code, out.stderr
    assert fragment in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert out.stderr.rstrip().splitlines()[-1].startswith("Error: ")


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
    assert "rf=7" in result.stdout and "ablation_size=4" in result.stdout


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
    from patchbench.cli import make_train_config
    from patchbench.defenses.bagcert import BagCert
    from patchbench.defenses.smoothing import ColumnSmoothing
    from patchbench.train import TrainConfig

    unset = {"epochs": None, "train_batch_size": None, "seed": None, "crop_padding": None,
             "max_train_images": None, "hold_out_val": None}
    assert make_train_config(BagCert(), unset) == TrainConfig(**BagCert.train_defaults)
    assert make_train_config(ColumnSmoothing(), unset).epochs == 12
    assert make_train_config(BagCert(), {**unset, "epochs": 3}).epochs == 3
