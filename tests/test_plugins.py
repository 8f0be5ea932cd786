"""Third-party defenses register by entry point, exactly like the built-ins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # spawns processes with plugins on their path

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """Install the example and the broken plugin into a folder put on PYTHONPATH."""
    target = tmp_path_factory.mktemp("site")
    for name in ("example", "broken"):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(target),
                        str(PLUGINS / name)], check=True, capture_output=True)
    return target


def patchbench(plugin_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(plugin_path), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "patchbench", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_plugin_is_listed_next_to_builtins_and_broken_one_warns(plugin_path):
    out = patchbench(plugin_path, "defenses")
    assert out.returncode == 0, out.stderr
    for name in ("bagcert", "ds-column", "ds-row", "ds-block", "pixel-vote"):
        assert name in out.stdout
    assert "patchbench-example" in out.stdout
    assert "broken" not in out.stdout
    assert "warning: defense 'broken' from patchbench-broken failed to load" in out.stderr
    assert "Traceback" not in out.stderr


def test_naming_the_broken_plugin_fails_its_cell_clearly(plugin_path, tmp_path):
    out = patchbench(plugin_path, "run", "--defense", "broken", "--patch", "2x2",
                     "--dataset", "synthetic", "--results-dir", str(tmp_path / "results"))
    assert out.returncode == 3
    assert "defense 'broken' from patchbench-broken failed to load" in out.stderr
    assert out.stderr.rstrip().splitlines()[-1].startswith("Error: 1 of 1 cells failed")
    assert "Traceback" not in out.stderr
    assert len(list((tmp_path / "results" / "failed").glob("*.json"))) == 1


def test_plugin_runs_end_to_end(plugin_path, tmp_path):
    train = ("--dataset", "synthetic", "--epochs", "1", "--max-train-images", "64")
    out = patchbench(plugin_path, "run", "--defense", "pixel-vote", "--patch", "1x1,2x2",
                     *train, "--n-images", "16", "--results-dir", str(tmp_path / "results"))
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "results" / "rows").glob("*.csv"))) == 1
    # its attack hooks (touched_cells, soft_votes) make it attackable too; no violation
    out = patchbench(plugin_path, "attack", "--defense", "pixel-vote", "--patch", "2x2", *train,
                     "--n-images", "4", "--steps", "2", "--restarts", "1",
                     "--position-stride", "9", "--worst-positions", "2",
                     "--results-dir", str(tmp_path / "results"))
    assert out.returncode == 0, out.stderr
    assert "pixel-vote" in out.stdout
