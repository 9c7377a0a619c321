"""Every flag of every command refuses nonsense before anything starts, and the waits and limits a user sets mean
what they say: a total timeout, a split or a length the artifact cannot serve refused before any traffic."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import pytest

from conftest import run_seam


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, each subcommand of ``seam`` on its own."""
    from seam.cli import build_parser
    from seam.edge_server.cli import build_parser as edge_server_parser
    from seam.finetune.cli import build_parser as train_parser
    from seam.ue_client.cli import build_parser as ue_client_parser

    found = {"edge_server": edge_server_parser(), "ue_client": ue_client_parser(), "ue_client train": train_parser()}
    seam = build_parser()
    for action in seam._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update({f"seam {name}": parser for name, parser in action.choices.items()})
    return found


def test_every_numeric_flag_of_every_command_has_bounds():
    unbounded = [f"{command} {action.option_strings[0] if action.option_strings else action.dest}"
                 for command, parser in parsers().items() for action in parser._actions if action.type in (int, float)]
    assert not unbounded, f"numeric flags without bounds (use seam.runtime.shell.number): {unbounded}"


def command(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("flags, fragment", [
    (["--bind", "tcp://127.0.0.1:99999"], "no TCP port"),
    (["--bind", "udp://127.0.0.1:5555"], "must look like tcp://HOST:PORT"),
    (["--max-sessions", "0"], "at least 1"),
    (["--threads", "-1"], "at least 1"),
    (["--memory-budget-mb", "nan"], "above 0"),
    (["--idle-timeout", "0"], "above 0"),
])
def test_edge_server_refuses_nonsense_before_loading(tmp_path, flags, fragment):
    result = command("-m", "seam.edge_server.cli", str(tmp_path / "no-artifact"), *flags)
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert "listening" not in result.stderr


def ue_client(artifact, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return command("-m", "seam.ue_client.cli", str(artifact), "--prompt", "hello", *flags, timeout=timeout)


@pytest.mark.parametrize("flags, fragment", [
    (["--timeout", "0"], "above 0"),
    (["--top-p", "1.5"], "at most 1"),
    (["--server", "tcp://127.0.0.1:0"], "no TCP port"),
    (["--server", "tcp://no-such-host.invalid:5555"], "does not resolve"),
    (["--split", "9"], "split 9 is not a split point"),
    (["--max-new-tokens", "600"], "beyond the model's context of 512"),
])
def test_ue_client_refuses_before_any_traffic(exported, flags, fragment):
    # Nothing listens on port 9: a check that waited for the network would time out instead.
    result = ue_client(exported("tiny-llama"), "--server", "tcp://127.0.0.1:9", "--timeout", "30", *flags)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and fragment in lines[-1], result.stderr
    assert "no reply" not in result.stderr


def test_the_timeout_is_the_whole_wait(exported):
    artifact = exported("tiny-llama")
    started = time.monotonic()
    result = ue_client(artifact, "--server", "tcp://127.0.0.1:9", "--timeout", "4")
    waited = time.monotonic() - started
    assert result.returncode == 2 and "within 4 s" in result.stderr, result.stderr
    # The handshake's retries once took 17 s here; the process's own start takes well under a second.
    assert waited < 4 + 3, f"--timeout 4 waited {waited:.1f} s in all"


def test_a_file_given_for_an_artifact_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("not an artifact")
    result = ue_client(tmp_path / "notes.txt")
    assert result.returncode == 2 and "is a file, not an artifact directory" in result.stderr, result.stderr


def test_plan_refuses_a_context_beyond_the_model(exported, tmp_path):
    result = run_seam("plan", str(exported("tiny-llama")), "--ue-profile", str(tmp_path / "ue.json"),
                      "--edge-profile", str(tmp_path / "edge.json"), "--bandwidth", "10", "--rtt", "5",
                      "--context", "100000")
    assert result.returncode == 2 and "beyond the model's context of 512" in result.stderr, result.stderr


@pytest.mark.parametrize("level, logged", [("info", True), ("warning", False)])
def test_the_edge_logs_at_the_level_asked(exported, level, logged):
    import io

    from seam.edge_server.process import edge_server
    from seam.ue_client.client import EdgeClient

    log = io.StringIO()
    with edge_server(exported("tiny-llama"), "--log-level", level, log=log) as (_, address):
        with EdgeClient(exported("tiny-llama"), address) as client, client.session(2) as session:
            list(session.generate([[4, 5, 6]], 2))
        time.sleep(0.5)  # the close line is written as the reply goes out
    assert ("open " in log.getvalue()) is logged, log.getvalue()


def test_progress_bars_stay_out_of_a_log_that_is_no_terminal(tmp_path):
    result = run_seam("export", "tiny-llama", "--out", str(tmp_path / "art"))
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "graph/s" not in result.stderr
