"""Resuming in real processes: a sweep killed with SIGKILL at a random point, then run again,
leaves the same result files as an uninterrupted run, losing no finished cell and redoing
none; Ctrl-C exits with 130 and one line, keeping finished cells; two sweeps writing into one
results folder at once lose no row."""

from __future__ import annotations

import gzip
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from patchbench import load_results
from patchbench.running.atomic import atomic_path, remove_stale_temp_files

TINY = ["--dataset", "synthetic", "--epochs", "1", "--max-train-images", "256", "--n-images",
        "64", "--width", "8", "--device", "cpu", "--patch", "3x3"]
RFS = [3, 5, 7]
# Row columns that differ between two runs of one cell: timings, the time of day, and the
# checkpoint's hash (a retrained checkpoint records its own training time).
VARYING = ("certify_seconds", "forward_seconds", "images_per_second", "timestamp",
           "checkpoint_sha256")
SEED = int(os.environ.get("PATCHBENCH_KILL_SEED", "9"))  # where the SIGKILL lands


def env(cache: Path) -> dict[str, str]:
    # One thread per process: tiny models gain nothing from more, and on a shared two-core
    # machine competing thread pools spin (several times the CPU time).
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200",
            "PATCHBENCH_CACHE": str(cache)}


def sweep(results: Path, rf: str = "3,5,7") -> list[str]:
    return [sys.executable, "-m", "patchbench", "run", "--defense", "bagcert", "--rf", rf,
            *TINY, "--results-dir", str(results)]


def rows_files(results: Path) -> list[Path]:
    return sorted((results / "rows").glob("*.csv"))


def label(rows: Path) -> str:
    """How a sweep names the cell of a rows file."""
    return f"bagcert rf={pd.read_csv(rows)['param_rf'].iloc[0]} width=8"


def wait_for(condition, process: subprocess.Popen, log: Path) -> float:
    """Poll until ``condition()`` holds while the process runs; return the time it held."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        ended = process.poll() is not None  # first: what it wrote before it ended is seen
        if condition():
            return time.monotonic()
        assert not ended, f"the sweep ended early: {log.read_text()}"
        time.sleep(0.005)
    raise AssertionError(f"timed out: {log.read_text()}")


def temp_files(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.name.endswith(".tmp")]


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


def assert_same_results(results: Path, reference: Path) -> None:
    """The same files; per-image tables equal, rows equal but for the VARYING columns."""
    def files(folder: Path) -> list[str]:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    assert files(results) == files(reference)
    for path in sorted((reference / "per_image").glob("*.csv.gz")):
        with gzip.open(path, "rt") as want, gzip.open(results / "per_image" / path.name,
                                                       "rt") as got:
            pd.testing.assert_frame_equal(pd.read_csv(got), pd.read_csv(want))
    for path in rows_files(reference):
        got, want = (pd.read_csv(p).drop(columns=list(VARYING))
                     for p in (results / "rows" / path.name, path))
        pd.testing.assert_frame_equal(got, want)


ATTEMPTS = 3


@dataclass(frozen=True)
class Interrupted:
    """A sweep that a signal stopped before its last cell; ``seen`` is what the interrupt
    returned (what it read while the sweep ran)."""

    results: Path
    cache: Path
    log: Path  # the sweep's stderr
    process: subprocess.Popen
    seen: Any


def interrupted_sweep(tmp_path: Path,
                      interrupt: Callable[[Path, subprocess.Popen, Path], Any],
                      where: str) -> Interrupted:
    """Run the sweep and ``interrupt(results, process, log)`` it. An attempt in which the
    sweep finished all its cells before the signal landed (a test process starved of CPU acts
    late) interrupted nothing: it is run again, in a fresh folder, up to ATTEMPTS times."""
    for attempt in range(ATTEMPTS):
        folder = tmp_path / f"attempt-{attempt}"
        results, cache, log = folder / "results", folder / "cache", folder / "sweep.log"
        folder.mkdir()
        with log.open("w") as err:
            # SIGINT as in a terminal, even where the suite runs in the background
            process = subprocess.Popen(sweep(results), stdout=subprocess.DEVNULL, stderr=err,
                                       env=env(cache), preexec_fn=lambda: signal.signal(
                                           signal.SIGINT, signal.SIG_DFL))
            try:
                seen = interrupt(results, process, log)
            finally:
                process.kill()
                process.wait()
        if len(rows_files(results)) < len(RFS):
            return Interrupted(results, cache, log, process, seen)
    raise AssertionError(f"the sweep ended before the signal in {ATTEMPTS} attempts ({where})")


@dataclass(frozen=True)
class Reference:
    results: Path
    # seconds from the sweep's start (its results folder appears) to each finished cell, and
    # between finished cells
    intervals: tuple[float, ...]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The sweep run once without interruption: the files every resumed run must match."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    results, log = folder / "results", folder / "sweep.log"
    with log.open("w") as out:
        process = subprocess.Popen(sweep(results), stdout=out, stderr=out,
                                   env=env(folder / "cache"))
        try:
            times = [wait_for((results / "rows").is_dir, process, log)]
            for n in (1, 2):
                times.append(wait_for(lambda n=n: len(rows_files(results)) >= n, process, log))
            assert process.wait(timeout=900) == 0, log.read_text()
        finally:
            process.kill()
            process.wait()
    times.append(time.monotonic())  # the last cell: at most this late
    assert_each_cell_once(results, RFS)
    assert not temp_files(folder)
    return Reference(results, tuple(b - a for a, b in zip(times, times[1:], strict=False)))


@pytest.mark.slow
def test_a_sweep_killed_at_a_random_point_resumes_to_the_same_files(
        tmp_path: Path, uninterrupted: Reference) -> None:
    """SIGKILL after 0 or 1 finished cells plus a random share of the time the next cell took
    in the uninterrupted run: while loading, training, certifying or writing a cell."""
    rng = random.Random(SEED)
    finished_before, share = rng.randrange(2), rng.random()
    delay = share * uninterrupted.intervals[finished_before]
    where = f"seed {SEED}: {finished_before} finished cell(s) + {delay:.2f} s"

    def kill(results: Path, process: subprocess.Popen, log: Path) -> None:
        wait_for(lambda: (results / "rows").is_dir()
                 and len(rows_files(results)) >= finished_before, process, log)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)

    run = interrupted_sweep(tmp_path, kill, where)
    results, cache = run.results, run.cache
    assert run.process.returncode == -signal.SIGKILL
    finished = rows_files(results)
    models = sorted(cache.rglob("*.pt"))
    kept = {p: p.stat().st_mtime_ns for p in [*finished, *models]}

    resumed = subprocess.run(sweep(results), capture_output=True, text=True, timeout=900,
                             env=env(cache))
    assert resumed.returncode == 0, resumed.stderr
    for path in finished:
        assert f"cell {path.stem} ({label(path)}): finished earlier, skipped" in resumed.stderr
    assert resumed.stderr.count("finished earlier, skipped") == len(finished), where
    assert resumed.stderr.count("certified in") == 3 - len(finished), where
    assert resumed.stderr.count("saved ") == 3 - len(models), where  # none trained twice
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, where  # not recomputed
    assert_each_cell_once(results, RFS)
    assert not temp_files(results, cache), where  # a killed writer's temp files are removed
    assert_same_results(results, uninterrupted.results)


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_keeps_finished_cells(
        tmp_path: Path, uninterrupted: Reference) -> None:
    def ctrl_c(results: Path, process: subprocess.Popen, log: Path) -> tuple[Path, dict]:
        """Ctrl-C once the first cell is written; return it and the bytes of its files."""
        wait_for(lambda: bool(rows_files(results)), process, log)
        first = rows_files(results)[0]
        per_image = results / "per_image" / f"{first.stem}.csv.gz"
        written = {first: first.read_bytes(), per_image: per_image.read_bytes()}
        process.send_signal(signal.SIGINT)
        process.wait(timeout=300)
        return first, written

    run = interrupted_sweep(tmp_path, ctrl_c, "Ctrl-C after the first cell")
    results, cache, (first, written) = run.results, run.cache, run.seen
    stderr = run.log.read_text()
    assert run.process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.rstrip().splitlines()[-1] == "Interrupted: finished results are kept."
    assert {path: path.read_bytes() for path in written} == written  # kept intact
    finished = rows_files(results)
    assert_each_cell_once(results, [int(pd.read_csv(p)["param_rf"].iloc[0]) for p in finished])
    assert not temp_files(results, cache)

    again = subprocess.run(sweep(results), capture_output=True, text=True, timeout=900,
                           env=env(cache))
    assert again.returncode == 0, again.stderr
    assert f"cell {first.stem} ({label(first)}): finished earlier, skipped" in again.stderr
    assert again.stderr.count("finished earlier, skipped") == len(finished)
    assert again.stderr.count("certified in") == 3 - len(finished)
    assert {path: path.read_bytes() for path in written} == written
    assert_same_results(results, uninterrupted.results)


@pytest.mark.slow
def test_two_sweeps_writing_into_one_folder_at_once_lose_no_row(tmp_path: Path) -> None:
    results = tmp_path / "results"
    # both reach the shared cell (rf 5) second, at about the same time; one of them runs its
    # cells in two joblib worker processes
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env(tmp_path / "cache"))
                 for command in (sweep(results, "3,5"), [*sweep(results, "7,5"), "--n-jobs", "2"])]
    for process in processes:
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, err
    assert_each_cell_once(results, RFS)
    assert not temp_files(results, tmp_path / "cache")


def test_a_write_removes_the_temp_files_of_killed_writers_only(tmp_path: Path) -> None:
    target = tmp_path / "rows" / "cell.csv"
    with atomic_path(target) as tmp:  # a write in progress: this process runs
        tmp.write_text("a\n1\n")
        live = tmp
        assert not remove_stale_temp_files(target) and live.exists()
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout.strip()
        stale = tmp.with_name(tmp.name.replace(f".{os.getpid()}@", f".{dead}@"))
        stale.write_text("half a fi")
        other = tmp_path / "rows" / f".other.csv.{dead}@{tmp.name.split('@')[1]}"
        other.write_text("another target's")
        foreign = tmp.with_name(tmp.name.replace("@", "@elsewhere-"))  # another host's
        foreign.write_text("a writer on another machine")
    assert target.read_text() == "a\n1\n" and not live.exists()
    with atomic_path(target) as tmp:  # the next write of the target
        tmp.write_text("a\n2\n")
    assert not stale.exists()
    assert other.exists() and foreign.exists()  # another target's, another host's
    assert target.read_text() == "a\n2\n"
