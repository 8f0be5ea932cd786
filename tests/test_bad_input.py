"""Bad input (issue #6): every command answers with one line naming the problem and the exit
code of the table below (2 for usage errors, 1 for other user errors, 130 for Ctrl-C), never a
traceback, and writes no results.

One table, ``BAD_INPUT``: each case once per command it applies to, with the exact exit code
and a fragment of the message. Cases go through click's CliRunner (in-process, fast); a couple
run ``python -m patchbench`` in a real process to prove the exit code and the absence of a
traceback there, and a real Ctrl-C during the start-up imports. A real Ctrl-C of a sweep is
tested in test_resume.py. Bad input that only ``report`` and ``bench`` have (a filter that
leaves nothing, bench's number lists) and bad sweep parameters are also in test_report.py,
test_bench.py and test_sweep.py.
"""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import TINY, Checkpoints
from tests.test_cli import assert_clean_exit, invoke


@dataclass(frozen=True)
class Bad:
    args: tuple[str, ...]  # "{tmp}" (the test's folder), "{art}" (artefacts), "{good}", ...
    code: int
    fragment: str  # of the last stderr line, placeholders filled in as in args
    interrupt: str = ""  # a function to replace with one raising KeyboardInterrupt (Ctrl-C)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
NOT_AS_ROOT = pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                             reason="root reads files whatever their permissions")

# Each command with the options it needs; the cases below add theirs.
RUN = ("run", "--n-images", "8", "--device", "cpu")
TRAIN = ("train", "--epochs", "1", "--max-train-images", "64", "--device", "cpu", "--output",
         "{tmp}/model.pt")
ATTACK = ("attack", "--n-images", "8", "--steps", "1", "--device", "cpu")
BENCH = ("bench", "--defense", "bagcert", "--batch-size", "4", "--n-shapes", "1", "--repeats",
         "1", "--warmup", "0", "--device", "cpu")
REPORT = ("report", "--out", "{tmp}/reports")
SELECT = ("select", "--defense", "ds-column", "--param", "threshold")
BAGCERT = ("--defense", "bagcert", "--dataset", "synthetic")
COMMANDS = {"run": (*RUN, *BAGCERT, "--patch", "2x2"), "train": (*TRAIN, *BAGCERT),
            "attack": (*ATTACK, *BAGCERT, "--patch", "2x2", "--checkpoint", "{good}"),
            "bench": BENCH, "report": (*REPORT, "--results-dir", "{art}/results/good"),
            "select": (*SELECT, "--results-dir", "{art}/results/good")}
AVAILABLE = "unknown defense 'nope'; available: bagcert, ds-block, ds-column"
CUDA_MISSING = "Invalid value for '--device': cuda requested but CUDA is not available"

BAD_INPUT: dict[str, object] = {}  # "command: case" -> Bad, or a pytest.param of one


def cases(commands: dict[str, tuple[str, ...]], table: dict[str, tuple], marks=()) -> None:
    """Add each case (args, code, fragment) for each command (base args) to BAD_INPUT."""
    for command, base in commands.items():
        for name, (args, code, fragment) in table.items():
            bad = Bad((*base, *args), code, fragment)
            assert f"{command}: {name}" not in BAD_INPUT, f"{command}: {name} twice"
            BAD_INPUT[f"{command}: {name}"] = pytest.param(bad, marks=marks) if marks else bad


# --- malformed or impossible --patch values: usage errors --------------------------------
PATCH = {
    "patch 5x": (("--patch", "5x"), 2, "Invalid value for '--patch': malformed patch shape '5x'"),
    "patch axb": (("--patch", "axb"), 2, "malformed patch shape 'axb'"),
    "patch -1x2": (("--patch", "-1x2"), 2, "malformed patch shape '-1x2'"),
    "patch 0x3": (("--patch", "0x3"), 2, "patch shape '0x3' has a zero side"),
    "patch empty": (("--patch", ""), 2, "empty patch shape"),
}
cases({"run": (*RUN, *BAGCERT), "attack": (*ATTACK, *BAGCERT, "--checkpoint", "{good}")}, {
    **PATCH,
    "patch empty token": (("--patch", "5x5,,2x2"), 2, "empty patch shape in '5x5,,2x2'"),
    "patch missing": ((), 2, "Missing option '--patch'"),
    "patch larger than the images": (("--patch", "5x5,30x5"), 2,
                                     "Invalid value for '--patch': patch 30x5 does not fit in "
                                     "the 28x28 images"),
})
cases({"select": (*SELECT, "--results-dir", "{art}/results/good")}, {
    **PATCH,
    "patch without rows": (("--patch", "30x30"), 2, "no rows for patch 30x30 and condition tight"),
})

# --- unknown names: usage errors naming what exists ---------------------------------------
cases({"run": (*RUN, "--dataset", "synthetic", "--patch", "2x2"),
       "train": (*TRAIN, "--dataset", "synthetic"),
       "attack": (*ATTACK, "--dataset", "synthetic", "--patch", "2x2", "--checkpoint", "{good}"),
       "bench": BENCH[:1] + BENCH[3:]}, {
    "unknown defense": (("--defense", "nope"), 2, f"Invalid value for '--defense': {AVAILABLE}"),
})
cases({"run": (*RUN, "--dataset", "synthetic", "--patch", "2x2"),
       "train": (*TRAIN, "--dataset", "synthetic"),
       "bench": BENCH[:1] + BENCH[3:]}, {
    "missing defense": ((), 2, "Missing option '--defense'"),
})
cases({"run": (*RUN, "--defense", "bagcert", "--patch", "2x2"),
       "train": (*TRAIN, "--defense", "bagcert"),
       "attack": (*ATTACK, "--defense", "bagcert", "--patch", "2x2", "--checkpoint", "{good}")}, {
    "unknown dataset": (("--dataset", "mnist"), 2,
                        "Invalid value for '--dataset': 'mnist' is not one of 'cifar10', "
                        "'fashion-mnist', 'imagenet', 'synthetic'"),
    "unknown training precision": (("--train-precision", "fp8"), 2,
                                   "Invalid value for '--train-precision': 'fp8' is not one of "
                                   "'fp32', 'bf16'"),
})
cases({"run": COMMANDS["run"], "attack": COMMANDS["attack"]}, {
    "unknown split": (("--split", "validation"), 2,
                      "Invalid value for '--split': 'validation' is not one of 'train', 'val', "
                      "'test'"),
})
cases({"run": COMMANDS["run"]}, {
    "unknown condition": (("--condition", "tight,loose"), 2,
                          "Invalid value for '--condition': unknown condition(s) ['loose']; "
                          "choose from tight, global"),
    "empty condition": (("--condition", ","), 2,
                        "Invalid value for '--condition': no condition in ','"),
    "unknown backend": (("--backend", "dask"), 2,
                        "Invalid value for '--backend': 'dask' is not one of 'local', 'ray'"),
})
cases({"select": COMMANDS["select"]}, {
    "unknown condition": (("--condition", "loose"), 2,
                          "Invalid value for '--condition': unknown condition 'loose'; the "
                          "rows of ds-column have tight"),
    "unknown parameter": (("--param", "rf"), 2, "the rows sweep no parameter 'rf'"),
    "parameter list malformed": (("--param", "threshold,,threshold"), 2,
                                 "comma-separated distinct parameter names, not "
                                 "'threshold,,threshold'"),
    "where malformed": (("--where", "threshold"), 2, "NAME=VALUE, not 'threshold'"),
    "where without rows": (("--where", "threshold=9"), 2, "no rows with threshold = 9"),
})
cases({"select": (*SELECT[:1], *SELECT[3:], "--results-dir", "{art}/results/good")}, {
    "unknown defense": (("--defense", "nope"), 2,
                        "no rows of defense 'nope' in {art}/results/good; it holds rows of "
                        "ds-column"),
})
cases({"report": COMMANDS["report"]}, {  # report's filters name what the results hold
    "unknown defense": (("--defense", "nope"), 1,
                        "no results in {art}/results/good match --dataset * --defense nope; it "
                        "holds datasets synthetic and defenses ds-column"),
    "unknown dataset": (("--dataset", "mnist"), 1,
                        "match --dataset mnist --defense *; it holds datasets synthetic"),
})
cases({"bench": BENCH}, {  # bench's synthetic images have a shape instead of a dataset
    "unknown shape": (("--shape", "mnist"), 2,
                      "Invalid value for '--shape': 'mnist' is not one of 'fashion-mnist', "
                      "'cifar', 'imagenet'"),
})

# --- datasets: missing, or a data folder in the wrong format -----------------------------
cases({"run": (*RUN, "--defense", "bagcert", "--patch", "2x2"),
       "train": (*TRAIN, "--defense", "bagcert"),
       "attack": (*ATTACK, "--defense", "bagcert", "--patch", "2x2", "--checkpoint", "{good}")}, {
    "fashion-mnist missing": (("--dataset", "fashion-mnist", "--data-dir", "{tmp}/nowhere"), 1,
                              "Fashion-MNIST IDX files not found in {tmp}/nowhere: run "
                              "'apt-get install dataset-fashion-mnist', pass --data-dir, or "
                              "allow --download"),
    "cifar10 missing": (("--dataset", "cifar10", "--data-dir", "{tmp}/nowhere"), 1,
                        "CIFAR-10 not found: expected {tmp}/nowhere/cifar-10-batches-py"),
    "cifar10 batch file missing": (("--dataset", "cifar10", "--data-dir", "{art}/cifar10-empty"),
                                   1, "CIFAR-10 file {art}/cifar10-empty/cifar-10-batches-py/"),
    "imagenet missing": (("--dataset", "imagenet"), 1,
                         "ImageNet must be given as an ImageFolder tree: pass --data-dir DIR"),
    "fashion-mnist garbage": (("--dataset", "fashion-mnist", "--data-dir",
                               "{art}/fashion-mnist-garbage"), 1,
                              "idx3-ubyte is not an IDX file of unsigned bytes"),
    "fashion-mnist of 32x32 images": (("--dataset", "fashion-mnist", "--data-dir",
                                       "{art}/fashion-mnist-32x32"), 1,
                                      "do not hold 28x28 images and labels"),
    "cifar10 garbage": (("--dataset", "cifar10", "--data-dir", "{art}/cifar10-garbage"), 1,
                        "is not a CIFAR-10 batch"),
    "imagenet without classes": (("--dataset", "imagenet", "--data-dir", "{art}/imagenet-empty"),
                                 1, "is not an ImageFolder tree"),
    "data dir is a file": (("--dataset", "fashion-mnist", "--data-dir", "{good}"), 2,
                           "Invalid value for '--data-dir': Directory '{good}' is a file"),
})

# --- checkpoints: missing, truncated, altered, of another defense or dataset --------------
cases({"run": (*RUN, "--patch", "2x2"), "attack": (*ATTACK, "--patch", "2x2")}, {
    "checkpoint missing": ((*BAGCERT, "--checkpoint", "{tmp}/none.pt"), 1,
                           "checkpoint {tmp}/none.pt does not exist"),
    "checkpoint truncated": ((*BAGCERT, "--checkpoint", "{truncated}"), 1,
                             "checkpoint {truncated} is unreadable or truncated"),
    "checkpoint weights altered": ((*BAGCERT, "--checkpoint", "{tampered_weights}"), 1,
                                   "checkpoint {tampered_weights} was altered after it was "
                                   "written (content hash mismatch)"),
    "checkpoint meta altered": ((*BAGCERT, "--checkpoint", "{tampered_meta}"), 1,
                                "checkpoint {tampered_meta} was altered after it was written"),
    "checkpoint of another defense": (("--defense", "ds-column", "--dataset", "synthetic",
                                       "--checkpoint", "{good}"), 1,
                                      "checkpoint {good} is for defense 'bagcert', not "
                                      "'ds-column'"),
    "checkpoint of another dataset (fashion-mnist)": (
        ("--defense", "bagcert", "--dataset", "fashion-mnist", "--data-dir",
         "{art}/fashion-mnist", "--checkpoint", "{good}"), 1,
        "checkpoint {good} is for dataset 'synthetic', not 'fashion-mnist'"),
    "checkpoint of another dataset (cifar10)": (
        ("--defense", "bagcert", "--dataset", "cifar10", "--data-dir", "{art}/cifar10",
         "--checkpoint", "{good}"), 1,
        "checkpoint {good} is for dataset 'synthetic', not 'cifar10'"),
    "checkpoint is a folder": ((*BAGCERT, "--checkpoint", "{tmp}"), 2,
                               "Invalid value for '--checkpoint': File '{tmp}' is a directory"),
})
cases({"attack": (*ATTACK, "--patch", "2x2")}, {
    "no trained model": (BAGCERT, 1, "no trained model synthetic-bagcert-"),
})
# an existing path that holds no checkpoint is "not a checkpoint file", never "does not exist":
# no regular file (a device, a pipe) is refused with the option, a file that is not one on load
NOT_A_CHECKPOINT = "Invalid value for '--checkpoint': File '{0}' is not a checkpoint file: it is "
cases({"run": (*RUN, "--patch", "2x2"), "attack": (*ATTACK, "--patch", "2x2")}, {
    "checkpoint is /dev/null": ((*BAGCERT, "--checkpoint", "/dev/null"), 2,
                                NOT_A_CHECKPOINT.format("/dev/null") + "a character device"),
    "checkpoint is a named pipe": ((*BAGCERT, "--checkpoint", "{art}/fifo.pt"), 2,
                                   NOT_A_CHECKPOINT.format("{art}/fifo.pt") + "a named pipe"),
    "checkpoint is an empty file": ((*BAGCERT, "--checkpoint", "{art}/empty.pt"), 1,
                                    "{art}/empty.pt is not a checkpoint file: it is empty"),
    "checkpoint is a text file": ((*BAGCERT, "--checkpoint", "{art}/text.pt"), 1,
                                  "{art}/text.pt is not a checkpoint file"),
    "checkpoint is torch data of another program": (
        (*BAGCERT, "--checkpoint", "{art}/state-dict.pt"), 1,
        "{art}/state-dict.pt is not a checkpoint file: torch.save data, but not written by "
        "patchbench"),
})
# run/attack --checkpoint without --defense: the checkpoint's defense, dataset and parameters
cases({"run": (*RUN, "--patch", "2x2"), "attack": (*ATTACK, "--patch", "2x2")}, {
    "neither defense nor checkpoint": (("--dataset", "synthetic"), 2,
                                       "Missing option '--defense'. Name one, or pass "
                                       "--model or --checkpoint."),
    "checkpoint without defense, other parameter": (("--checkpoint", "{good}", "--rf", "7"), 2,
                                                    "checkpoint {good} was trained with rf=5, "
                                                    "not rf=7"),
    "checkpoint without defense, parameter of another defense": (
        ("--checkpoint", "{good}", "--ablation-size", "2"), 2,
        "defense 'bagcert' has no parameter(s) ['ablation_size']"),
    "checkpoint without defense, other dataset given": (
        ("--checkpoint", "{good}", "--dataset", "cifar10", "--data-dir", "{art}/cifar10"), 1,
        "checkpoint {good} is for dataset 'synthetic', not 'cifar10'"),
    "checkpoint without defense is /dev/null": (("--checkpoint", "/dev/null"), 2,
                                                NOT_A_CHECKPOINT.format("/dev/null")),
    "checkpoint without defense is a text file": (("--checkpoint", "{art}/text.pt"), 1,
                                                  "{art}/text.pt is not a checkpoint file"),
})

# --- results folders: empty, unreadable, or holding a malformed file ---------------------
RESULTS = {
    "results folder missing": (("--results-dir", "{tmp}/nowhere"), 1,
                               "results folder {tmp}/nowhere does not exist"),
    "results folder empty": (("--results-dir", "{art}/results/empty"), 1,
                             "results folder {art}/results/empty holds no result rows"),
    "rows folder empty": (("--results-dir", "{art}/results/empty-rows"), 1,
                          "holds no result rows"),
    "results folder is a file": (("--results-dir", "{good}"), 2,
                                 "Invalid value for '--results-dir': Directory '{good}' is a "
                                 "file"),
    "rows file is a folder": (("--results-dir", "{art}/results/folder"), 1,
                              "cannot read results file {art}/results/folder/rows/a.csv: Is a "
                              "directory"),
    "rows file is a dangling link": (("--results-dir", "{art}/results/link"), 1,
                                     "cannot read results file {art}/results/link/rows/a.csv: "
                                     "No such file or directory"),
    "rows file is garbage": (("--results-dir", "{art}/results/garbage"), 1,
                             "malformed results file {art}/results/garbage/rows/a.csv"),
    "rows file empty": (("--results-dir", "{art}/results/empty-file"), 1,
                        "malformed results file {art}/results/empty-file/rows/a.csv"),
    "rows without columns": (("--results-dir", "{art}/results/columns"), 1,
                             "results in {art}/results/columns lack column(s)"),
    "text in a number column": (("--results-dir", "{art}/results/text"), 1,
                                "results in {art}/results/text: column certified_accuracy holds "
                                "a value that is not a number"),
}
cases({"report": REPORT, "select": SELECT}, RESULTS)
cases({"report": REPORT, "select": SELECT}, {
    "rows file unreadable": (("--results-dir", "{art}/results/unreadable"), 1,
                             "cannot read results file {art}/results/unreadable/rows/a.csv: "
                             "Permission denied"),
}, marks=NOT_AS_ROOT)
cases({"run": COMMANDS["run"], "attack": COMMANDS["attack"], "bench": BENCH}, {
    "results folder is a file": (("--results-dir", "{good}"), 2,
                                 "Invalid value for '--results-dir': Directory '{good}' is a "
                                 "file"),
})
cases({"run": COMMANDS["run"]}, {
    "results folder under a file": (("--checkpoint", "{good}", "--results-dir",
                                     "{good}/results"), 1,
                                    "cannot create results folder {good}/results: Not a "
                                    "directory"),
})
cases({"report": COMMANDS["report"]}, {
    "output folder is a file": (("--out", "{good}"), 2,
                                "Invalid value for '--out': Directory '{good}' is a file"),
})
cases({"train": (*TRAIN[:-2], *BAGCERT)}, {
    "output is a folder": (("--output", "{tmp}"), 2,
                           "Invalid value for '--output': File '{tmp}' is a directory"),
})

# --- --device cuda on a machine without CUDA, and devices that do not exist ---------------
cases({command: COMMANDS[command] for command in ("run", "train", "attack", "bench")}, {
    "device cuda": (("--device", "cuda"), 2, CUDA_MISSING),
    "device cuda:1": (("--device", "cuda:1"), 2, "cuda:1 requested but CUDA is not available"),
}, marks=NO_CUDA)
cases({command: COMMANDS[command] for command in ("run", "train", "attack", "bench")}, {
    "device tpu": (("--device", "tpu"), 2,
                   "Invalid value for '--device': unknown device 'tpu'; use auto, cpu or "
                   "cuda[:N]"),
})

# --- defense parameters, other options ----------------------------------------------------
cases({"run": COMMANDS["run"], "train": COMMANDS["train"], "attack": COMMANDS["attack"]}, {
    "unknown parameter": (("--rf-size", "3"), 2,
                          "defense 'bagcert' has no parameter(s) ['rf_size']"),
    "bad parameter value": (("--rf", "abc"), 2, "parameter 'rf' expects int, got 'abc'"),
    "parameter without value": (("--rf",), 2, "option --rf needs a value"),
    "stray argument": (("stray",), 2, "unexpected argument 'stray'"),
})
cases({"run": COMMANDS["run"], "attack": COMMANDS["attack"]}, {
    "n-images 0": (("--n-images", "0"), 2, "Invalid value for '--n-images': 0 is not in the "
                                           "range x>=1"),
})
cases({"run": (*COMMANDS["run"], "--checkpoint", "{good}")}, {
    "unknown parameter next to --checkpoint": (("--rf-size", "3"), 2,
                                               "has no parameter(s) ['rf_size']"),
    "stray argument next to --checkpoint": (("stray",), 2, "unexpected argument 'stray'"),
})
cases({"train": COMMANDS["train"]}, {
    "epochs 0": (("--epochs", "0"), 2, "Invalid value for '--epochs': 0 is not in the range"),
    "train batch size 0": (("--train-batch-size", "0"), 2,
                           "Invalid value for '--train-batch-size'"),
})

# --- defense parameters that cannot work (on 28x28 images): refused before any training ---
# (``Defense.check`` and the defenses' own checks; the short recipe keeps the old code, which
# trained and certified these, quick to fail)
SHORT = ("--dataset", "synthetic", "--epochs", "1", "--max-train-images", "16")


SWEPT = "one ablation size of a sweep too large"  # run and bench take lists, train does not


def invalid(option: str, message: str) -> str:
    return f"Invalid value for '--{option}': {message}"


IMPOSSIBLE = {  # case -> (defense and parameters, message)
    "column ablation of the image width": (
        ("ds-column", "--ablation-size", "28"),
        invalid("ablation-size", "ablation_size 28 covers the whole width of the 28x28 images: "
                                 "ds-column needs ablation_size < 28")),
    "row ablation beyond the image height": (
        ("ds-row", "--ablation-size", "40"),
        invalid("ablation-size", "ablation_size 40 covers the whole height of the 28x28 images: "
                                 "ds-row needs ablation_size < 28")),
    "block ablation of the image side": (
        ("ds-block", "--ablation-size", "28"),
        invalid("ablation-size", "ablation_size 28 covers the whole height of the 28x28 images: "
                                 "ds-block needs ablation_size < 28")),
    SWEPT: (
        ("ds-column", "--ablation-size", "4,30"),
        invalid("ablation-size", "ablation_size 30 covers the whole width")),
    "ablation size 0": (("ds-column", "--ablation-size", "0"),
                        invalid("ablation-size", "ablation_size must be at least 1, got 0")),
    "smoothing width 0": (("ds-column", "--width", "0"),
                          invalid("width", "width must be at least 1, got 0")),
    "receptive field of the image side": (
        ("bagcert", "--rf", "29"),
        invalid("rf", "rf 29 covers a whole side of the 28x28 images: bagcert needs rf < 28")),
    "receptive field without a score map": (
        ("bagcert", "--rf", "31", "--padding", "0"),
        invalid("rf", "rf 31 covers a whole side of the 28x28 images")),
    "receptive field not reachable": (
        ("bagcert", "--rf", "6"),
        invalid("rf", "receptive field 6 is not reachable at stride 1: use an odd value")),
    "bagcert width 0": (("bagcert", "--width", "0"),
                        invalid("width", "width must be at least 1, got 0")),
    "bagcert width negative": (("bagcert", "--width", "-4"),
                               invalid("width", "width must be at least 1, got -4")),
    "bagcert padding negative": (("bagcert", "--padding", "-1"),
                                 invalid("padding", "padding must be >= 0, got -1")),
    "bagcert depth negative": (("bagcert", "--blocks-1x1", "-1"),
                               invalid("blocks-1x1", "blocks_1x1 must be >= 0, got -1")),
    "bagcert stride not a power of two": (("bagcert", "--stride", "3"),
                                          invalid("stride", "stride must be a power of two")),
    "bagcert stride 0": (("bagcert", "--stride", "0"),
                         invalid("stride", "stride must be a power of two, got 0")),
    "bagcert training patches larger than the images": (
        ("bagcert", "--patch-min", "29", "--patch-max", "30"),
        invalid("patch-min", "patch_min 29 does not fit in the 28x28 images")),
    "patchcleanser without masks": (
        ("patchcleanser", "--masks-per-axis", "0"),
        invalid("masks-per-axis", "masks_per_axis must be at least 2, got 0")),
    "patchcleanser one mask of the whole image": (
        ("patchcleanser", "--masks-per-axis", "1"),
        invalid("masks-per-axis", "masks_per_axis must be at least 2, got 1: a single mask per "
                                  "axis covers the whole image")),
    "patchcleanser training on one mask": (
        ("patchcleanser", "--train-masks-per-axis", "1"),
        invalid("train-masks-per-axis", "train_masks_per_axis must be at least 2, got 1")),
    "patchcleanser width 0": (("patchcleanser", "--width", "0"),
                              invalid("width", "width must be at least 1, got 0")),
    "patchcleanser training patches larger than the images": (
        ("patchcleanser", "--train-patch-min", "29", "--train-patch-max", "30"),
        invalid("train-patch-min", "train_patch_min 29 does not fit in the 28x28 images")),
}
cases({"run": (*RUN, *SHORT, "--patch", "2x2", "--defense"),
       "bench": (*BENCH[:1], *BENCH[3:], "--shape", "fashion-mnist", "--defense")},
      {name: (args, 2, message) for name, (args, message) in IMPOSSIBLE.items()})
cases({"train": (*TRAIN, "--dataset", "synthetic", "--defense")},
      {name: (args, 2, message) for name, (args, message) in IMPOSSIBLE.items()
       if name != SWEPT})

# --- Ctrl-C: exit 130, one line (the real signal on a real sweep: test_resume.py) --------
INTERRUPTED = "Interrupted: finished results are kept."
BAD_INPUT.update({
    "run: Ctrl-C": Bad((*COMMANDS["run"], "--checkpoint", "{good}"), 130, INTERRUPTED,
                       "patchbench.running.sweep.certify_split"),
    "train: Ctrl-C": pytest.param(  # a training run to interrupt: in the full suite only
        Bad(COMMANDS["train"], 130, INTERRUPTED, "patchbench.running.train.train"),
        marks=pytest.mark.slow),
    "attack: Ctrl-C": Bad(COMMANDS["attack"], 130, INTERRUPTED,
                          "patchbench.running.attacking.attack_split"),
    "bench: Ctrl-C": Bad(COMMANDS["bench"], 130, INTERRUPTED, "patchbench.running.bench.run_bench"),
    "report: Ctrl-C": Bad(COMMANDS["report"], 130, INTERRUPTED, "patchbench.cli.build_report"),
    "select: Ctrl-C": Bad(COMMANDS["select"], 130, INTERRUPTED, "patchbench.cli.select_setting"),
})


# --- artefacts: data folders and results folders, good and bad ----------------------------

GOOD_ROWS = ("defense,dataset,split,patch,patch_h,patch_w,condition,n_images,clean_accuracy,"
             "certified_accuracy,params,param_threshold\n"
             'ds-column,synthetic,val,5x5,5,5,tight,8,0.5,0.25,"{""threshold"": 0.1}",0.1\n'
             'ds-column,synthetic,val,5x5,5,5,tight,8,0.5,0.375,"{""threshold"": 0.2}",0.2\n')


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fashion_mnist(folder: Path, size: int) -> None:
    folder.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", np.zeros((16, size, size)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.zeros(16))


def results(folder: Path, rows: str | None = None) -> Path:
    (folder / "rows").mkdir(parents=True)
    if rows is not None:
        (folder / "rows" / "a.csv").write_text(rows)
    return folder / "rows" / "a.csv"


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints
              ) -> dict[str, str]:
    """The placeholders of the table but {tmp}: data folders, results folders, checkpoints."""
    art = tmp_path_factory.mktemp("artefacts")
    fashion_mnist(art / "fashion-mnist", 28)
    fashion_mnist(art / "fashion-mnist-32x32", 32)
    (art / "fashion-mnist-garbage").mkdir()
    for prefix in ("train", "t10k"):
        for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
            (art / "fashion-mnist-garbage" / name).write_bytes(b"garbage, not IDX")
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in ("cifar10", "cifar10-garbage", "cifar10-empty"):
        (art / name / "cifar-10-batches-py").mkdir(parents=True)
    for batch in batches:
        (art / "cifar10-garbage" / "cifar-10-batches-py" / batch).write_bytes(b"garbage")
        with open(art / "cifar10" / "cifar-10-batches-py" / batch, "wb") as fh:
            pickle.dump({"data": np.zeros((16, 3072), np.uint8), "labels": [0] * 16}, fh)
    for split in ("train", "val"):
        (art / "imagenet-empty" / split).mkdir(parents=True)

    found = art / "results"
    results(found / "good", GOOD_ROWS)
    (found / "empty").mkdir()
    results(found / "empty-rows")
    results(found / "folder").mkdir()
    results(found / "link").symlink_to(art / "nowhere.csv")
    results(found / "garbage", 'a,b\n1,2,3,4\n"unclosed\n')
    results(found / "empty-file", "")
    results(found / "columns", "defense,patch\nds-column,5x5\n")
    results(found / "text", GOOD_ROWS.replace("0.375", "lots"))
    results(found / "unreadable", GOOD_ROWS).chmod(0)

    os.mkfifo(art / "fifo.pt")  # never opened: refused from its file type
    (art / "empty.pt").write_bytes(b"")
    (art / "text.pt").write_text("weights: none\n")
    torch.save({"weight": torch.zeros(2)}, art / "state-dict.pt")
    return {"art": str(art), "good": str(checkpoints.good),
            "truncated": str(checkpoints.truncated),
            "tampered_weights": str(checkpoints.tampered_weights),
            "tampered_meta": str(checkpoints.tampered_meta)}


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default ``--results-dir results`` must land in the test's folder, never the repo."""
    monkeypatch.chdir(tmp_path)


def written_files(tmp_path: Path, cache: Path) -> list[Path]:
    return [p for p in (*tmp_path.rglob("*"), *cache.rglob("*")) if p.is_file()]


@pytest.mark.parametrize("case", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line_and_the_right_exit_code(case: Bad, artefacts: dict[str, str],
                                                       tmp_path: Path, isolated_cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fill = {**artefacts, "tmp": str(tmp_path)}
    if case.interrupt:
        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(case.interrupt, interrupt)
    result = invoke(*(arg.format(**fill) for arg in case.args))
    assert_clean_exit(result, case.code)
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith("Interrupted: " if case.code == 130 else "Error: "), result.stderr
    assert case.fragment.format(**fill) in last, result.stderr
    assert not written_files(tmp_path, isolated_cache)  # no results, report or checkpoint
    if case.code != 130:  # an interrupted run has created its (empty) results folders
        assert not (tmp_path / "results").exists() and not (tmp_path / "reports").exists()


def test_the_table_covers_every_case_of_the_issue_for_each_command() -> None:
    issue = {  # case -> the commands it applies to
        "patch 5x": {"run", "attack", "select"},
        "patch larger than the images": {"run", "attack"},
        "unknown defense": {"run", "train", "attack", "bench", "report", "select"},
        "unknown dataset": {"run", "train", "attack", "report"},
        "unknown condition": {"run", "select"},
        "unknown backend": {"run"},
        "fashion-mnist missing": {"run", "train", "attack"},
        "cifar10 missing": {"run", "train", "attack"},
        "fashion-mnist garbage": {"run", "train", "attack"},
        "cifar10 garbage": {"run", "train", "attack"},
        "checkpoint missing": {"run", "attack"},
        "checkpoint truncated": {"run", "attack"},
        "checkpoint weights altered": {"run", "attack"},
        "checkpoint of another defense": {"run", "attack"},
        "checkpoint of another dataset (fashion-mnist)": {"run", "attack"},
        "checkpoint of another dataset (cifar10)": {"run", "attack"},
        "results folder empty": {"report", "select"},
        "rows file is a folder": {"report", "select"},
        "rows file is garbage": {"report", "select"},
        "device cuda": {"run", "train", "attack", "bench"},
        "Ctrl-C": {"run", "train", "attack", "bench", "report", "select"},
        # parameters that cannot work, checkpoints that are no checkpoint file, --defense
        "column ablation of the image width": {"run", "train", "bench"},
        "block ablation of the image side": {"run", "train", "bench"},
        "receptive field of the image side": {"run", "train", "bench"},
        "smoothing width 0": {"run", "train", "bench"},
        "bagcert width 0": {"run", "train", "bench"},
        "patchcleanser one mask of the whole image": {"run", "train", "bench"},
        "checkpoint is /dev/null": {"run", "attack"},
        "neither defense nor checkpoint": {"run", "attack"},
    }
    missing = [f"{command}: {case}" for case, commands in issue.items() for command in commands
               if f"{command}: {case}" not in BAD_INPUT]
    assert not missing


@pytest.mark.slow
@pytest.mark.parametrize(("args", "code", "fragment"), [
    (("run", "--defense", "bagcert", "--dataset", "synthetic", "--patch", "5x"), 2,
     "malformed patch shape '5x'"),
    (("train", "--defense", "nope", *TINY), 2, "unknown defense 'nope'"),
    (("run", "--defense", "bagcert", "--dataset", "fashion-mnist", "--data-dir", "nowhere",
      "--patch", "2x2"), 1, "Fashion-MNIST IDX files not found in nowhere"),
], ids=["usage error", "unknown defense", "user error"])
def test_a_real_process_exits_cleanly(args: tuple[str, ...], code: int, fragment: str,
                                      tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "patchbench", *args], cwd=tmp_path,
                         env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith("Error: ") and fragment in last, out.stderr
    assert not list(tmp_path.iterdir())


# --- run --checkpoint without --defense: what the checkpoint holds --------------------------

def test_run_takes_the_defense_dataset_and_parameters_of_its_checkpoint(
        artefacts: dict[str, str], checkpoints: Checkpoints, tmp_path: Path) -> None:
    result = invoke("run", "--checkpoint", artefacts["good"], "--patch", "2x2", "--n-images",
                    "8", "--device", "cpu")
    assert_clean_exit(result, 0)
    rows = pd.concat(pd.read_csv(p) for p in (tmp_path / "results" / "rows").glob("*.csv"))
    assert set(rows["defense"]) == {"bagcert"} and set(rows["dataset"]) == {"synthetic"}
    assert set(rows["param_rf"]) == {5} and set(rows["param_width"]) == {4}  # as trained
    assert set(rows["checkpoint_sha256"]) == {checkpoints.sha256}
    # the same cell as with --defense and --dataset given
    again = invoke("run", "--defense", "bagcert", "--dataset", "synthetic", "--checkpoint",
                   artefacts["good"], "--patch", "2x2", "--n-images", "8", "--device", "cpu")
    assert_clean_exit(again, 0)
    assert "(1 cells: 0 computed, 1 skipped, 0 failed)" in again.stderr


# --- Defense.check through the Python API ---------------------------------------------------

def test_the_sweep_refuses_an_impossible_configuration_before_any_work(tmp_path: Path) -> None:
    from patchbench.running.sweep import SweepError, run_sweep

    with pytest.raises(SweepError, match="ablation_size 28 covers the whole width of the "
                                         "28x28 images") as refused:
        run_sweep("ds-column", "2x2", "synthetic", {"ablation_size": [4, 28]}, n_images=8,
                  results_dir=tmp_path / "results", device="cpu", show_progress=False)
    assert refused.value.option == "--ablation-size"
    assert not (tmp_path / "results").exists()


# --- Ctrl-C while the program starts (before any command runs): 130, one line -----------------
STARTING = "Interrupted while starting: nothing was run."
RUN_ARGS = ("run", "--defense", "bagcert", "--dataset", "synthetic", "--patch", "2x2",
            "--device", "cpu")
# The child stops in its first import of torch (a finder on sys.meta_path that waits there)
# after creating a marker file: the SIGINT then lands inside the imports, however loaded the
# machine is. It runs the console entry point the way the generated script does, or -m.
STALL_IN_TORCH_IMPORT = r"""
import importlib, runpy, sys, time

class StallInTorchImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            open(MARKER, "w").close()
            time.sleep(300)
        return None

MARKER, ENTRY = sys.argv[1:3]
sys.argv = ["patchbench", *sys.argv[3:]]
sys.meta_path.insert(0, StallInTorchImport())
if ENTRY == "-m":
    runpy.run_module("patchbench", run_name="__main__", alter_sys=True)
else:
    module, _, function = ENTRY.partition(":")
    sys.exit(getattr(importlib.import_module(module), function)())
"""


def console_entry_point() -> str:
    """``[project.scripts] patchbench`` of pyproject.toml (what ``pip install`` makes the
    ``patchbench`` script call), or of the installed metadata before Python 3.11."""
    try:
        import tomllib
    except ModuleNotFoundError:
        (entry,) = importlib.metadata.entry_points(group="console_scripts", name="patchbench")
        return entry.value
    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["scripts"]["patchbench"]


def interrupt(command: list[str], ready, tmp_path: Path) -> subprocess.CompletedProcess:
    """Start ``command``, send SIGINT once ``ready()`` holds, and wait for the exit."""
    # SIGINT as in a terminal, even where the suite runs in the background (which ignores it)
    child = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "COLUMNS": "200"},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not ready(child):
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                out, err = child.communicate()
                pytest.fail(f"not interrupted while importing (exit {child.returncode}): "
                            f"{out}{err}")
            time.sleep(0.01)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    return subprocess.CompletedProcess(command, child.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["console script", "-m"])
def test_ctrl_c_during_the_imports_exits_130_with_one_line(entry: str, tmp_path: Path) -> None:
    marker = tmp_path / "importing-torch"
    target = console_entry_point() if entry == "console script" else "-m"
    done = interrupt([sys.executable, "-c", STALL_IN_TORCH_IMPORT, str(marker), target,
                      *RUN_ARGS], lambda child: marker.exists(), tmp_path)
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines() == [STARTING] and done.stdout == ""
    assert sorted(tmp_path.iterdir()) == [marker]  # nothing else written


def torch_is_loading(child: subprocess.Popen) -> bool:
    """The child has mapped a file of torch's: its imports are under way (seconds of them)."""
    try:
        return f"{os.sep}torch{os.sep}" in Path(f"/proc/{child.pid}/maps").read_text()
    except OSError:  # exited meanwhile
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_ctrl_c_during_the_real_imports_of_the_installed_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("patchbench")
    if not script.is_file():
        pytest.skip(f"no console script {script}")
    module = console_entry_point().partition(":")[0]
    if f"from {module} import" not in script.read_text():
        pytest.skip(f"{script} predates pyproject.toml's entry point: pip install -e .")
    done = interrupt([str(script), *RUN_ARGS], torch_is_loading, tmp_path)
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines() == [STARTING] and done.stdout == ""
    assert not list(tmp_path.iterdir())


def test_a_command_hands_ctrl_c_back_to_its_own_handling() -> None:
    """The start-up handler exits at once; inside a command, Ctrl-C must raise
    KeyboardInterrupt again, so that the command keeps finished results and exits 130."""
    from patchbench.__main__ import _interrupted_while_starting

    previous = signal.signal(signal.SIGINT, _interrupted_while_starting)
    try:
        result = invoke("defenses")
        handler = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert_clean_exit(result, 0)
    assert handler is signal.default_int_handler
