"""The demo as a newcomer runs it, and streamed text decoding."""

from __future__ import annotations

from conftest import run_seam
from seam.runtime.artifact import Artifact
from seam.runtime.text import load_tokenizer


def test_demo_exports_validates_and_streams(tmp_path):
    result = run_seam("demo", "--model", "tiny-llama", "--out", str(tmp_path / "art"), "--max-new-tokens", "8",
                      "--adaptive-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("identical") == 3  # one parity row per cut of the 4-layer model
    assert "edge_server (layers [2, 4)) and ue_client (layers [0, 2)) over loopback TCP" in result.stdout
    assert "8 tokens; time to first token" in result.stderr and "network" in result.stderr
    assert "edge_server close" in result.stdout  # the real server process logged the session
    # Then the blocks are profiled and the cost-model policy runs over a link that drops and recovers.
    assert "== the split follows the link" in result.stdout
    assert list((tmp_path / "art" / "profiles").glob("cpu-*.json"))
    assert "24 tokens; time to first token" in result.stderr


def test_streamed_text_waits_for_whole_characters(exported):
    import io

    from seam.ue_client.display import TextStream

    tokenizer = load_tokenizer(Artifact.open(exported("tiny-llama")))
    text = "naïve café ✓"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text)  # byte-level: multi-byte characters span several tokens
    out, pieces = io.StringIO(), []
    stream = TextStream(tokenizer, None, out)
    for token in ids:
        stream.push([token])
        pieces.append(out.getvalue()[sum(map(len, pieces)):])
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_the_readme_python_snippet_runs_as_written(exported):
    """The README's snippet, with only the artifact and the address swapped for the test's."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from seam.edge_server.process import edge_server

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    artifact = exported("tiny-llama")
    with edge_server(artifact) as (_, address):
        code = snippet.replace('"artifacts/smollm2-135m-instruct"', repr(str(artifact))).replace(
            '"tcp://127.0.0.1:5555"', repr(address)).replace("split=15", "split=2")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_an_answer_ends_where_a_stop_text_appears(exported):
    import io

    from seam.ue_client.display import TextStream

    tokenizer = load_tokenizer(Artifact.open(exported("tiny-llama")))
    out = io.StringIO()
    stream = TextStream(tokenizer, None, out, stops=("stop here",))
    pushed = []
    for token in tokenizer.encode("naïve café stop here and more").ids:
        pushed.append(stream.push([token]))
        if not pushed[-1]:
            break
    stream.end()
    assert out.getvalue() == "naïve café \n"  # not the stop text and nothing after it
    assert pushed.count(False) == 1
