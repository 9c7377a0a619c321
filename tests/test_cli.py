"""The seam CLI as a user runs it: bad input gets one clear line, exit code 2, and leaves nothing behind."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoConfig

from conftest import run_seam


def assert_refused(result, *fragments: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr}"
    assert lines[0].startswith("seam export: error:") or lines[0].startswith("seam validate: error:")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def workdir(tmp_path):
    """A directory that must stay exactly as the test left it."""
    yield tmp_path
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "partial output left behind"


def test_unknown_hub_id_offline(workdir):
    result = run_seam("export", "nobody/no-such-model", "--out", str(workdir / "out"))
    assert_refused(result, "cannot load model 'nobody/no-such-model'", "seam models")
    assert not (workdir / "out").exists()


def test_a_typo_of_a_preset_gets_a_suggestion_at_once(workdir):
    result = run_seam("export", "tiny-lama", "--out", str(workdir / "out"), timeout=60)
    assert_refused(result, "did you mean 'tiny-llama'?")
    assert not (workdir / "out").exists()


def test_missing_directory(workdir):
    result = run_seam("export", str(workdir / "missing" / "model"), "--out", str(workdir / "out"))
    assert_refused(result, "does not exist")


def test_unsupported_family(workdir):
    AutoConfig.for_model("bert", architectures=["BertForMaskedLM"]).save_pretrained(workdir / "bert")
    result = run_seam("export", str(workdir / "bert"), "--out", str(workdir / "out"))
    assert_refused(result, "'bert' is not a supported", "llama", "gpt2")
    assert not (workdir / "out").exists()


def test_non_causal_model(workdir):
    config = AutoConfig.for_model("llama", architectures=["LlamaForSequenceClassification"])
    config.save_pretrained(workdir / "classifier")
    result = run_seam("export", str(workdir / "classifier"), "--out", str(workdir / "out"))
    assert_refused(result, "not a causal language model")


@pytest.mark.parametrize(
    "cuts, message",
    [("0,2", "cut 0 is out of range"), ("2,9", "cut 9 is out of range"), ("3,1", "not in increasing order"),
     ("1,1", "lists a layer twice"), ("one", "comma-separated")],
)
def test_bad_cut_lists(workdir, cuts, message):
    result = run_seam("export", "tiny-llama", "--out", str(workdir / "out"), "--cuts", cuts)
    assert_refused(result, message)
    assert not (workdir / "out").exists()


def test_unwritable_output(workdir):
    (workdir / "plain-file").write_text("not a directory")
    result = run_seam("export", "tiny-llama", "--out", str(workdir / "plain-file" / "out"))
    assert_refused(result, "cannot write the artifact")


def test_existing_different_export_needs_force(exported, workdir):
    out = workdir / "art"
    shutil.copytree(exported("tiny-llama"), out)
    result = run_seam("export", "tiny-llama", "--out", str(out), "--cuts", "2")
    assert_refused(result, "--force")
    forced = run_seam("export", "tiny-llama", "--out", str(out), "--cuts", "2", "--force", "--quiet")
    assert forced.returncode == 0, forced.stderr
    assert '"cuts": [\n    2\n  ]' in (out / "manifest.json").read_text()


@pytest.mark.parametrize("foreign", ["thesis.txt", "profiles/cpu.json"])
def test_force_never_deletes_what_no_export_wrote(exported, workdir, foreign):
    out = workdir / "art"
    shutil.copytree(exported("tiny-llama"), out)
    (out / foreign).parent.mkdir(exist_ok=True)
    (out / foreign).write_text("the user's own")
    result = run_seam("export", "tiny-llama", "--out", str(out), "--cuts", "2", "--force", "--quiet")
    assert_refused(result, foreign.split("/")[0], "no export wrote")
    assert (out / foreign).read_text() == "the user's own"


def test_force_refuses_a_directory_that_is_no_artifact(workdir):
    (workdir / "notes").mkdir()
    (workdir / "notes" / "thesis.txt").write_text("the user's own")
    result = run_seam("export", "tiny-llama", "--out", str(workdir / "notes"), "--force", "--quiet")
    assert_refused(result, "not a Seam artifact", "thesis.txt")
    assert (workdir / "notes" / "thesis.txt").read_text() == "the user's own"


def test_validate_passes_and_detects_corruption(exported, workdir):
    out = workdir / "art"
    shutil.copytree(exported("tiny-gpt2"), out)
    result = run_seam("validate", str(out))
    assert result.returncode == 0, result.stderr
    assert "identical" in result.stdout and "OUTSIDE" not in result.stdout
    with open(out / "block_01.onnx", "ab") as handle:
        handle.write(b"\0")
    result = run_seam("validate", str(out))
    assert_refused(result, "block_01.onnx does not match its sha256")


def test_models_lists_presets_and_families():
    result = run_seam("models")
    assert result.returncode == 0, result.stderr
    for name in ["smollm2-135m-instruct (default)", "tiny-llama", "tiny-gpt2", "small-llama", "qwen2, qwen3", "gguf"]:
        assert name in result.stdout


def test_the_installed_commands_share_one_shell(exported, tmp_path):
    """``ue_client DIR train`` reaches fine-tuning and plain ``ue_client`` generation, each failing in one line of
    its own; a command missing an optional package names the extra that installs it."""
    import subprocess
    import sys
    from pathlib import Path

    from seam.runtime.shell import missing_extra

    scripts = Path(sys.executable).parent
    artifact = str(exported("tiny-llama"))
    missing = str(tmp_path / "missing.jsonl")
    train = subprocess.run([scripts / "ue_client", artifact, "train", "--data", missing, "--server",
                            "tcp://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    generate = subprocess.run([scripts / "ue_client", artifact, "--prompt", "hi", "--max-new-tokens", "0"],
                              capture_output=True, text=True, timeout=120)
    for result, prefix in ((train, "ue_client train: error:"), (generate, "ue_client: error:")):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    assert "missing.jsonl" in train.stderr and "--max-new-tokens" in generate.stderr
    assert missing_extra("peft.tuners") == ("this needs peft.tuners, part of the 'finetune' extra; install it "
                                            "with: pip install 'seam-llm[finetune]'")
    assert missing_extra("numpy") is None


HIDDEN = """
import importlib.abc, os, sys

class Hidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in os.environ["SEAM_TEST_HIDDEN"].split(","):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hidden())
"""


def without(tmp_path, modules: str, *command: str) -> subprocess.CompletedProcess:
    """Runs a command as on a machine without ``modules`` (comma-separated)."""
    import os
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(HIDDEN)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "SEAM_TEST_HIDDEN": modules}
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("hidden, command, extra", [
    ("stable_baselines3", ["-m", "seam.cli", "train-policy", "ART", "--quality", "q.json", "--edge-profile", "e.json"],
     "rl"),
    ("torch", ["-m", "seam.cli", "train-policy", "ART", "--quality", "q.json", "--edge-profile", "e.json"], "rl"),
    ("cvxpy", ["-m", "seam.cli", "plan-round", "setup.json"], "allocation"),
    ("cvxpy", ["-m", "seam.cli", "ue_client", "ART", "train", "--server", "tcp://127.0.0.1:9", "--data", "d.txt",
               "--plan", "plan.json"], "allocation"),
    ("peft", ["-m", "seam.cli", "ue_client", "ART", "train", "--server", "tcp://127.0.0.1:9", "--data", "d.txt"],
     "finetune"),
    ("matplotlib", ["-m", "seam.cli", "plan", "ART", "--ue-profile", "u.json", "--edge-profile", "e.json",
                    "--bandwidth", "10", "--rtt", "5", "--plot", "p.png"], "plot"),
])
def test_a_missing_package_names_the_commands_own_extra_before_any_work(exported, tmp_path, hidden, command, extra):
    artifact = str(exported("tiny-llama"))
    command = [artifact if part == "ART" else part for part in command]
    if "ue_client" in command:  # the ue_client entry point, as installed
        command = ["-c", "import sys; from seam.cli import ue_client; sys.exit(ue_client(sys.argv[1:]))",
                   *command[command.index("ue_client") + 1:]]
    result = without(tmp_path, hidden, *command)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"'{extra}' extra" in lines[0] and f"seam-llm[{extra}]" in lines[0], lines[0]
