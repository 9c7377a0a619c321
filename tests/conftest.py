"""Shared fixtures: an isolated SEAM_HOME, offline hub access, and tiny exported artifacts per family."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Set before any Seam or transformers import reads them.
os.environ.setdefault("SEAM_HOME", tempfile.mkdtemp(prefix="seam-test-home-"))
os.environ["HF_HUB_OFFLINE"] = "1"

TINY_PRESETS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gpt2"]


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def exported(artifacts_root):
    """Exports a tiny preset at every cut (once per session) and returns its artifact directory."""
    from seam.export.exporter import ExportRequest, export

    cache: dict[tuple[str, str | None], Path] = {}

    def get(preset: str, kv_layout: str | None = None) -> Path:
        """``kv_layout`` None: the family's own (a llama's shared buffers)."""
        if (preset, kv_layout) not in cache:
            out = artifacts_root / (preset if kv_layout is None else f"{preset}-{kv_layout}")
            export(ExportRequest(model=preset, out=out, quiet=True, kv_layout=kv_layout))
            cache[preset, kv_layout] = out
        return cache[preset, kv_layout]

    return get


def run_seam(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the real ``seam`` CLI in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "seam.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture
def shaped_link():
    """The edge's own network namespace behind a veth pair shaped with tc; skipped where that cannot be built."""
    from shaping import ShapedLink, available

    reason = available()
    if reason:
        pytest.skip(reason)
    link = ShapedLink()
    try:
        yield link
    finally:
        link.close()


REAL_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def real_model(artifacts_root):
    """The packaged real instruct model, exported once per session at three cuts; skipped where its package is
    not installed (``make test`` installs it)."""
    from seam.export.exporter import ExportRequest, export
    from seam.export.packaged import packaged_file
    from seam.runtime.errors import SeamError

    try:
        packaged_file(REAL_MODEL)
    except SeamError as error:
        pytest.skip(str(error))
    out = artifacts_root / REAL_MODEL
    export(ExportRequest(model=REAL_MODEL, out=out, cuts="5,15,25", quiet=True))
    return out


@pytest.fixture(scope="session")
def served_model(request, exported):
    """The real model when its package is installed, else tiny-llama (whose text is noise, but whose tokens are
    as checkable): what the HTTP endpoint's tests serve."""
    try:
        return request.getfixturevalue("real_model")
    except pytest.skip.Exception:
        return exported("tiny-llama")
