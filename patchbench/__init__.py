"""patchbench: certified defenses against adversarial patches, benchmarked side by side.

Data flows one way: dataset -> defense (model, votes, footprints) -> certification core
-> results -> report.

The names below are imported on first use: ``import patchbench`` stays cheap (no torch), so
that the console entry point (``patchbench.__main__``) can handle Ctrl-C before the heavy
imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from patchbench.certify import Certificate, certify_votes
    from patchbench.defense import Defense, available_defenses, get_defense
    from patchbench.footprints import Footprints
    from patchbench.patches import PatchShape, parse_patches
    from patchbench.report import build_report
    from patchbench.results import load_results
    from patchbench.sweep import SweepError, run_sweep
    from patchbench.zoo import load_model, zoo_models

__version__ = "0.1.0"

_HOMES = {  # name -> the module that defines it
    "Certificate": "certify", "certify_votes": "certify", "Defense": "defense",
    "available_defenses": "defense", "get_defense": "defense", "Footprints": "footprints",
    "PatchShape": "patches", "parse_patches": "patches", "build_report": "report",
    "load_results": "results", "SweepError": "sweep", "run_sweep": "sweep",
    "load_model": "zoo", "zoo_models": "zoo",
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
    "parse_patches",
    "run_sweep",
    "zoo_models",
]
