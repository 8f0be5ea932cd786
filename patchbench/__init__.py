"""patchbench: certified defenses against adversarial patches, benchmarked side by side.

Data flows one way: dataset -> defense (model, votes, footprints) -> certification core
-> results -> report. The top-level modules are the plugin API and the certification core
(``defense``, ``certify``, ``footprints``, ``patches``: all a defense imports); ``running``
trains, certifies, attacks, times and runs studies; ``reporting`` turns results into the
report; ``cli`` is the command line over both.

The names below are imported on first use: ``import patchbench`` stays cheap (no torch), so
that the console entry point (``patchbench.__main__``) can handle Ctrl-C before the heavy
imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from patchbench.certify import Certificate, certify_votes
    from patchbench.defense import Defense, available_defenses, get_defense, register_defense
    from patchbench.footprints import Footprints
    from patchbench.patches import PatchShape, parse_patches
    from patchbench.reporting.report import build_report
    from patchbench.running.attacking import plan_attack, run_attack
    from patchbench.running.results import load_results
    from patchbench.running.study import run_study
    from patchbench.running.study_file import load_study
    from patchbench.running.sweep import SweepError, run_sweep
    from patchbench.running.zoo import load_model, zoo_models

__version__ = "0.1.0"

_HOMES = {  # name -> the module that defines it
    "Certificate": "certify", "certify_votes": "certify", "Defense": "defense",
    "available_defenses": "defense", "get_defense": "defense",
    "register_defense": "defense", "Footprints": "footprints",
    "PatchShape": "patches", "parse_patches": "patches",
    "build_report": "reporting.report", "load_results": "running.results",
    "SweepError": "running.sweep", "run_sweep": "running.sweep",
    "plan_attack": "running.attacking", "run_attack": "running.attacking",
    "load_study": "running.study_file", "run_study": "running.study",
    "load_model": "running.zoo", "zoo_models": "running.zoo",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'patchbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"patchbench.{_HOMES[name]}"), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})

__all__ = [
    "Certificate",
    "Defense",
    "Footprints",
    "PatchShape",
    "SweepError",
    "available_defenses",
    "build_report",
    "certify_votes",
    "get_defense",
    "load_model",
    "load_results",
    "load_study",
    "parse_patches",
    "plan_attack",
    "register_defense",
    "run_attack",
    "run_study",
    "run_sweep",
    "zoo_models",
]
