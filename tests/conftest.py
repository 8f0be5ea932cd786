"""Every test gets its own checkpoint cache: nothing leaks into ~/.cache or between tests.

``checkpoints``: one tiny BagCert checkpoint for the session, plus broken copies of it (for
the command-line tests of good and bad input).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

# A model that trains in about a second on two shared CPU cores.
TINY = ["--dataset", "synthetic", "--epochs", "1", "--max-train-images", "64", "--rf", "5",
        "--width", "4"]


@pytest.fixture(scope="module")
def one_thread():
    """For modules that train tiny models (``pytestmark = usefixtures("one_thread")``): they
    gain nothing from a second thread, and on a shared two-core machine competing thread pools
    spin (several times the CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@dataclass(frozen=True)
class Checkpoints:
    good: Path
    sha256: str
    truncated: Path
    tampered_weights: Path
    tampered_meta: Path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    """One tiny BagCert checkpoint (synthetic data, rf 5, width 4), plus broken copies."""
    from patchbench.cli import cli

    folder = tmp_path_factory.mktemp("checkpoints")
    good = folder / "bagcert.pt"
    result = CliRunner().invoke(cli, ["train", "--defense", "bagcert", *TINY, "--device", "cpu",
                                      "--output", str(good)])
    assert result.exit_code == 0 and result.exception is None, result.output
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
