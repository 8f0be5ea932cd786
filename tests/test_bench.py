"""``patchbench bench``: documented rows, sane ratios, the reference agrees, bad input is refused.

Everything runs on tiny models and batches: these tests check what is measured and written,
not how fast anything is.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from patchbench.certify import certify_votes
from patchbench.cli import cli
from patchbench.defense import get_defense
from patchbench.defenses.patchcleanser import PatchCleanser, double_masking, majority
from patchbench.patches import PatchShape
from patchbench.running.bench import (
    BENCH_COLUMNS,
    BenchSettings,
    agreement,
    bench_patches,
    reference_certify,
    run_bench,
)

TINY = ["--batch-size", "2", "--repeats", "1", "--warmup", "0", "--n-shapes", "1,2",
        "--width", "4", "--device", "cpu"]
RATIOS = ("certify_over_forward", "over_one_shape", "speedup_over_reference")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})


def read_rows(folder: Path) -> pd.DataFrame:
    files = sorted((folder / "rows").glob("bench-*.csv"))
    assert len(files) == 1, files
    return pd.read_csv(files[0])


@pytest.mark.slow  # times real runs
def test_bench_writes_documented_rows_with_positive_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = invoke("bench", "--defense", "bagcert,ds-column", "--rf", "5", *TINY,
                    "--results-dir", str(out))
    assert result.exit_code == 0, result.output
    assert "speed-up" in result.stdout and "ds-column" in result.stdout
    rows = read_rows(out)
    assert set(BENCH_COLUMNS) <= set(rows.columns)
    assert (rows["benchmark"] == "bench").all() and rows["run_id"].nunique() == 1
    assert (rows["precision"] == "fp32").all() and (rows["shape"] == "fashion-mnist").all()
    for defense, per_image in (("bagcert", 1), ("ds-column", 28)):
        mine = rows[rows["defense"] == defense]
        assert (mine["forward_inputs_per_image"] == per_image).all()
        metrics = set(mine["metric"])
        assert {"forward_seconds", "certify_seconds", "core_seconds", "reference_seconds",
                "peak_memory_bytes", "reference_agreement", *RATIOS} <= metrics
        for n in (1, 2):  # both numbers of patch shapes, both statistics
            timed = mine[(mine["metric"] == "certify_seconds") & (mine["n_patch_shapes"] == n)]
            assert set(timed["statistic"]) == {"median", "min"}
            assert timed["patches"].iloc[0] == ",".join(
                str(p) for p in bench_patches((28, 28), n))
        ratios = mine[mine["metric"].isin(RATIOS)]["value"]
        assert len(ratios) == 2 * 2 * len(RATIOS)
        assert all(math.isfinite(v) and v > 0 for v in ratios)
        one = mine[(mine["metric"] == "over_one_shape") & (mine["n_patch_shapes"] == 1)]
        assert np.allclose(one["value"], 1.0)
        memory = mine[mine["metric"] == "peak_memory_bytes"]["value"].item()
        assert 10 * 2**20 < memory < 8 * 2**30
        assert mine[mine["metric"] == "reference_agreement"]["value"].item() == 1.0
    assert (rows[rows["defense"] == "bagcert"]["param_rf"] == 5).all()


@pytest.mark.slow  # times real runs
def test_bench_runs_patchcleanser(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = invoke("bench", "--defense", "patchcleanser", "--masks-per-axis", "3", *TINY,
                    "--results-dir", str(out))
    assert result.exit_code == 0, result.output
    assert "patchcleanser" in result.stdout
    rows = read_rows(out)
    assert set(BENCH_COLUMNS) <= set(rows.columns)
    assert (rows["defense"] == "patchcleanser").all() and (rows["conditions"] == "masking").all()
    assert {"forward_seconds", "certify_seconds", "reference_seconds", "peak_memory_bytes",
            "reference_agreement", "images_per_second", *RATIOS} == set(rows["metric"])
    # (a) per number of shapes: 9 masks, 45 two-mask images (i <= j) per image and shape
    forward = rows[rows["metric"] == "forward_seconds"]
    assert set(forward["n_patch_shapes"]) == {1, 2} and (forward["value"] > 0).all()
    for n in (1, 2):
        assert (rows[rows["n_patch_shapes"] == n]["forward_inputs_per_image"] == 45 * n).all()
    ratios = rows[rows["metric"].isin(RATIOS)]["value"]
    assert len(ratios) == 2 * 2 * len(RATIOS)
    assert all(math.isfinite(v) and v > 0 for v in ratios)
    assert rows[rows["metric"] == "reference_agreement"]["value"].item() == 1.0
    assert (rows["param_masks_per_axis"] == 3).all()


class NoBench(PatchCleanser):
    name = "no-bench"
    reference_certify = None  # type: ignore[assignment]


def test_a_defense_without_bench_hooks_gets_a_row_that_says_so() -> None:
    settings = BenchSettings(batch_sizes=(2,), n_shapes=(1,), repeats=1, warmup=0)
    logged: list[str] = []
    measurements, rows = run_bench([NoBench(width=4)], settings, torch.device("cpu"),
                                   log=logged.append)
    message = "bench not supported by no-bench: it lacks reference_certify"
    assert measurements[0].unsupported == message and not measurements[0].seconds
    assert message in logged
    assert list(rows["metric"]) == ["unsupported"] and list(rows["note"]) == [message]
    assert set(BENCH_COLUMNS) <= set(rows.columns)


def test_precision_is_recorded_on_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = invoke("bench", "--defense", "bagcert", "--rf", "3", *TINY, "--precision", "bf16",
                    "--no-reference", "--results-dir", str(out))
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert (rows["precision"] == "bf16").all()
    assert not rows["metric"].isin(["reference_seconds", "reference_agreement"]).any()


# --- the reference against patchbench ------------------------------------------------------

def bagcert_model(defense, in_shape, classes) -> nn.Module:
    """A random BagNet whose votes differ by class and cell (a big head), class 0 ahead."""
    model = defense.build_model(in_shape, classes).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)
        model.head.bias.fill_(-1.0)
        model.head.bias[0] = 1.0
    return model


def linear_base(in_shape, classes) -> nn.Module:
    """A base classifier that sees where the ablation is: its votes change with position."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * math.prod(in_shape), classes)).eval()
    with torch.no_grad():
        model[1].weight.mul_(5)
        model[1].bias.zero_()
        model[1].bias[0] += 1.0
    return model


@pytest.mark.parametrize(("name", "params"), [
    ("bagcert", {"rf": 3, "width": 4}),
    ("bagcert", {"rf": 5, "width": 4, "padding": 0}),
    ("ds-column", {"ablation_size": 2, "threshold": 0.3}),
    ("ds-row", {"ablation_size": 2, "threshold": 0.3}),
    ("ds-block", {"ablation_size": 3, "threshold": 0.3}),
])
def test_reference_decides_like_patchbench(name: str, params: dict) -> None:
    torch.manual_seed(0)
    in_shape, classes = (2, 16, 20), 4
    defense = get_defense(name).from_params(params)
    model = (bagcert_model(defense, in_shape, classes) if name == "bagcert"
             else linear_base(in_shape, classes))
    images = torch.rand(6, *in_shape, generator=torch.Generator().manual_seed(1))
    patches = [PatchShape(1, 1), PatchShape(2, 3), PatchShape(4, 2), PatchShape(16, 1)]
    with torch.inference_mode():
        reference = reference_certify(defense, model, images, patches)
        cert = certify_votes(defense.votes(model, images),
                             [defense.footprints(p, in_shape[1:]) for p in patches])
        assert agreement(defense, model, images, patches, reference) == 1.0
    assert reference is not None
    counts = reference.counts
    assert len(np.unique(counts)) > 2  # votes that differ between classes and images
    assert np.array_equal(counts, cert.counts.numpy())
    assert np.array_equal(reference.prediction, cert.prediction.numpy())
    assert set(reference.certified) == ({"tight", "global"} if name == "bagcert" else {"global"})
    for cond, flags in reference.certified.items():
        assert np.array_equal(flags, cert.certified[cond].numpy()), cond
    decided = np.concatenate([f.ravel() for f in reference.certified.values()])
    assert decided.any() or name != "bagcert"  # some certified: the check is not vacuous


@pytest.mark.parametrize("base", ["linear", "small-cnn"])
def test_patchcleanser_reference_decides_like_certify(base: str) -> None:
    torch.manual_seed(1)
    in_shape, classes = (1, 12, 14), 4
    defense = PatchCleanser(masks_per_axis=3, width=4)
    if base == "linear":  # sees where the masks are: first rounds split, some images not
        model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), classes)).eval()
        with torch.no_grad():
            model[1].weight.mul_(6)
            model[1].bias.zero_()
            model[1].bias[0] += 0.5
    else:  # the defense's own base classifier, untrained
        model = defense.build_model(in_shape, classes).eval()
    images = torch.rand(16, *in_shape, generator=torch.Generator().manual_seed(1))
    patches = [PatchShape(3, 3), PatchShape(2, 5)]
    with torch.inference_mode():
        reference = reference_certify(defense, model, images, patches)
        assert reference is not None
        cert = defense.certify(model, images, patches, defense.conditions)
        assert agreement(defense, model, images, patches, reference) == 1.0
        outcomes = [double_masking(model, images, defense.masks(p, in_shape[1:]), 0.5, classes)
                    for p in patches]
    assert reference.counts is None and set(reference.certified) == {"masking"}
    assert reference.prediction.shape == reference.certified["masking"].shape == (16, 2)
    assert np.array_equal(reference.prediction, cert.prediction.numpy())
    assert np.array_equal(reference.certified["masking"], cert.certified["masking"].numpy())
    if base == "linear":  # not vacuous: certified and not, and the second round decides some
        flags = reference.certified["masking"]
        assert flags.any() and not flags.all()
        assert any((o.prediction != majority(o.one_mask, classes)).any() for o in outcomes)


def test_patchcleanser_forward_passes_count_every_two_mask_image() -> None:
    defense = PatchCleanser(masks_per_axis=3, width=4)
    model = defense.build_model((1, 12, 14), 4).eval()
    calls: list[int] = []
    model.register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
    images = torch.rand(3, 1, 12, 14)
    patches = [PatchShape(3, 3), PatchShape(2, 5), PatchShape(3, 3)]  # two mask sets
    with torch.inference_mode():
        run, per_image = defense.forward_passes(model, images, patches, max_forward=50,
                                                max_prebuilt_bytes=0)
        run()
    assert per_image == 2 * 45 and sum(calls) == 3 * per_image
    assert max(calls) == 50


def test_bench_patches_fit_and_scale() -> None:
    assert bench_patches((28, 28), 1) == [PatchShape(5, 5)]
    assert len(set(bench_patches((32, 32), 20))) == 20
    big = bench_patches((224, 224), 20)
    assert big[0] == PatchShape(35, 35) and all(p.height <= 224 and p.width <= 224 for p in big)


def test_settings_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown shape"):
        BenchSettings(shape="mnist")
    with pytest.raises(ValueError, match="unknown precision"):
        BenchSettings(precision="fp8")
    assert BenchSettings(shape="imagenet").num_classes == 1000
    assert not BenchSettings(shape="imagenet").with_reference


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "fragment"), [
    (("--shape", "mnist"), "'mnist' is not one of"),
    (("--precision", "fp8"), "'fp8' is not one of"),
    (("--batch-size", "16,x"), "expected a comma list of integers"),
    (("--batch-size", "0"), "expected positive integers"),
    (("--n-shapes", "1,21"), "at most 20 patch shapes"),
    (("--rf-size", "3"), "has no parameter(s) ['rf_size']"),
    (("--rf", "abc"), "parameter 'rf' expects int"),
], ids=["shape", "precision", "batch size", "batch size 0", "shapes", "parameter", "value"])
def test_bad_input_exits_2_with_one_line(args: tuple[str, ...], fragment: str,
                                        tmp_path: Path) -> None:
    result = invoke("bench", "--defense", "bagcert", *args, "--results-dir",
                    str(tmp_path / "bench"))
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert fragment in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: ")
    assert "Traceback" not in result.output
    assert not (tmp_path / "bench").exists()
