"""Placing layers over a pipeline of heterogeneous nodes: the dynamic programme against exhaustive search, memory
as a hard bound, and ``seam plan-pipeline`` on a real artifact's profiles."""

from __future__ import annotations

import itertools

import pytest

from conftest import run_seam
from seam.planning.cost_model import DeviceModel, Link
from seam.planning.placement import Facts, Node, Workload, evaluate, even, exhaustive, place, single_node
from seam.planning.schema import save
from seam.runtime.artifact import Dimensions
from seam.runtime.errors import SeamError
from test_cost_model import HIDDEN, device

LAYERS = 8
SPANS = tuple((i, i + 1) for i in range(LAYERS))
FACTS = Facts(Dimensions(LAYERS, HIDDEN, 4, 4, 16, 1000), 4, 2 * 4 * 16 * 4, tuple(range(LAYERS + 1)), SPANS,
              (1000,) * LAYERS)


def nodes(*scales: float, memory: tuple = (), rates: tuple = ()) -> list[Node]:
    """The UE at ``scales[0]`` and an edge node at each later scale (a larger scale is slower)."""
    memory = memory or (None,) * len(scales)
    rates = rates or (1000.0,) * len(scales)
    return [Node("ue" if i == 0 else f"n{i}", DeviceModel.from_profile(device(scale, SPANS, name=f"d{i}")),
                 memory[i], None if i == 0 else Link.from_mbit(rates[i], 1)) for i, scale in enumerate(scales)]


WORKLOADS = [Workload("train", 1, 8, 64), Workload("train", 4, 2, 256), Workload("infer", 1, context=128),
             Workload("infer", 4, context=512)]


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: f"{w.mode}-{w.micro_batch}")
@pytest.mark.parametrize("scales", [(4.0, 1.0, 1.0), (4.0, 1.0, 2.0, 0.5), (8.0, 3.0, 1.0, 1.0), (1.0, 1.0, 4.0)])
def test_the_placement_is_the_best_of_every_placement(scales, workload):
    pipeline = nodes(*scales)
    assert place(pipeline, FACTS, workload).step_s == pytest.approx(exhaustive(pipeline, FACTS, workload).step_s)


def test_faster_nodes_take_more_layers_and_every_used_node_is_busy():
    placed = place(nodes(4.0, 1.0, 3.0), FACTS, Workload("train", 1, 16, 64))
    ue, fast, slow = (stage.span[1] - stage.span[0] for stage in placed.stages)
    assert ue >= 1 and fast > slow > 0
    # The slowest stage sets the pace: it is busy but for the pipeline's fill and drain.
    assert max(stage.busy_share for stage in placed.stages) == pytest.approx(16 / (16 + 3 - 1))
    assert placed.step_s < even(nodes(4.0, 1.0, 3.0), FACTS, Workload("train", 1, 16, 64)).step_s


def test_a_slow_link_or_a_useless_node_is_left_out_of_inference():
    placed = place(nodes(4.0, 1.0, 1.0, rates=(0, 1000.0, 0.01)), FACTS, Workload("infer", 1, context=128))
    assert placed.stages[2].span[0] == placed.stages[2].span[1]  # a hop over 10 kbit/s never pays
    assert placed.step_s == pytest.approx(single_node(nodes(4.0, 1.0, 1.0, rates=(0, 1000.0, 0.01)), FACTS,
                                                      Workload("infer", 1, context=128)).step_s)


def test_memory_is_a_hard_bound():
    workload = Workload("infer", 1, context=128)
    free = place(nodes(4.0, 1.0, 8.0), FACTS, workload)
    three_layers = evaluate(nodes(4.0, 1.0, 8.0), (0, 1, 4, LAYERS), FACTS, workload).stages[1].memory_bytes
    tight = place(nodes(4.0, 1.0, 8.0, memory=(None, three_layers, None)), FACTS, workload)
    assert free.stages[1].span[1] - free.stages[1].span[0] > 3
    assert tight.stages[1].span[1] - tight.stages[1].span[0] == 3 and tight.stages[1].memory_bytes <= three_layers
    with pytest.raises(SeamError, match="memory"):
        place(nodes(4.0, 1.0, memory=(1, 1)), FACTS, workload)


def test_the_ue_keeps_its_layers():
    placed = place(nodes(100.0, 1.0), FACTS, Workload("infer", 1, context=128), min_ue_layers=3)
    assert placed.stages[0].span == (0, 3)


def test_plan_pipeline_prints_the_placement_against_even_and_single(exported, tmp_path):
    from seam.planning.loading import profile_key
    from seam.runtime.artifact import Artifact

    artifact = Artifact.open(exported("tiny-llama"))
    key = profile_key(artifact, "cpu", 1, artifact.manifest.dtype)
    spans = tuple((block.layers.start, block.layers.end) for block in artifact.manifest.blocks)
    paths = {}
    for name, scale in (("ue", 6.0), ("gpu", 1.0), ("old", 3.0)):
        profile = device(scale, spans, key.artifact_fingerprint, name=name,
                         hidden=artifact.manifest.dims.hidden_size)
        paths[name] = save(profile, tmp_path / f"{name}.json")
    result = run_seam("plan-pipeline", str(artifact.root), "--ue-profile", str(paths["ue"]),
                      "--node", f"gpu={paths['gpu']}", "--node", f"old={paths['old']}", "--link", "old=100:5",
                      "--micro-batches", "8", "--sequence", "64")
    assert result.returncode == 0, result.stderr
    assert "placed:" in result.stdout and "an even split" in result.stdout and "single fastest node" in result.stdout
    assert "run it: seam train-pipeline" in result.stdout and "--microbatches 8" in result.stdout
    inference = run_seam("plan-pipeline", str(artifact.root), "--ue-profile", str(paths["ue"]), "--mode", "infer", "--context", "128",
                         "--node", f"gpu={paths['gpu']}", "--node", f"old={paths['old']}", "--link", "old=100:5")
    assert inference.returncode == 0, inference.stderr
    commands = [line for line in inference.stdout.splitlines() if line.startswith("  on ")]
    assert commands[-1].startswith("  on ue: ue_client") and "--split" in commands[-1]
    assert all(" --until " in line and " --next tcp://" in line for line in commands[1:-1])
    wrong = run_seam("plan-pipeline", str(artifact.root), "--ue-profile", str(paths["ue"]), "--node",
                     f"gpu={paths['gpu']}", "--memory", "nope=10")
    assert wrong.returncode != 0 and "--memory names nope" in wrong.stderr


def test_the_last_stage_of_training_pays_for_the_head():
    """The head scores every position in training: a vocabulary-sized matrix that outweighs several layers."""
    from dataclasses import replace

    workload = Workload("train", micro_batches=8, sequence=64)
    equal = nodes(1.0, 1.0, 1.0)
    plain = place(equal, FACTS, workload)
    headed = place(equal, replace(FACTS, head_layers=3.0), workload)
    layers = lambda placement: [end - start for start, end in placement.spans()]
    assert layers(headed)[-1] < layers(plain)[-1]
    assert headed.step_s > plain.step_s
