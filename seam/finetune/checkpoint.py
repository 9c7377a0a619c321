"""Checkpoints of a training run: each part's adapters and optimizer state (safetensors: both sides of a split run,
or one node's stage of a pipeline), the losses so far and the settings that must not change (JSON), written whole
or not at all; ``--resume`` carries on from one.
The data order is seeded, so a resumed run skips the batches already trained on and continues exactly as an
uninterrupted run would."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seam.runtime.errors import SeamError
from seam.runtime.files import write_directory_atomically


@dataclass
class Checkpoint:
    step: int
    losses: list[float]
    parts: dict[str, dict[str, np.ndarray]]  # each part's training state by its name: "ue" and "edge", or a stage's


def save_checkpoint(directory: Path, settings: dict, checkpoint: Checkpoint) -> Path:
    from safetensors.numpy import save_file

    def write(staging: Path) -> None:
        for name, state in checkpoint.parts.items():
            save_file(state, str(staging / f"{name}.safetensors"))
        (staging / "run.json").write_text(json.dumps(
            {"settings": settings, "step": checkpoint.step, "losses": checkpoint.losses, "parts": list(checkpoint.parts)},
            indent=1) + "\n")

    return write_directory_atomically(directory, write)


def load_checkpoint(directory: Path, settings: dict) -> Checkpoint:
    from safetensors.numpy import load_file

    try:
        run = json.loads((directory / "run.json").read_text())
        # Before pipelines, a checkpoint held the two sides of a split run and did not list its parts.
        parts = {str(name): load_file(str(directory / f"{name}.safetensors")) for name in run.get("parts", ["ue", "edge"])}
        saved, step, losses = run["settings"], int(run["step"]), [float(loss) for loss in run["losses"]]
    except FileNotFoundError:
        raise SeamError(f"no checkpoint at {directory}; run without --resume, with --checkpoint-every") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SeamError(f"cannot read the checkpoint at {directory} ({type(error).__name__}: {error}); run again "
                        "without --resume") from None
    for name, value in settings.items():
        if saved.get(name) != value:
            raise SeamError(f"the checkpoint was written with {name} {saved.get(name)!r}, this run has {value!r}; "
                            "resume with the settings it was written with")
    return Checkpoint(step, losses, parts)
