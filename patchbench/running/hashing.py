"""Short stable names for configurations: one hash, so that cells, models and benchmark runs
are named the same way on every machine."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def config_hash(config: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``config`` as canonical JSON (keys
    sorted): the same content gives the same name, whatever the order it was built in."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:length]
