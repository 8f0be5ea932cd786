"""A third-party defense of the masking family (no vote map, a condition of its own) through
the whole harness from its entry point: run, report and attack, in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from patchbench.patches import PatchShape

pytestmark = pytest.mark.slow  # installs a plugin and trains through the CLI

PLUGINS = Path(__file__).parent / "plugins"
TRAIN = ["--dataset", "synthetic", "--epochs", "1", "--max-train-images", "64"]
RUN = ["run", "--defense", "quad-mask", "--patch", "3x3,2x5", *TRAIN, "--n-images", "12",
       "--device", "cpu"]


@dataclass(frozen=True)
class Installed:
    site: Path  # the plugins, installed by pip into a folder put on PYTHONPATH
    cache: Path  # the checkpoint cache of the module's processes
    results: Path  # one finished `patchbench run` of quad-mask
    run: subprocess.CompletedProcess


def patchbench(installed: Installed | tuple[Path, Path], *args: str
               ) -> subprocess.CompletedProcess:
    site, cache = installed[:2] if isinstance(installed, tuple) else (installed.site,
                                                                       installed.cache)
    env = {**os.environ, "PYTHONPATH": str(site), "PATCHBENCH_CACHE": str(cache),
           "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "patchbench", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """pip-install the masking plugin (and the vote-map example), then run quad-mask once."""
    folder = tmp_path_factory.mktemp("masking")
    site = folder / "site"
    for name in ("masking", "example"):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(site),
                        str(PLUGINS / name)], check=True, capture_output=True)
    results = folder / "results"
    run = patchbench((site, folder / "cache"), *RUN, "--results-dir", str(results))
    return Installed(site, folder / "cache", results, run)


def test_it_is_listed_with_its_own_condition(installed: Installed) -> None:
    out = patchbench(installed, "defenses", "--verbose")
    assert out.returncode == 0, out.stderr
    assert "quad-mask" in out.stdout and "patchbench-masking" in out.stdout
    assert "Traceback" not in out.stderr


def test_run_certifies_it_under_its_own_condition(installed: Installed) -> None:
    out = installed.run
    assert out.returncode == 0, out.stderr
    assert "quad-mask" in out.stdout and "quad" in out.stdout
    rows = list((installed.results / "rows").glob("*.csv"))
    assert len(rows) == 1
    text = rows[0].read_text()
    assert "quad-mask" in text and ",quad," in text and "tight" not in text
    per_image = list((installed.results / "per_image").glob("*.csv.gz"))
    assert len(per_image) == 1
    table = pd.read_csv(per_image[0])
    assert len(table) == 12
    for patch in ("3x3", "2x5"):  # one prediction per shape (own mask set), 0/1 flags
        assert f"prediction_{patch}" in table and f"certified_quad_{patch}" in table
        assert set(table[f"certified_quad_{patch}"]) <= {0, 1}


def test_a_condition_one_defense_lacks_is_a_usage_error(installed: Installed,
                                                        tmp_path: Path) -> None:
    out = patchbench(installed, "run", "--defense", "quad-mask,pixel-vote", "--patch", "3x3",
                     *TRAIN, "--condition", "quad", "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 2, out.stderr
    assert "defense 'pixel-vote' has none of the conditions ['quad']" in out.stderr
    assert "Traceback" not in out.stderr


def test_report_covers_it_and_says_it_has_no_gallery(installed: Installed,
                                                     tmp_path: Path) -> None:
    out = patchbench(installed, "report", "--results-dir", str(installed.results),
                     "--out", str(tmp_path / "reports"), "--gallery-images", "1")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    report = (tmp_path / "reports" / "report.md").read_text()
    assert "quad-mask" in report
    assert "gallery not supported by quad-mask: it lacks explain" in report


def test_attack_runs_through_its_hooks_without_a_violation(installed: Installed) -> None:
    out = patchbench(installed, "attack", "--defense", "quad-mask", "--patch", "3x3", *TRAIN,
                     "--n-images", "4", "--device", "cpu", "--steps", "2", "--restarts", "1",
                     "--position-stride", "9", "--results-dir", str(installed.results))
    assert out.returncode == 0, out.stderr  # 4 would be a soundness violation
    assert "quad-mask" in out.stdout
    assert "Traceback" not in out.stderr


# --- the plugin in-process ------------------------------------------------------------------

@pytest.fixture
def quad_mask(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(PLUGINS / "masking" / "src"))
    from patchbench_masking import QuadMask

    return QuadMask


def test_missing_hooks_are_named(quad_mask) -> None:
    defense = quad_mask()
    assert defense.unsupported("attack") is None
    assert defense.unsupported("bench") == ("bench not supported by quad-mask: it lacks "
                                            "forward_passes, reference_certify")
    assert defense.unsupported("gallery") == "gallery not supported by quad-mask: it lacks explain"


def test_certified_predictions_survive_every_patch_position(quad_mask) -> None:
    """Soundness on tiny images: the defended prediction of a certified image stays the same
    with content pasted at every position; and certify predicts as the attack judges. A linear
    model (every pixel counts) certifies some images and not others."""
    torch.manual_seed(0)
    defense = quad_mask()
    model = nn.Sequential(nn.Flatten(), nn.Linear(100, 3)).eval()
    images = torch.rand(8, 1, 10, 10)
    patches = [PatchShape(3, 3), PatchShape(2, 4)]
    with torch.no_grad():
        cert = defense.certify(model, images, patches, ["quad"])
        assert cert.prediction.shape == (8, 2) and cert.certified["quad"].shape == (8, 2)
        assert 0 < int(cert.certified["quad"].sum()) < 16
        for s, patch in enumerate(patches):
            certified = cert.certified["quad"][:, s]
            assert torch.equal(cert.prediction[:, s],
                               defense.defended_prediction(model, images, patch))
            for top in range(10 - patch.height + 1):
                for left in range(10 - patch.width + 1):
                    for content in (0.0, 1.0, torch.rand(8, 1, patch.height, patch.width)):
                        patched = images.clone()
                        patched[:, :, top:top + patch.height, left:left + patch.width] = content
                        got = defense.defended_prediction(model, patched, patch)
                        assert torch.equal(got[certified], cert.prediction[certified, s])
