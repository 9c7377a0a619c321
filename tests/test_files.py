"""Files Seam writes take the modes the user's umask gives any new file; only key files are private."""

from __future__ import annotations

import os
import stat

import pytest

from conftest import run_seam
from seam.runtime.files import write_atomically, write_directory_atomically


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_written_files_and_directories_follow_the_umask(tmp_path, umask):
    path = write_atomically(tmp_path / "profile.json", lambda out: out.write("{}"))
    directory = write_directory_atomically(tmp_path / "adapter", lambda staging: (staging / "w").write_text("x"))
    assert mode(path) == 0o666 & ~umask
    assert mode(directory) == 0o777 & ~umask


def test_commands_write_shareable_files_and_private_keys(tmp_path, umask):
    assert run_seam("traces", str(tmp_path / "traces")).returncode == 0
    assert {mode(path) for path in (tmp_path / "traces").iterdir()} == {0o666 & ~umask}
    assert run_seam("keys", str(tmp_path / "keys"), "--name", "ue").returncode == 0
    assert mode(tmp_path / "keys" / "ue.key_secret") == 0o600
