"""README's examples run as written, on a few images, so they cannot drift.

Every ``patchbench ...`` line of a ```bash block (but the set-up commands of the first one)
and every ```python block runs, in order, in a fresh folder holding a copy of README.md, with
this test's own checkpoint cache: so each uses the shipped models exactly as a new user's clone
would, and one that would train says so (the test fails on it unless it is a ``train``). A
block whose fence says ``sketch`` (```python sketch, ```bash sketch) is an outline with names
the reader fills in (a cluster address, a vote map of their own) and is not run. Sizes are cut
to a few images (``--n-images``), a few training images, one timing repeat, reports without a
gallery; README states the time of the examples as written (under a minute each on a 2-core
CPU).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchbench.cli import cli

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)
SMALL = {"run": {"--n-images": "4"}, "attack": {"--n-images": "2", "--steps": "2"},
         "train": {"--max-train-images": "256"},
         "bench": {"--repeats": "1", "--warmup": "0", "--batch-size": "4", "--n-shapes": "1"},
         "report": {"--gallery-images": "0"}}


def blocks(language: str) -> list[str]:
    """The runnable blocks of one language, in README order (not the set-up block)."""
    found = [(lang, info, body) for lang, info, body in FENCE.findall(
        (ROOT / "README.md").read_text())]
    return [body for index, (lang, info, body) in enumerate(found)
            if lang == language and "sketch" not in info and index > 0]


def commands() -> list[list[str]]:
    lines = []
    for body in blocks("bash"):
        joined = body.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("patchbench "):
                lines.append(shlex.split(line)[1:])
    return lines


def small(args: list[str]) -> list[str]:
    """The same command on a few images: the options of SMALL replaced or added."""
    out, rest = [], list(args)
    wanted = dict(SMALL.get(args[0], {}))
    while rest:
        token = rest.pop(0)
        if token in wanted and rest:
            rest.pop(0)
            out += [token, wanted.pop(token)]
        else:
            out.append(token)
    return out + [t for item in wanted.items() for t in item]


COMMANDS = commands()


def test_readme_has_the_examples_this_test_runs() -> None:
    verbs = {args[0] for args in COMMANDS}
    assert {"models", "run", "attack", "train", "bench", "report", "defenses",
            "study"} <= verbs
    assert len(blocks("python")) >= 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every example, in order, as a clone: README.md and the committed
    results (which ``report`` reads, with the cells the examples add)."""
    path = tmp_path_factory.mktemp("readme")
    shutil.copy(ROOT / "README.md", path / "README.md")
    shutil.copytree(ROOT / "results", path / "results")
    shutil.copytree(ROOT / "studies", path / "studies")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_each_readme_command_runs(args: list[str], folder: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)
    monkeypatch.setenv("PATCHBENCH_CACHE", str(folder / "cache"))
    result = CliRunner().invoke(cli, small(args))
    assert result.exit_code == 0, result.output
    if args[0] != "train":
        assert "trained first" not in result.stderr, "an example that trains"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_each_readme_python_block_runs(index: int, folder: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)
    monkeypatch.setenv("PATCHBENCH_CACHE", str(folder / "cache"))
    code = blocks("python")[index]
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {})
