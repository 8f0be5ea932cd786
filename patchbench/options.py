"""Click option types shared by every command: patch lists, devices, defense parameters."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import click
import torch

from patchbench.patches import PatchShape, parse_patches


class PatchListType(click.ParamType):
    """``5x5,2x12``: a comma list of HxW shapes; the option may also be repeated."""

    name = "HxW[,HxW...]"

    def convert(self, value, param, ctx) -> list[PatchShape]:
        if isinstance(value, list):
            return value
        try:
            return parse_patches(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class CheckpointPath(click.Path):
    """A checkpoint file: missing is left to the loader (which says so), but an existing path
    that is no regular file (a folder, ``/dev/null``, a pipe) is refused here."""

    KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))

    def __init__(self) -> None:
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value, param, ctx) -> Path:
        path = super().convert(value, param, ctx)
        try:
            mode = os.stat(path).st_mode
        except OSError:  # missing (or unreadable): the loader names the problem
            return path
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in self.KINDS if test(mode)), "not a regular file")
            self.fail(f"File {str(path)!r} is not a checkpoint file: it is {kind}", param, ctx)
        return path


class DeviceType(click.ParamType):
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda[:N]``."""

    name = "auto|cpu|cuda[:N]"

    def convert(self, value, param, ctx) -> torch.device:
        if isinstance(value, torch.device):
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if text == "cpu":
            return torch.device("cpu")
        if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
            if not torch.cuda.is_available():
                self.fail(f"{text} requested but CUDA is not available on this machine", param,
                          ctx)
            index = int(text[5:]) if ":" in text else 0
            if index >= torch.cuda.device_count():
                self.fail(f"{text} requested but only {torch.cuda.device_count()} CUDA "
                          "device(s) exist", param, ctx)
            return torch.device("cuda", index)
        self.fail(f"unknown device {value!r}; use auto, cpu or cuda[:N]", param, ctx)


def flatten_patches(values: tuple[list[PatchShape], ...]) -> list[PatchShape]:
    """Merge the lists of a repeated ``--patch`` option, dropping duplicates."""
    merged: list[PatchShape] = []
    for shapes in values:
        merged.extend(s for s in shapes if s not in merged)
    return merged


def parse_extra_params(args: list[str]) -> dict[str, str]:
    """``--rf 7 --ablation-size=4`` -> {'rf': '7', 'ablation_size': '4'} (strings)."""
    params: dict[str, str] = {}
    rest = list(args)
    while rest:
        token = rest.pop(0)
        if not token.startswith("--") or token == "--":
            raise click.UsageError(f"unexpected argument {token!r}")
        key, _, value = token[2:].partition("=")
        if not _:
            if not rest or rest[0].startswith("--"):
                raise click.UsageError(f"option --{key} needs a value")
            value = rest.pop(0)
        params[key.replace("-", "_")] = value
    return params
