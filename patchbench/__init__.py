"""patchbench: certified defenses against adversarial patches, benchmarked side by side.

Data flows one way: dataset -> defense (model, votes, footprints) -> certification core
-> results -> report.
"""

from patchbench.certify import Certificate, certify_votes
from patchbench.defense import Defense, available_defenses, get_defense
from patchbench.footprints import Footprints
from patchbench.patches import PatchShape, parse_patches

__version__ = "0.1.0"

__all__ = [
    "Certificate",
    "Defense",
    "Footprints",
    "PatchShape",
    "available_defenses",
    "certify_votes",
    "get_defense",
    "parse_patches",
]
