"""Atomic file writes: write beside the target, fsync, rename; a crash leaves no half file.

A writer killed outright (SIGKILL, power loss) may leave its temporary file behind. The temp
file's name holds the writer's process id and host, so the next write of the same target
removes the temp files of writers on this host that no longer run (never those of a live
concurrent writer).
"""

from __future__ import annotations

import glob
import os
import platform
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", platform.node()) or "host"


def _running(pid: int) -> bool:
    if os.name != "posix":  # no cheap liveness check elsewhere: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Delete temp files for ``path`` left by writers on this host that no longer run."""
    prefix, host, removed = f".{path.name}.", _host(), []
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid, _, rest = tmp.name[len(prefix):].partition("@")
        if pid.isdigit() and rest.split(".")[0] == host and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``.

    Raises OSError when the folder cannot be created or written (callers turn it into
    their own one-line error).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}@{_host()}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
