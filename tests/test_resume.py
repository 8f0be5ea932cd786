"""Resuming in real processes: a sweep killed with SIGKILL loses no finished cell and redoes
none, and two sweeps writing into one results folder at once lose no row."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from patchbench import load_results

TINY = ["--dataset", "synthetic", "--epochs", "1", "--max-train-images", "256", "--n-images",
        "64", "--width", "8", "--device", "cpu", "--patch", "3x3"]


# One thread per process: tiny models gain nothing from more, and on a shared two-core machine
# competing thread pools spin (several times the CPU time).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def sweep(results: Path, rf: str) -> list[str]:
    return [sys.executable, "-m", "patchbench", "run", "--defense", "bagcert", "--rf", rf,
            *TINY, "--results-dir", str(results)]


def first_rows_file(results: Path, process: subprocess.Popen, log: Path) -> Path:
    """Wait for the first finished cell of a running sweep."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        found = sorted((results / "rows").glob("*.csv"))
        if found:
            return found[0]
        assert process.poll() is None, f"the sweep ended early: {log.read_text()}"
        time.sleep(0.01)
    raise AssertionError(f"no cell finished in time: {log.read_text()}")


def assert_each_cell_once(results: Path, rfs: list[int]) -> pd.DataFrame:
    """Every cell has its rows (one patch, two conditions) and 64 per-image rows, once."""
    table = load_results(results)
    assert sorted(table["param_rf"]) == sorted(rf for rf in rfs for _ in range(2))
    assert not table.duplicated(["cell", "patch", "condition"]).any()
    assert table.groupby("cell").size().eq(2).all()
    per_image = sorted((results / "per_image").glob("*.csv.gz"))
    assert [p.name.removesuffix(".csv.gz") for p in per_image] == sorted(table["cell"].unique())
    for path in per_image:
        with gzip.open(path, "rt") as fh:
            assert len(pd.read_csv(fh)) == 64
    return table


def test_a_killed_sweep_resumes_without_losing_or_redoing_a_cell(tmp_path: Path,
                                                                 isolated_cache: Path) -> None:
    results, log = tmp_path / "results", tmp_path / "killed.log"
    with log.open("w") as out:
        process = subprocess.Popen(sweep(results, "3,5,7"), stdout=out, stderr=out, env=ENV)
        try:
            first = first_rows_file(results, process, log)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    finished = sorted((results / "rows").glob("*.csv"))
    assert len(finished) < 3, "the sweep ended before it was killed"
    kept = {p: p.stat().st_mtime_ns for p in [*finished, *isolated_cache.rglob("*.pt")]}

    resumed = subprocess.run(sweep(results, "3,5,7"), capture_output=True, text=True,
                             timeout=900, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"cell {first.stem} (bagcert rf=3 width=8): finished earlier, skipped" in (
        resumed.stderr)
    assert resumed.stderr.count("certified in") == 3 - len(finished)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # not recomputed, not retrained
    assert_each_cell_once(results, [3, 5, 7])


def test_two_sweeps_writing_into_one_folder_at_once_lose_no_row(tmp_path: Path) -> None:
    results = tmp_path / "results"
    # both reach the shared cell (rf 5) second, at about the same time; one of them runs its
    # cells in two joblib worker processes
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=ENV)
                 for command in (sweep(results, "3,5"), [*sweep(results, "7,5"), "--n-jobs", "2"])]
    for process in processes:
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, err
    assert_each_cell_once(results, [3, 5, 7])
    assert not [p for p in results.rglob("*") if p.name.endswith(".tmp")]
