"""``seam profile`` and ``seam probe`` on real artifacts and a real edge_server; their bad-input paths."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime
import pytest

from conftest import run_seam
from seam.edge_server.process import edge_server
from seam.profiler.measure import Grid, _call, _Inputs, profile_device
from seam.planning.schema import DeviceProfile, LinkProfile, from_dict, load, to_json
from seam.runtime.artifact import Artifact
from seam.runtime.executor import SessionPool

HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()

FAST = ("--repeats", "3", "--warmup", "1", "--prefill-lengths", "1,8,32", "--past-lengths", "0,16,64", "--quiet")


def test_profile_measures_every_block_and_is_cached(exported, tmp_path):
    artifact = Artifact.open(exported("tiny-llama"))
    copy = tmp_path / "copy.json"
    first = run_seam("profile", str(artifact.root), *FAST, "--force", "--out", str(copy))
    assert first.returncode == 0, first.stderr
    profile = load(copy, DeviceProfile)
    assert profile.key.artifact_fingerprint == artifact.manifest.artifact_fingerprint
    assert [block.layers for block in profile.blocks] == [(b.layers.start, b.layers.end) for b in artifact.manifest.blocks]
    for block in [profile.prelude, *profile.blocks]:
        assert [t.length for t in block.prefill] == [1, 8, 32]
        assert [t.length for t in block.decode] == [0, 16, 64]
        assert all(0 < t.median_s <= t.p90_s for t in block.prefill + block.decode)
    assert all(block.weight_bytes > 0 and block.kv_bytes_per_token > 0 for block in profile.blocks)
    assert profile.peak_rss_bytes > 0 and profile.host["onnxruntime"] == onnxruntime.__version__

    cached = artifact.root / "profiles" / profile.key.file_name()
    assert json.loads(cached.read_text()) == json.loads(copy.read_text())
    again = run_seam("profile", str(artifact.root), *FAST)
    assert again.returncode == 0 and "cached" in again.stdout
    other_grid = run_seam("profile", str(artifact.root), *FAST, "--past-lengths", "0,8")
    assert other_grid.returncode == 0 and "cached" not in other_grid.stdout


def test_io_binding_runs_what_a_plain_run_runs(exported):
    artifact = Artifact.open(exported("tiny-llama", "concat"))  # a feed of its own cache, as a CUDA profile binds
    runner = SessionPool(artifact).runner(artifact.manifest.blocks[0].layers)
    inputs = _Inputs(artifact)
    shared = runner.shared_inputs(*inputs.positions(2, 5, 3))
    loaded = runner.blocks[0]
    feed = runner.feed(loaded, inputs.first(runner.span, 2, 3), inputs.cache(runner.span, 2, 5), shared)

    plain = _call(loaded.session, feed, "cpu", bind=False)()
    bound = _call(loaded.session, feed, "cpu", bind=True)()

    assert len(bound) == len(plain) == len(loaded.output_names)
    for got, want in zip(bound, plain):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_profile_with_io_binding(exported):
    artifact = Artifact.open(exported("tiny-llama"))
    grid = Grid(prefill_lengths=(1, 8), past_lengths=(0, 16), repeats=2, warmup=1, gap_s=0, io_binding=True)

    profile = profile_device(artifact, "cpu", grid=grid, progress=False)

    assert profile.settings["io_binding"] is True
    assert all(t.median_s > 0 for block in profile.blocks for t in block.prefill + block.decode)
    assert profile.peak_cuda_bytes is None  # only a CUDA profile asks the GPU
    # The head alone, which a UE keeping the output private runs: timed at every shape, and saved and read back.
    assert profile.head.layers == (artifact.num_layers,) * 2 and len(profile.head.decode) == 2
    assert from_dict(json.loads(to_json(profile))).head == profile.head


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu ('make gpu') and a CUDA GPU")
def test_profile_on_cuda(exported, tmp_path):
    out = tmp_path / "cuda.json"
    result = run_seam("profile", str(exported("tiny-llama")), *FAST, "--device", "cuda", "--force", "--out", str(out))
    assert result.returncode == 0, result.stderr
    profile = load(out, DeviceProfile)
    assert profile.key.provider == "CUDAExecutionProvider" and profile.settings["io_binding"] is True
    assert profile.peak_cuda_bytes and profile.peak_cuda_bytes > 0
    assert all(0 < t.median_s <= t.p90_s for block in profile.blocks for t in block.prefill + block.decode)


def test_profile_emulates_a_weaker_device(exported):
    artifact = exported("tiny-gpt2")
    pinned = run_seam("profile", str(artifact), *FAST, "--cpus", "0", "--force")
    assert pinned.returncode == 0, pinned.stderr
    path = pinned.stdout.split("profile: ", 1)[1].split()[0]
    profile = load(path, DeviceProfile)
    assert profile.key.threads == 1 and profile.host["cpu_affinity"] == [0]


def test_profile_bad_input(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported("tiny-llama"), broken)
    block = next(broken.glob("block*.onnx"))
    block.write_bytes(block.read_bytes()[:-10] + b"0123456789")
    cases = {
        ("profile", str(broken)): "does not match its sha256",
        ("profile", str(tmp_path / "missing")): "missing",
        ("profile", str(exported("tiny-llama")), "--cpus", "9999"): "is not a subset",
        ("profile", str(exported("tiny-llama")), "--variant", "int4"): "is not in this artifact",
    }
    if not HAS_CUDA:
        cases[("profile", str(exported("tiny-llama")), "--device", "cuda")] = "CPUExecutionProvider"
    for args, fragment in cases.items():
        result = run_seam(*args)
        assert result.returncode == 2, (args, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("seam profile: error:") and fragment in last, (args, last)


def test_probe_measures_a_live_link(exported, tmp_path):
    out = tmp_path / "link.json"
    with edge_server(exported("tiny-llama")) as (_, address):
        probed = run_seam("probe", address, "--out", str(out), "--sizes", "256,65536,1048576", "--repeats", "3")
    assert probed.returncode == 0, probed.stderr
    link = load(out, LinkProfile)
    assert link.server == address and link.rtt_s > 0
    assert link.up_bytes_per_s > 1e6 and link.down_bytes_per_s > 1e6  # loopback moves far more than 1 MB/s
    assert {(s.up_bytes, s.down_bytes) for s in link.samples} >= {(1048576, 256), (256, 1048576)}
    with pytest.raises(Exception, match="link profile"):
        load(out, DeviceProfile)


def test_probe_without_server_fails_within_its_timeout(tmp_path):
    result = run_seam("probe", "tcp://127.0.0.1:9", "--timeout", "0.5", "--out", str(tmp_path / "x.json"), timeout=60)
    assert result.returncode == 2
    assert "no reply from the edge server" in result.stderr
    assert not (tmp_path / "x.json").exists()


def test_profile_times_fine_tuning_and_the_training_placement_reads_it(exported, tmp_path):
    from seam.planning.cost_model import DeviceModel
    from seam.planning.placement import Facts, Node, Workload, evaluate

    artifact = Artifact.open(exported("tiny-llama"))
    out = tmp_path / "trained.json"
    shapes = ("--training", "--train-shapes", "1x8,2x8")
    first = run_seam("profile", str(artifact.root), *FAST, *shapes, "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert "fine-tune ms @ batch x len" in first.stdout and "head" in first.stdout
    profile = load(out, DeviceProfile)
    assert profile.trained and [(t.batch, t.length) for t in profile.head_train] == [(1, 8), (2, 8)]
    assert all([(t.batch, t.length) for t in block.train] == [(1, 8), (2, 8)] and
               all(0 < t.median_s <= t.p90_s for t in block.train) for block in profile.blocks)
    again = run_seam("profile", str(artifact.root), *FAST, *shapes)
    assert again.returncode == 0 and "cached" in again.stdout

    model = DeviceModel.from_profile(profile)
    last = artifact.num_layers
    assert model.train_s(0, last, 8, 2, head=True) > model.train_s(0, last, 8, 2, head=False) > 0
    assert DeviceModel.from_profile(profile.slowed(3.0)).train_s(0, last, 8, 2, True) == \
        pytest.approx(3 * model.train_s(0, last, 8, 2, True))
    placed = evaluate([Node("ue", model, None, None)], (0, last), Facts.of(artifact.manifest),
                      Workload("train", micro_batch=2, micro_batches=4, sequence=8))
    assert placed.stages[0].compute_s == pytest.approx(model.train_s(0, last, 8, 2, head=True))

    bad = run_seam("profile", str(artifact.root), "--training", "--train-shapes", "0x8")
    assert bad.returncode == 2 and "micro-batch x sequence" in bad.stderr.strip().splitlines()[-1]
