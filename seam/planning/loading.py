"""Reading what planning decides from: device profiles (checked to describe one artifact), a device's cached
profile, and ``seam analyze`` results. Called by the UE's CLI, the profiler's commands and the benchmarks."""

from __future__ import annotations

import json
import math
from pathlib import Path

from seam.planning.cost_model import DeviceModel, check_pair
from seam.planning.policy import QualityBudget
from seam.planning.schema import DeviceProfile, ProfileKey, load
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.ort_options import PROVIDERS, default_threads


def profile_key(artifact: Artifact, device: str, threads: int, variant: str) -> ProfileKey:
    """The key a profile of ``artifact`` measured on ``device`` with ``threads`` and block ``variant`` has."""
    return ProfileKey(artifact.manifest.artifact_fingerprint, device, PROVIDERS[device], threads, variant)


def cached_profile(artifact: Artifact, threads: int | None, variant: str | None = None,
                   device: str = "cpu") -> Path | None:
    """This device's cached ``seam profile`` of ``artifact`` at ``threads`` with ``variant`` blocks on ``device``,
    or None."""
    key = profile_key(artifact, device, threads or default_threads(), variant or artifact.manifest.dtype)
    cached = artifact.root / "profiles" / key.file_name()
    return cached if cached.is_file() else None


def device_models(artifact: Artifact, ue_path: Path, edge_path: Path,
                  ue_slowdown: float = 1.0) -> tuple[DeviceModel, DeviceModel]:
    """The UE's and the edge's cost models from their profiles, checked to describe ``artifact``."""
    ue_profile, edge_profile = (load(path, DeviceProfile) for path in (ue_path, edge_path))
    ue, edge = DeviceModel.from_profile(ue_profile.slowed(ue_slowdown)), DeviceModel.from_profile(edge_profile)
    check_pair(ue, edge)
    if ue.key.artifact_fingerprint != artifact.manifest.artifact_fingerprint:
        raise SeamError(f"the profiles were measured with another artifact than {artifact.root}; profile it again")
    return ue, edge


def read_cells(path: Path) -> list[dict]:
    """The cells of a ``seam analyze`` result, checked to hold codec results a ``QualityBudget`` can read."""
    try:
        cells = json.loads(path.read_text())["cells"]
        QualityBudget.from_analysis(cells, math.inf)
        return cells
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise SeamError(f"cannot read the quality analysis {path} ({type(error).__name__}: {error}); "
                        "write it with seam analyze") from None


def read_analysis(path: Path, max_increase_pct: float = math.inf) -> QualityBudget:
    """The codec cells of a ``seam analyze`` result as a ``QualityBudget``."""
    return QualityBudget.from_analysis(read_cells(path), max_increase_pct)
