"""Sweeps: the grid of cells, skipping finished ones, --force, plugin isolation, usage errors
and the Ray backend. Models are tiny (two seconds per cell on two busy cores)."""

from __future__ import annotations

import functools
import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from patchbench import load_results, run_sweep
from patchbench.running.results import load_failures
from tests.test_cli import assert_clean_exit, invoke

TINY = ["--dataset", "synthetic", "--epochs", "1", "--max-train-images", "256", "--n-images",
        "64", "--width", "8", "--device", "cpu"]
SWEEP = ["run", "--defense", "bagcert", "--rf", "3,5", "--patch", "2x2,3x3", *TINY]
TIMING = ["certify_seconds", "forward_seconds", "images_per_second", "timestamp"]
PLUGINS = Path(__file__).parent / "plugins"
PLUGIN_ENTRY_POINTS = {  # as in each plugin's pyproject.toml
    "broken": {"broken": "patchbench_broken:Broken"},
    "faulty": {"build-fails": "patchbench_faulty:BuildFails",
               "float-votes": "patchbench_faulty:FloatVotes",
               "extra-class": "patchbench_faulty:ExtraClass"},
}


@dataclass(frozen=True)
class Sweep:
    results: Path
    cache: Path
    stdout: str
    stderr: str


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """One two-cell sweep for the module; its checkpoints serve every test here."""
    folder = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATCHBENCH_CACHE", str(folder / "cache"))
        result = invoke(*SWEEP, "--results-dir", str(folder / "results"))
    assert_clean_exit(result, 0)
    return Sweep(folder / "results", folder / "cache", result.stdout, result.stderr)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def copy(swept: Sweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sweep:
    """A private copy of the module's sweep (results and checkpoints) to change."""
    shutil.copytree(swept.results, tmp_path / "results")
    shutil.copytree(swept.cache, tmp_path / "cache")
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "cache"))
    return Sweep(tmp_path / "results", tmp_path / "cache", swept.stdout, swept.stderr)


def files(sweep: Sweep) -> dict[str, int]:
    """Every result file and checkpoint of a sweep, with its modification time."""
    paths = [*sweep.results.rglob("*.csv*"), *sweep.results.rglob("*.json"),
             *sweep.cache.rglob("*.pt")]
    return {str(p): p.stat().st_mtime_ns for p in paths}


@pytest.mark.slow  # trains two models
def test_a_two_cell_sweep_writes_rows_and_per_image_tables(swept: Sweep) -> None:
    out = swept.results
    assert swept.stderr.count("saved ") == 2  # one model per cell, trained once
    assert f"results: {out / 'rows'} (2 cells: 2 computed, 0 skipped, 0 failed)" in swept.stderr
    assert "2 cells, 64 images each" in swept.stdout

    rows = sorted((out / "rows").glob("*.csv"))
    per_image = sorted((out / "per_image").glob("*.csv.gz"))
    assert [p.name.removesuffix(".csv") for p in rows] == [
        p.name.removesuffix(".csv.gz") for p in per_image]
    assert not list((out / "failed").iterdir())
    table = load_results(out)
    assert sorted(table["param_rf"].unique()) == [3, 5]
    assert (table["param_width"] == 8).all() and (table["n_images"] == 64).all()
    assert sorted(zip(table["param_rf"], table["patch"], table["condition"], strict=True)) == [
        (rf, p, c) for rf in (3, 5) for p in ("2x2", "3x3") for c in ("global", "tight")]
    for path in rows:
        cell = pd.read_csv(path)
        assert (cell["cell"] == path.stem).all()
        assert json.loads(cell["train_config"][0])["max_images"] == 256
        with gzip.open(out / "per_image" / f"{path.stem}.csv.gz", "rt") as fh:
            images = pd.read_csv(fh)
        assert len(images) == 64 and (images["cell"] == path.stem).all()


@pytest.mark.slow  # trains
def test_a_rerun_skips_every_finished_cell(copy: Sweep) -> None:
    before = files(copy)
    again = invoke(*SWEEP, "--results-dir", str(copy.results))
    assert_clean_exit(again, 0)
    assert again.stderr.count("finished earlier, skipped") == 2
    assert "saved " not in again.stderr and "certified in" not in again.stderr
    assert "(2 cells: 0 computed, 2 skipped, 0 failed)" in again.stderr
    assert files(copy) == before  # nothing trained, certified or written


@pytest.mark.slow  # trains
def test_force_recomputes_and_replaces_without_duplicates(copy: Sweep) -> None:
    before = files(copy)
    forced = invoke(*SWEEP, "--results-dir", str(copy.results), "--force")
    assert_clean_exit(forced, 0)
    assert "saved " not in forced.stderr  # --force recertifies; the checkpoints stay
    assert forced.stderr.count("certified in") == 2
    after = files(copy)
    assert after.keys() == before.keys()
    assert all(after[p] != before[p] for p in after if "/rows/" in p or "/per_image/" in p)
    table = load_results(copy.results)
    assert len(table) == 8 and not table.duplicated(["cell", "patch", "condition"]).any()


@pytest.mark.slow  # trains
def test_the_python_api_returns_every_cell_with_its_status(copy: Sweep, tmp_path: Path) -> None:
    kwargs = {"defenses": "bagcert", "patches": ["2x2"], "dataset": "synthetic",
              "params": {"rf": [3, 5], "width": 8}, "n_images": 64, "device": "cpu",
              "train": {"epochs": 1, "max_images": 256}, "results_dir": tmp_path / "api",
              "show_progress": False}
    first = run_sweep(**kwargs)
    assert first["status"].tolist() == ["computed"] * 4
    assert first["param_rf"].tolist() == [3, 3, 5, 5]
    on_disk = load_results(tmp_path / "api").sort_values(["cell", "condition"], ignore_index=True)
    pd.testing.assert_frame_equal(
        first.drop(columns=["status", "reason"]).sort_values(["cell", "condition"],
                                                             ignore_index=True), on_disk)
    second = run_sweep(**{**kwargs, "n_images": 32})  # another cell of the same models
    assert second["status"].tolist() == ["computed"] * 4
    assert (second["n_images"] == 32).all()
    assert run_sweep(**kwargs)["status"].tolist() == ["skipped"] * 4


@pytest.mark.slow  # trains
def test_a_certify_only_parameter_shares_one_model(tmp_path: Path,
                                                    isolated_cache: Path) -> None:
    out = tmp_path / "results"
    result = invoke("run", "--defense", "ds-column", "--threshold", "0.2,0.6", "--patch", "2x2",
                    *TINY, "--results-dir", str(out))
    assert_clean_exit(result, 0)
    assert result.stderr.count("saved ") == 1  # one model, certified once per threshold
    table = load_results(out)
    assert sorted(table["param_threshold"].unique()) == [0.2, 0.6]
    assert table["checkpoint_sha256"].nunique() == 1 and table["cell"].nunique() == 2
    votes = {}
    for cell, threshold in table[["cell", "param_threshold"]].drop_duplicates().values:
        with gzip.open(out / "per_image" / f"{cell}.csv.gz", "rt") as fh:
            votes[threshold] = pd.read_csv(fh).filter(like="votes_").to_numpy()
    assert (votes[0.6] <= votes[0.2]).all() and votes[0.6].sum() < votes[0.2].sum()

    # an explicit checkpoint may be read with another threshold, not with another band
    (checkpoint,) = isolated_cache.rglob("*.pt")
    args = ("run", "--defense", "ds-column", "--patch", "2x2", *TINY, "--results-dir", str(out),
            "--checkpoint", str(checkpoint))
    assert_clean_exit(invoke(*args, "--threshold", "0.4"), 0)
    assert 0.4 in load_results(out)["param_threshold"].tolist()
    clash = invoke(*args, "--ablation-size", "2")
    assert_clean_exit(clash, 2)
    assert "was trained with ablation_size=6, not ablation_size=2" in clash.stderr


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broken and faulty test plugins, registered by their metadata alone (no pip)."""
    site = tmp_path / "site"
    for folder, entry_points in PLUGIN_ENTRY_POINTS.items():
        info = site / f"patchbench_{folder}-0.0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: patchbench-{folder}\n"
                                       "Version: 0.0.1\n")
        (info / "entry_points.txt").write_text("[patchbench.defenses]\n" + "".join(
            f"{name} = {target}\n" for name, target in entry_points.items()))
        monkeypatch.syspath_prepend(str(PLUGINS / folder / "src"))
    monkeypatch.syspath_prepend(str(site))


@pytest.mark.slow  # trains
def test_a_failing_defense_fails_only_its_own_cell(plugins: None, copy: Sweep,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "isolation"
    args = ("run", "--defense", "bagcert,broken", "--defense", "build-fails,float-votes",
            "--defense", "extra-class", "--rf", "3", "--patch", "2x2", *TINY,
            "--results-dir", str(out))
    result = invoke(*args)
    assert_clean_exit(result, 3)
    assert result.stderr.rstrip().splitlines()[-1] == (
        f"Error: 4 of 5 cells failed (reasons in {out / 'failed'})")
    assert "Traceback" not in result.output
    assert load_results(out)["defense"].unique().tolist() == ["bagcert"]

    failures = load_failures(out)
    reasons = dict(zip(failures["identity"].map(lambda i: i["defense"]), failures["reason"],
                       strict=True))
    assert reasons.keys() == {"broken", "build-fails", "float-votes", "extra-class"}
    assert "defense 'broken' from patchbench-broken failed to load" in reasons["broken"]
    assert reasons["build-fails"] == "RuntimeError: CUDA out of memory (pretend)"
    assert "malformed votes" in reasons["float-votes"] and "float32" in reasons["float-votes"]
    assert "malformed votes" in reasons["extra-class"] and "(64, 4, h, w)" in reasons[
        "extra-class"]
    assert all("Traceback" in t for t in failures["traceback"])
    for reason in reasons.values():
        assert reason in result.stderr  # each failure is reported as it happens

    finished = {p: p.stat().st_mtime_ns for p in (out / "rows").glob("*.csv")}
    again = invoke(*args)  # failed cells are retried, the finished one is not
    assert_clean_exit(again, 3)
    assert again.stderr.count("finished earlier, skipped") == 1
    assert {p: p.stat().st_mtime_ns for p in (out / "rows").glob("*.csv")} == finished


@pytest.mark.parametrize(("args", "fragment"), [
    (("--defense", "bagcert", "--ablation-size", "2"),
     "defense 'bagcert' has no parameter(s) ['ablation_size']"),
    (("--defense", "bagcert,ds-column", "--foo", "1"),
     "none of the defenses bagcert, ds-column has parameter(s) ['foo']"),
    (("--defense", "bagcert", "--rf", "3,,5"), "empty value for parameter --rf"),
    (("--defense", "bagcert,", "--rf", "3"), "empty defense name"),
    (("--defense", "bagcert", "--rf", "3,x"), "parameter 'rf' expects int, got 'x'"),
    (("--defense", "bagcert", "--backend", "dask"), "'dask' is not one of 'local', 'ray'"),
    (("--defense", "bagcert", "--rf", "3,5", "--checkpoint", "model.pt"),
     "a checkpoint is one model, but the sweep has 2 cells"),
], ids=["parameter nobody has", "parameter no defense has", "empty value", "empty defense",
        "bad value in a list", "unknown backend", "checkpoint and two cells"])
def test_a_sweep_that_cannot_start_is_a_usage_error(args: tuple[str, ...], fragment: str,
                                                    tmp_path: Path) -> None:
    result = invoke("run", *args, "--patch", "2x2", "--dataset", "synthetic")
    assert_clean_exit(result, 2)
    assert fragment in result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_the_ray_backend_gives_the_rows_of_the_local_one(copy: Sweep, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    kwargs = {"defenses": "bagcert", "patches": "2x2,3x3", "dataset": "synthetic",
              "params": {"rf": [3, 5], "width": 8}, "n_images": 64, "device": "cpu",
              "train": {"epochs": 1, "max_images": 256}, "show_progress": False}
    local = run_sweep(results_dir=tmp_path / "local", **kwargs)  # the checkpoints of copy
    # run_sweep starts (and stops) its own local instance; keep it small on this machine
    monkeypatch.setattr(ray, "init", functools.partial(ray.init, num_cpus=2,
                                                        include_dashboard=False))
    remote = run_sweep(results_dir=tmp_path / "ray", backend="ray", n_jobs=2, **kwargs)
    assert not ray.is_initialized()
    assert remote["status"].tolist() == ["computed"] * 8
    pd.testing.assert_frame_equal(local.drop(columns=TIMING), remote.drop(columns=TIMING))
    for cell in local["cell"].unique():
        with gzip.open(tmp_path / "local" / "per_image" / f"{cell}.csv.gz", "rt") as a, \
                gzip.open(tmp_path / "ray" / "per_image" / f"{cell}.csv.gz", "rt") as b:
            pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b))


@pytest.mark.slow  # trains
def test_a_lower_precision_is_a_cell_of_its_own_recorded_on_its_rows(copy: Sweep) -> None:
    """bf16 votes may differ from fp32 ones, so they never count as the fp32 cell finished;
    fp32 cells keep their ids (no precision in their identity)."""
    fp32 = load_results(copy.results)
    assert set(fp32["precision"]) == {"fp32"}
    low = invoke(*SWEEP, "--results-dir", str(copy.results), "--precision", "bf16")
    assert_clean_exit(low, 0)
    assert "saved " not in low.stderr and low.stderr.count("certified in") == 2
    table = load_results(copy.results)
    bf16 = table[table["precision"] == "bf16"]
    assert len(bf16) == 8 and set(bf16["cell"]).isdisjoint(fp32["cell"])
    # the same models: clean accuracy at bf16 stays close to fp32's
    merged = bf16.merge(fp32, on=["param_rf", "patch", "condition"], suffixes=("", "_fp32"))
    assert (merged["clean_accuracy"] - merged["clean_accuracy_fp32"]).abs().max() <= 0.1
