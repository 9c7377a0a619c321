"""The rooms' rules, read from the source (ARCHITECTURE.md states them): which room may import which, where zmq
and torch may be imported, how long a module or a function may grow; and the serving entry points importing and
generating with torch and transformers blocked."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "seam"
# What each room may import of the others; every room may import itself and nothing may import the umbrella
# modules at the package's top (the commands, the demo).
MAY_IMPORT = {
    "runtime": set(),
    "planning": {"runtime"},
    "export": {"runtime"},
    "profiler": {"runtime", "planning"},
    "edge_server": {"runtime", "planning"},
    "ue_client": {"runtime", "planning"},
    "finetune": {"runtime", "planning", "export", "ue_client"},
    "serving": {"runtime", "planning", "ue_client"},
}
# Two exceptions, each taken lazily from a CLI: ``edge_server --train`` registers the fine-tuning service, and
# ``seam profile --training`` has fine-tuning timed.
EXCEPTIONS = {("edge_server/cli.py", "finetune"), ("profiler/cli.py", "finetune")}
HEAVY = {"torch", "transformers", "onnx", "onnxscript", "peft", "stable_baselines3", "gymnasium"}
HEAVY_ROOMS = {"export", "finetune", "profiler"}  # the export, fine-tuning and the profiler's training
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def modules():
    return sorted(path for path in PACKAGE.rglob("*.py"))


def room_of(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """Every imported module name, and whether the import sits at module level."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, id(node) in top))
    return found


def type_checking_only(tree: ast.AST) -> set[str]:
    """Modules imported under ``if TYPE_CHECKING:``, which never run."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            names |= {name for inner in node.body for name, _ in imports(ast.Module(body=[inner], type_ignores=[]))}
    return names


def test_rooms_import_only_what_they_may():
    broken = []
    for path in modules():
        room, tree = room_of(path), ast.parse(path.read_text())
        relative = path.relative_to(PACKAGE).as_posix()
        skip = type_checking_only(tree)
        for name, _ in imports(tree):
            parts = name.split(".")
            if parts[0] != "seam" or name in skip:
                continue
            target = parts[1] if len(parts) > 1 else ""
            if room is None:
                continue  # the umbrella commands use every room
            if target in ("", "cli", "demo", "keys"):
                broken.append(f"{relative} imports the umbrella module {name}")
            elif target != room and target not in MAY_IMPORT[room] and (relative, target) not in EXCEPTIONS:
                broken.append(f"{relative} ({room}) imports {name}")
    assert not broken, "\n".join(broken)


def test_no_two_rooms_import_each_other():
    allowed = {(room, other) for room, others in MAY_IMPORT.items() for other in others}
    assert not [(a, b) for a, b in allowed if (b, a) in allowed]


def test_zmq_and_heavy_packages_stay_in_their_rooms():
    broken = []
    for path in modules():
        relative = path.relative_to(PACKAGE).as_posix()
        for name, module_level in imports(ast.parse(path.read_text())):
            root = name.split(".")[0]
            if root == "zmq" and relative != "runtime/transport.py":
                broken.append(f"{relative} imports zmq")
            if root in HEAVY and module_level and room_of(path) not in HEAVY_ROOMS:
                broken.append(f"{relative} imports {root} at module level")
    assert not broken, "\n".join(broken)


def test_modules_and_functions_stay_small():
    broken = []
    for path in modules():
        relative = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            broken.append(f"{relative}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    broken.append(f"{relative}:{node.lineno} {node.name}: {length} lines")
        if not ast.get_docstring(ast.parse(text)) and text.strip():
            broken.append(f"{relative}: no module docstring")
    assert not broken, "\n".join(broken)


BLOCKED_SERVING = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers"}:
            raise ModuleNotFoundError(f"{name} is blocked", name=name)
        return None

sys.meta_path.insert(0, Blocked())
import seam.edge_server.cli, seam.ue_client.cli, seam.ue_client.client
from seam.edge_server.process import edge_server
from seam.runtime.text import load_tokenizer
from seam.ue_client.client import EdgeClient

artifact = sys.argv[1]
with edge_server(artifact) as (_, address), EdgeClient(artifact, address) as client:
    with client.session(split=1) as session:
        tokens = [int(t[0]) for t in session.generate([[5, 6, 7]], max_new_tokens=4)]
assert len(tokens) == 4 and not {"torch", "transformers"} & set(sys.modules), sorted(sys.modules)
print("generated", tokens)
"""


def test_serving_runs_with_torch_and_transformers_blocked(exported, tmp_path):
    """A UE or an edge needs neither torch nor transformers: both import and generate with them blocked (the
    edge process too, through the import hook given to it by the same interpreter flags below)."""
    artifact = exported("tiny-llama")
    hook = tmp_path / "sitecustomize.py"
    hook.write_text(BLOCKED_SERVING.split("import seam.edge_server.cli")[0])
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", BLOCKED_SERVING, str(artifact)], capture_output=True, text=True,
                            timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated" in result.stdout


@pytest.mark.parametrize("module", ["seam.planning.policy", "seam.planning.learned", "seam.edge_server.server",
                                    "seam.serving.app", "seam.serving.cli"])
def test_serving_modules_load_without_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
