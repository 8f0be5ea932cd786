"""Studies as files: what the reader refuses, a whole small study run and resumed, and the
committed Fashion-MNIST study found done cell by cell.

The small study trains tiny models on the synthetic dataset: candidates certified on val, a
setting chosen there (checked against ``patchbench select`` on the same rows), the choice
certified on test and attacked, then the report; a second run computes nothing.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner, Result

from patchbench.cli import cli
from patchbench.running.results import CERTIFIED, EMPIRICAL, metric_of
from patchbench.running.study import Options, run_study
from patchbench.running.study_file import Chosen, StudyError, load_study
from tests.test_sweep import TIMING

REPO = Path(__file__).resolve().parent.parent
STUDIES = REPO / "studies"

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args: str, cache: Path | None = None) -> Result:
    env = {"COLUMNS": "240", **({"PATCHBENCH_CACHE": str(cache)} if cache else {})}
    return CliRunner().invoke(cli, list(args), env=env)


SMALL = """
[study]
title = "small"
dataset = "synthetic"
results = "{results}"

[shapes]
headline = ["5x5", "2x12"]

[recipes]
tiny = {{ hold_out_val = true, precision = "fp32", epochs = 1, max_images = 256 }}

[report]
out = "{reports}"
gallery_images = 0

[[certify]]
name = "candidates"
defense = "ds-column"
params = {{ width = 8, ablation_size = 4, threshold = [0.2, 0.3, 0.5] }}
train = "tiny"
split = "val"
n_images = 48
patches = ["5x5"]
results = "validation/ds-column"

[[select]]
name = "threshold"
among = "candidates"
params = ["threshold"]

[[certify]]
name = "chosen"
defense = "ds-column"
params = {{ width = 8, ablation_size = 4, threshold = {{ chosen = "threshold" }} }}
train = "tiny"
n_images = 32
patches = "headline"

[[attack]]
name = "chosen-attack"
defense = "ds-column"
params = {{ width = 8, ablation_size = 4, threshold = {{ chosen = "threshold" }} }}
train = "tiny"
n_images = 8
patches = ["5x5"]
budget = {{ steps = 1, restarts = 1, position_stride = 12, worst_positions = 1 }}
"""


def write(folder: Path, text: str, name: str = "study.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.slow
def test_a_small_study_runs_chooses_on_val_and_resumes_without_recomputing(tmp_path: Path):
    results, reports, cache = tmp_path / "results", tmp_path / "reports", tmp_path / "cache"
    study = write(tmp_path, SMALL.format(results=results, reports=reports))
    dry = invoke("study", str(study), "--dry-run", cache=cache)
    assert dry.exit_code == 0, dry.output
    assert "to train" in dry.output and "waits for" in dry.output
    assert not results.exists()  # a dry run writes nothing

    first = invoke("study", str(study), cache=cache)
    assert first.exit_code == 0, first.output
    val = results / "validation" / "ds-column"
    assert len(list((val / "rows").glob("*.csv"))) == 3
    selected = invoke("select", "--results-dir", str(val), "--defense", "ds-column",
                      "--param", "threshold")
    assert selected.exit_code == 0, selected.output
    threshold = float(selected.output.strip().splitlines()[-1])
    rows = pd.concat(pd.read_csv(p) for p in (results / "rows").glob("*.csv"))
    metric = metric_of(rows)
    assert set(metric) == {CERTIFIED, EMPIRICAL} and set(rows["split"]) == {"test"}
    # the val choice, certified and attacked on test
    assert set(rows["param_threshold"]) == {threshold}
    assert (reports / "report.md").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in results.rglob("rows/*.csv")}
    again = invoke("study", str(study), "--no-report", cache=cache)
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in results.rglob("rows/*.csv")} == stamps
    done = invoke("study", str(study), "--dry-run", cache=cache)
    assert "to certify" not in done.output and "to train" not in done.output
    assert "6 entries: 5 done, 1 chosen" in done.output


@pytest.mark.slow  # reads every committed cell
def test_the_committed_study_is_done_cell_for_cell():
    """Every committed certification and attack cell and benchmark run is one of the study
    file's, and the dry run finds each of them done: the file reproduces the results without
    recomputing."""
    run = run_study(load_study(STUDIES / "fashion-mnist.toml"), dry_run=True)
    committed = {p.stem for p in (REPO / "results").rglob("rows/*.csv")
                 if "bench" not in p.parts and "loss-comparison" not in p.parts}
    planned = {s.cell for s in run.states if s.cell and s.kind != "bench"}
    assert planned == committed and len(committed) == 137
    benches = {f"bench-{s.cell}" for s in run.states if s.kind == "bench"}
    assert benches == {p.stem for p in (REPO / "results" / "bench" / "rows").glob("*.csv")}
    assert {s.state for s in run.states} == {"done", "chosen"}
    assert run.choices["bagcert-rf"] == {"rf": 9}
    assert run.choices["column-setting"] == {"ablation_size": 6, "threshold": 0.25}
    assert run.choices["patchcleanser-setting"] == {
        "width": 48, "train_patch_max": 8, "train_epochs": 30, "masks_per_axis": 6}
    losses = run_study(load_study(STUDIES / "bagcert-losses.toml"), dry_run=True)
    assert [s.state for s in losses.states] == ["done"] * 4


@pytest.mark.slow  # reads every committed cell
def test_the_dry_run_command_lists_the_committed_study_as_done(tmp_path: Path):
    results = tmp_path / "results"
    shutil.copytree(REPO / "results", results)
    before = sorted(p.relative_to(results) for p in results.rglob("*"))
    result = invoke("study", str(STUDIES / "fashion-mnist.toml"), "--dry-run",
                    "--results-dir", str(results))
    assert result.exit_code == 0, result.output
    assert "159 entries: 145 done, 14 chosen" in result.output
    assert sorted(p.relative_to(results) for p in results.rglob("*")) == before


BAD = {  # study text -> the message's tail
    "[study]\nresult = 'x'\n": "[study]: unknown key(s) result; allowed: dataset, results, "
                               "title",
    "[[certify]]\ndefense = 'bagcert'\npatches = ['5x5']\n": "[[certify]] #1: every step "
                                                             "needs a name",
    "[[certify]]\nname = 'a'\npatches = ['5x5']\n": "[[certify]] 'a': name a defense (or a "
                                                    "zoo model or a checkpoint)",
    "[[certify]]\nname = 'a'\ndefense = 'bagcert'\npatches = ['5y5']\n": "[[certify]] 'a' "
                                                                          "patches: ",
    "[[certify]]\nname = 'a'\ndefense = 'bagcert'\npatches = ['5x5']\ntrain = 'fast'\n":
        "[[certify]] 'a': unknown recipe 'fast'; [recipes] has none",
    "[[certify]]\nname = 'a'\ndefense = 'bagcert'\npatches = ['5x5']\n"
    "params = { rf = { chosen = 'b' } }\n": "[[certify]] 'a': refers to 'b', which is no "
                                            "select step",
    "[[certify]]\nname = 'a'\ndefense = 'bagcert'\npatches = ['5x5']\n"
    "[[select]]\nname = 'b'\namong = 'a'\nparams = ['rf']\n": "[[select]] 'b': settings are "
                                                              "chosen on val; 'a' certifies "
                                                              "test",
    "[[certify]]\nname = 'a'\ndefense = 'bagcert'\npatches = ['5x5']\nsplit = 'val'\n"
    "params = { rf = { chosen = 'b' } }\n"
    "[[select]]\nname = 'b'\namong = 'a'\nparams = ['rf']\n": "waits for itself",
    "[[attack]]\nname = 'a'\ndefense = 'bagcert'\npatches = ['5x5']\n"
    "budget = { steps = -1 }\n": "[[attack]] 'a' budget: need steps >= 0",
    "[[attack]]\nname = 'a'\ndefense = 'bagcert'\npatches = ['5x5']\n"
    "params = { rf = [5, 7] }\n": "an attack is of one model: one value per parameter",
    "[[certify]]\nname = 'a'\ndefense = 'bagcert'\npatches = ['5x5']\n[[certify]]\n"
    "name = 'a'\ndefense = 'bagcert'\npatches = ['5x5']\n": "a second step of this name",
    "[report]\nclaims = 'absent.py'\n": "[report]: no claims file",
    "[report]\nsweep = { defense = 'bagcert' }\n": "[report] sweep: needs defense and param",
    "[study\n": "not valid TOML: Expected ']'",
}


@pytest.mark.parametrize("text", BAD)
def test_a_bad_study_file_is_one_line_naming_the_place(tmp_path: Path, text: str):
    study = write(tmp_path, text)
    with pytest.raises(StudyError) as err:
        load_study(study)
    assert str(err.value).startswith(f"{study}: ") and BAD[text] in str(err.value)
    result = invoke("study", str(study), "--dry-run")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("Error: ") and "Traceback" not in result.output


def test_a_missing_study_file_is_one_line(tmp_path: Path):
    result = invoke("study", str(tmp_path / "absent.toml"), "--dry-run")
    assert result.exit_code == 1
    assert result.output == f"Error: no study file {tmp_path / 'absent.toml'}\n"


def test_chosen_values_and_named_shapes_and_recipes_are_read():
    study = load_study(STUDIES / "fashion-mnist.toml")
    chosen = study.step("patchcleanser-chosen").spec
    assert chosen.params["width"] == Chosen("patchcleanser-setting", "width")
    assert chosen.train["epochs"] == Chosen("patchcleanser-setting", "train_epochs")
    assert len(study.step("bagcert-rf-sweep").spec.patches) == 18
    assert study.step("bagcert-val").spec.train == {"hold_out_val": True, "precision": "bf16"}
    assert study.report.sweep.param == "rf" and study.report.claims.name == "bagcert_talk.py"


def test_readme_study_example_is_a_valid_study(tmp_path: Path):
    """README's ```toml example reads as a study (its claims file beside it, as in studies/)."""
    text = (REPO / "README.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    shutil.copy(STUDIES / "bagcert_talk.py", tmp_path / "bagcert_talk.py")
    study = load_study(write(tmp_path, example))
    assert [s.kind for s in study.steps] == ["certify", "certify", "select", "attack"]
    assert study.step("bagcert-attack").spec.budget.steps == 10


def test_bench_steps_read_their_settings_and_per_defense_parameters():
    study = load_study(STUDIES / "fashion-mnist.toml")
    families = study.step("bench-families").spec
    assert families.defenses == ("bagcert", "ds-column", "ds-block")
    assert families.params["ds-column"] == {"ablation_size": 4, "width": 32, "threshold": 0.2}
    assert families.settings.batch_sizes == (64,) and families.settings.reference is False
    shared = study.step("bench-rf-time").spec
    assert shared.params == {"": {"rf": [5, 13]}}


@pytest.mark.parametrize(("text", "message"), [
    ("[[bench]]\nname = 'b'\ndefense = 'bagcert'\nrepeats = 0\n", "need repeats >= 1"),
    ("[[bench]]\nname = 'b'\ndefense = 'bagcert'\nshape = 'mnist'\n", "unknown shape 'mnist'"),
    ("[[bench]]\nname = 'b'\nrepeats = 1\n", "defense is a name or a list of names"),
])
def test_a_bad_bench_step_is_refused_when_read(tmp_path: Path, text: str, message: str):
    with pytest.raises(StudyError, match=message):
        load_study(write(tmp_path, text))


@pytest.mark.slow
def test_a_study_certifies_on_ray_as_it_does_locally(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    """--backend ray sends the certify steps to Ray's joblib backend: the same cells, the
    same choice on val, the same rows (timings aside) as the local run."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "cache"))  # workers inherit it
    study = load_study(write(tmp_path, SMALL.format(results=tmp_path / "local",
                                                    reports=tmp_path / "reports")))
    local = run_study(study, Options(device="cpu", show_progress=False))
    monkeypatch.setattr(ray, "init", functools.partial(ray.init, num_cpus=2,
                                                        include_dashboard=False))
    remote = run_study(study, Options(results_dir=tmp_path / "ray", device="cpu",
                                      backend="ray", n_jobs=2, show_progress=False))
    assert not ray.is_initialized()
    assert [(s.cell, s.state) for s in remote.states] == [(s.cell, s.state)
                                                           for s in local.states]
    assert remote.choices == local.choices
    for state in (s for s in local.states if s.kind == "certify"):
        folder = "validation/ds-column" if state.step == "candidates" else ""
        rows = [pd.read_csv(tmp_path / run / folder / "rows" / f"{state.cell}.csv")
                .drop(columns=TIMING) for run in ("local", "ray")]
        pd.testing.assert_frame_equal(*rows)
