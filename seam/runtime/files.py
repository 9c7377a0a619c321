"""Writing files and directories so that a reader never sees half of one: a temporary file or directory beside
the target, then a rename.

The temporary file and directory are given the modes the user's umask gives any new file (``tempfile`` makes
them private), so that plots, profiles, adapters and artifacts can be shared as the user expects; only key files
are private, and ``transport.generate_keypair`` makes them so itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def seam_home() -> Path:
    """Where Seam keeps what it builds for itself: presets, joined graphs (``$SEAM_HOME``, ~/.cache/seam)."""
    return Path(os.environ.get("SEAM_HOME") or Path.home() / ".cache" / "seam")


def _umask() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o022)  # the portable way to read it sets it too, so set it straight back
    os.umask(current)
    return current


def staging_directory(out: Path) -> Path:
    """An empty directory beside ``out``, with the mode a new directory gets from the umask."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())
    return staging


def write_atomically(path: Path, write: Callable[[IO], object], binary: bool = False) -> Path:
    """Calls ``write`` with a file open beside ``path`` and renames it into place; on any failure the temporary
    file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb" if binary else "w") as out:
            write(out)
        os.chmod(scratch, 0o666 & ~_umask())
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
    return path


def replace_directory(staging: Path, out: Path) -> None:
    """Renames the finished ``staging`` directory to ``out``, moving an existing ``out`` aside first and removing
    it only once the new one is in place."""
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(retired / out.name)
        staging.rename(out)
        shutil.rmtree(retired)
    else:
        staging.rename(out)


def write_directory_atomically(out: Path, write: Callable[[Path], object]) -> Path:
    """Calls ``write`` with an empty directory beside ``out`` and puts it in place of ``out``; on any failure the
    temporary directory is removed and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_directory(out)
    try:
        write(staging)
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
