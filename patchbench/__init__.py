"""patchbench: certified defenses against adversarial patches, benchmarked side by side.

Data flows one way: dataset -> defense (model, votes, footprints) -> certification core
-> results -> report.
"""

from patchbench.certify import Certificate, certify_votes
from patchbench.defense import Defense, available_defenses, get_defense
from patchbench.footprints import Footprints
from patchbench.patches import PatchShape, parse_patches
from patchbench.report import build_report
from patchbench.results import load_results
from patchbench.sweep import SweepError, run_sweep

__version__ = "0.1.0"

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
    "load_results",
    "parse_patches",
    "run_sweep",
]
