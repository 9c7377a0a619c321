"""The demo as a newcomer runs it, and streamed text decoding."""

from __future__ import annotations

from conftest import run_seam
from seam.runtime.artifact import Artifact
from seam.runtime.text import StreamDecoder, load_tokenizer


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


def test_stream_decoder_waits_for_whole_characters(exported):
    tokenizer = load_tokenizer(Artifact.open(exported("tiny-llama")))
    text = "naïve café ✓"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text)  # byte-level: multi-byte characters span several tokens
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
