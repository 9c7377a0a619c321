"""The split cost model and ``seam plan``: fits, message sizes, predictions and plans on synthetic profiles whose
latencies are known exactly, plus profile files and the plan command on a real tiny artifact."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from seam.planning import wire_sizes
from seam.planning.cost_model import (
    DecodeFit,
    DeviceModel,
    Link,
    PrefillFit,
    median_relative_error,
    plan,
    predict,
    score,
)
from seam.profiler.plan import add_plan_parser
from seam.planning.schema import (
    BlockProfile,
    DeviceProfile,
    LinkProfile,
    LinkSample,
    ProfileKey,
    Timing,
    load,
    save,
)
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.protocol import Step, StepResult, encode

FINGERPRINT = "a" * 64
HIDDEN = 64
PASTS = (0, 128, 512)
LENGTHS = (16, 64, 256)
BATCH_FACTOR = {1: 1.0, 4: 2.0}  # a batch of 4 takes twice as long as one sequence


def decode_s(scale: float, past: int, batch: int = 1) -> float:
    return scale * (1e-3 + 2e-6 * past) * BATCH_FACTOR[batch]


def prefill_s(scale: float, length: int, batch: int = 1) -> float:
    # Superlinear in the length, so piecewise interpolation differs from one straight line through the points.
    return scale * (1e-4 * length + 1e-7 * length**2) * BATCH_FACTOR[batch]


def block(index: int, layers: tuple[int, int], scale: float, variant: str = "fp32") -> BlockProfile:
    return BlockProfile(
        index=index,
        layers=layers,
        variant=variant,
        weight_bytes=1000,
        load_s=0.01,
        load_rss_bytes=2000,
        kv_bytes_per_token=512,
        activation_bytes_per_token=HIDDEN * 4,
        prefill=[Timing(b, n, prefill_s(scale, n, b), 1.1 * prefill_s(scale, n, b)) for b in (1, 4) for n in LENGTHS],
        decode=[Timing(b, p, decode_s(scale, p, b), 1.1 * decode_s(scale, p, b)) for b in (1, 4) for p in PASTS],
    )


def device(
    scale: float = 1.0,
    spans=((0, 1), (1, 2), (2, 3), (3, 4)),
    fingerprint: str = FINGERPRINT,
    dtype: str = "fp32",
    name: str = "ue",
    hidden: int = HIDDEN,
    prelude_scale: float = 0.01,
) -> DeviceProfile:
    return DeviceProfile(
        key=ProfileKey(fingerprint, name, "cpu", 4, dtype),
        host={"machine": "synthetic"},
        settings={"lengths": list(LENGTHS), "pasts": list(PASTS), "batches": [1, 4]},
        prelude=block(-1, (0, 0), prelude_scale, dtype),
        blocks=[block(i, span, scale, dtype) for i, span in enumerate(spans)],
        num_layers=spans[-1][1],
        hidden_size=hidden,
        peak_rss_bytes=10_000,
        created="2025-01-01T00:00:00Z",
    )


# --- fits ---------------------------------------------------------------------------------------------------


def test_decode_fit_recovers_the_line():
    timings = [Timing(1, p, 0.003 + 4e-6 * p, 0.0) for p in (0, 100, 300, 1000)]

    fit = DecodeFit.from_timings(timings)

    (batch, intercept, slope), = fit.lines
    assert batch == 1
    assert intercept == pytest.approx(0.003, rel=1e-12)
    assert slope == pytest.approx(4e-6, rel=1e-12)
    assert fit(2000) == pytest.approx(0.003 + 4e-6 * 2000, rel=1e-12)


def test_decode_fit_is_least_squares_through_noise():
    timings = [Timing(1, 0, 1.0, 1.0), Timing(1, 10, 3.0, 3.0), Timing(1, 20, 2.0, 2.0)]

    fit = DecodeFit.from_timings(timings)

    assert fit.lines == (pytest.approx((1, 1.5, 0.05)),)


def test_decode_fit_interpolates_and_extrapolates_batch():
    fit = DeviceModel.from_profile(device()).blocks[0].decode

    between = fit(100, batch=2)
    beyond = fit(100, batch=8)

    one, four = decode_s(1, 100, 1), decode_s(1, 100, 4)
    assert between == pytest.approx(one + (four - one) / 3)
    assert beyond == pytest.approx(one + (four - one) * 7 / 3)


def test_prefill_fit_interpolates_between_lengths():
    fit = DeviceModel.from_profile(device()).blocks[0].prefill

    at_measured = [fit(n) for n in LENGTHS]
    between = fit(40)

    assert at_measured == pytest.approx([prefill_s(1, n) for n in LENGTHS])
    y16, y64 = prefill_s(1, 16), prefill_s(1, 64)
    assert between == pytest.approx(y16 + (y64 - y16) * (40 - 16) / 48)
    assert between != pytest.approx(prefill_s(1, 40))  # the true curve bends; the model is piecewise linear


def test_prefill_fit_extrapolates_linearly_beyond_both_ends():
    fit = DeviceModel.from_profile(device()).blocks[0].prefill

    above = fit(512)
    below = fit(8)

    y16, y64, y256 = (prefill_s(1, n) for n in LENGTHS)
    assert above == pytest.approx(y256 + (y256 - y64) * (512 - 256) / 192)
    assert below == pytest.approx(y16 + (y64 - y16) * (8 - 16) / 48)


def test_prefill_fit_interpolates_batch():
    fit = PrefillFit.from_timings([Timing(1, 10, 1.0, 1.0), Timing(1, 20, 2.0, 2.0), Timing(3, 10, 3.0, 3.0)])

    assert fit(15, batch=2) == pytest.approx((1.5 + 3.0) / 2)


def test_prefill_fit_with_one_batch_scales_by_tokens():
    fit = PrefillFit.from_timings([Timing(1, 10, 1.0, 1.0), Timing(1, 20, 2.0, 2.0), Timing(1, 40, 5.0, 5.0)])

    assert fit(10, batch=3) == pytest.approx(fit(30))


def test_extrapolation_never_predicts_negative_latency():
    fit = DecodeFit.from_timings([Timing(1, 100, 0.001, 0.001), Timing(1, 200, 0.01, 0.01)])

    assert fit(0) == 0.0


# --- message sizes and predictions --------------------------------------------------------------------------


def test_header_constants_match_encoded_messages():
    session = "0123456789abcdef" * 2
    # Steps after the first send the mask columns of their new positions only.
    step = Step(session, 7, np.ones((2, 8), np.int64), np.zeros((2, 8), np.int64),
                hidden_states=np.zeros((2, 8, HIDDEN), np.float32))
    tokens = Step(session, 7, np.ones((2, 8), np.int64), np.zeros((2, 8), np.int64),
                  input_ids=np.zeros((2, 8), np.int64))
    result = StepResult(session, 7, 3 / 7, np.zeros(2, np.int64))  # a measured time prints at full precision

    sizes = [sum(len(frame) for frame in encode(message)) for message in (step, tokens, result)]

    # Shapes and the step number are decimal text in the header, so a few bytes of difference are expected.
    assert sizes[0] == pytest.approx(wire_sizes.uplink_bytes(2, 2, 8, HIDDEN, 4), abs=8)
    assert sizes[1] == pytest.approx(wire_sizes.uplink_bytes(0, 2, 8, HIDDEN, 4), abs=8)
    assert sizes[2] == pytest.approx(wire_sizes.downlink_bytes(2), abs=8)


def test_prediction_parts_add_up_and_bytes_follow_the_formula():
    ue, edge = device(scale=3.0), device(scale=0.5, name="edge")
    link = Link.from_mbit(10, 20)

    cost = predict(ue, edge, link, split=2, context=100, batch=4)

    H, B, C = HIDDEN, 4, 100
    decode, prefill = cost.decode, cost.prefill
    assert decode.uplink_bytes == B * H * 4 + B * 8 + B * 8 + wire_sizes.STEP_HEADER_BYTES
    assert prefill.uplink_bytes == B * C * H * 4 + B * C * 8 + B * C * 8 + wire_sizes.STEP_HEADER_BYTES
    assert decode.downlink_bytes == prefill.downlink_bytes == B * 8 + wire_sizes.RESULT_HEADER_BYTES
    assert decode.ue_s == pytest.approx(decode_s(0.01, C, B) + 2 * decode_s(3.0, C, B))
    assert decode.edge_s == pytest.approx(decode_s(0.01, C, B) + 2 * decode_s(0.5, C, B))
    assert decode.uplink_s == pytest.approx(decode.uplink_bytes / 1.25e6)
    assert decode.downlink_s == pytest.approx(decode.downlink_bytes / 1.25e6)
    assert decode.rtt_s == prefill.rtt_s == pytest.approx(0.02)
    for step in (decode, prefill):
        parts = step.ue_s + step.uplink_s + step.rtt_s + step.edge_s + step.downlink_s
        assert step.total_s == pytest.approx(parts)


def test_split_zero_sends_token_ids_and_runs_nothing_on_the_ue():
    cost = predict(device(), device(name="edge"), Link.from_mbit(10, 20), split=0, context=100)

    assert cost.decode.ue_s == 0.0
    assert cost.decode.uplink_bytes == 8 + 8 + 8 + wire_sizes.TOKEN_STEP_HEADER_BYTES


def test_all_local_split_uses_no_link_and_no_edge():
    cost = predict(device(), device(name="edge"), Link.from_mbit(10, 20), split=4, context=100)

    for step in (cost.decode, cost.prefill):
        assert (step.uplink_bytes, step.uplink_s, step.edge_s, step.downlink_bytes, step.rtt_s) == (0, 0, 0, 0, 0)
        assert step.total_s == step.ue_s > 0


def test_split_inside_a_block_is_refused_with_the_valid_ones():
    ue, edge = device(spans=((0, 2), (2, 4))), device(spans=((0, 2), (2, 4)), name="edge")

    with pytest.raises(SeamError, match=r"split 1 .*one of \[0, 2, 4\]"):
        predict(ue, edge, Link.from_mbit(10, 20), split=1, context=64)


def test_more_bandwidth_never_makes_a_split_slower():
    ue, edge = device(scale=2.0), device(scale=0.2, name="edge")
    links = [Link.from_mbit(mbit, 10) for mbit in (0.1, 1, 10, 100, 1000)]

    plans = plan(ue, edge, links, context=256)

    for split in range(5):
        decode = [p.costs[split].decode.total_s for p in plans]
        prefill = [p.costs[split].prefill.total_s for p in plans]
        assert decode == sorted(decode, reverse=True)
        assert prefill == sorted(prefill, reverse=True)


def test_best_split_moves_to_the_edge_as_the_ue_slows_down():
    edge, link = device(scale=1.0, name="edge"), Link.from_mbit(100, 5)
    slowdowns = (0.01, 0.1, 1, 10, 100)

    best = [plan(device(scale=s), edge, [link], context=512)[0].best for s in slowdowns]

    assert best == sorted(best, reverse=True)
    assert best[0] == 4  # a fast UE keeps everything: no round trip to pay
    assert best[-1] == 0  # a very slow UE hands everything to the edge


def test_best_split_moves_to_the_ue_as_bandwidth_drops():
    ue, edge = device(scale=5.0), device(scale=0.1, name="edge")
    bandwidths = (1000, 100, 10, 1, 0.1)

    best = [p.best for p in plan(ue, edge, [Link.from_mbit(b, 1) for b in bandwidths], context=512)]

    assert best == sorted(best)
    assert best[0] == 0
    assert best[-1] == 4


def test_ties_go_to_the_smaller_ue_share():
    ue, edge = device(scale=1.0, prelude_scale=0.0), device(scale=1.0, prelude_scale=0.0, name="edge")
    # Same speed on both sides and a free link with no hidden-state cost: every remote split costs the same.
    link = Link(0.0, 1e30, 1e30)

    (result,) = plan(ue, edge, [link], context=64)

    assert result.best == 0


def test_profiles_of_different_artifacts_are_refused():
    ue, edge = device(), device(fingerprint="b" * 64, name="edge")

    with pytest.raises(SeamError, match="profiles of different artifacts"):
        plan(ue, edge, [Link.from_mbit(10, 20)], context=64)


def test_profiles_of_different_dtypes_are_refused():
    ue, edge = device(), device(dtype="fp16", name="edge")

    with pytest.raises(SeamError, match="different dtypes"):
        plan(ue, edge, [Link.from_mbit(10, 20)], context=64)


def test_int8_blocks_still_send_hidden_states_in_the_export_dtype():
    # 'seam profile --variant int8' keys the profile int8; its prelude stays in the export dtype.
    quantised = device(dtype="fp16")
    quantised.key = ProfileKey(FINGERPRINT, "ue", "cpu", 4, "int8")
    for blk in quantised.blocks:
        blk.variant = "int8"

    cost = predict(quantised, device(dtype="fp16", name="edge"), Link.from_mbit(10, 20), split=2, context=100)

    assert cost.decode.uplink_bytes == HIDDEN * 2 + 8 + 8 + wire_sizes.STEP_HEADER_BYTES


def test_plan_names_links_by_mapping_key():
    links = {"wifi": Link.from_mbit(50, 5), "lte": Link.from_mbit(5, 60, uplink_mbit=1)}

    plans = plan(device(), device(name="edge"), links, context=64)

    assert [p.name for p in plans] == ["wifi", "lte"]
    assert [len(p.costs) for p in plans] == [5, 5]
    assert plans[1].link.up_bytes_per_s == pytest.approx(125_000)


def test_link_from_profile_and_cli_numbers():
    profile = LinkProfile("tcp://edge:5555", {}, 0.012, 2e6, 8e6)

    from_profile, from_cli = Link.from_profile(profile), Link.from_mbit(64, 12, uplink_mbit=16)

    assert from_profile == Link(0.012, 2e6, 8e6)
    assert from_cli.rtt_s == pytest.approx(from_profile.rtt_s)
    assert from_cli.up_bytes_per_s == pytest.approx(2e6)
    assert from_cli.down_bytes_per_s == pytest.approx(8e6)
    with pytest.raises(SeamError, match="positive"):
        Link.from_mbit(0, 10)


# --- scoring ------------------------------------------------------------------------------------------------


def test_median_relative_error():
    assert median_relative_error([1.1, 2.0, 2.5], [1.0, 2.0, 2.0]) == pytest.approx(0.1)


def test_score_is_zero_on_the_fitted_profile_and_sees_a_slower_device():
    fitted = device()

    assert score(fitted, fitted) == pytest.approx(0.0, abs=1e-9)
    assert score(fitted, device(scale=2.0, prelude_scale=0.02)) == pytest.approx(0.5)


# --- profile files ------------------------------------------------------------------------------------------


def test_device_profile_round_trips(tmp_path):
    profile = device(name="jetson")

    loaded = load(save(profile, tmp_path / profile.key.file_name()), DeviceProfile)

    assert loaded == profile


def test_link_profile_round_trips(tmp_path):
    profile = LinkProfile("tcp://edge:5555", {"machine": "x"}, 0.02, 1e6, 4e6,
                          [LinkSample(1024, 16, 0.021), LinkSample(1 << 20, 16, 1.05)], "2025-01-01T00:00:00Z")

    loaded = load(save(profile, tmp_path / "link.json"), LinkProfile)

    assert loaded == profile


@pytest.mark.parametrize(
    "text",
    ['{"schema": "seam.profile", "schema_version": 1, "kind": "dev', '{"schema": "other"}', "[]",
     '{"schema": "seam.profile", "schema_version": 1, "kind": "device", "key": {}}'],
)
def test_corrupt_profile_is_refused(tmp_path, text):
    path = tmp_path / "broken.json"
    path.write_text(text)

    with pytest.raises(SeamError, match="not a valid profile"):
        load(path)


def test_profile_of_the_wrong_kind_is_refused(tmp_path):
    path = save(LinkProfile("tcp://edge:5555", {}, 0.02, 1e6, 1e6), tmp_path / "link.json")

    with pytest.raises(SeamError, match="is a link profile"):
        load(path, DeviceProfile)


# --- seam plan ----------------------------------------------------------------------------------------------


@pytest.fixture
def tiny(exported, tmp_path):
    """The tiny-llama artifact and a slow UE profile and a fast edge profile measured (synthetically) for it."""
    directory = exported("tiny-llama")
    manifest = Artifact.open(directory).manifest
    spans = tuple((b.layers.start, b.layers.end) for b in manifest.blocks)
    paths = {}
    for name, scale in (("ue", 4.0), ("edge", 0.2)):
        profile = device(scale, spans, manifest.artifact_fingerprint, manifest.dtype, name, manifest.dims.hidden_size)
        paths[name] = save(profile, tmp_path / f"{name}.json")
    return directory, paths, len(spans)


def run_plan(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    add_plan_parser(commands)
    args = parser.parse_args(["plan", *argv])
    return args.handler(args)


def test_plan_prints_a_table_per_bandwidth(tiny, capsys):
    directory, paths, blocks = tiny

    code = run_plan(str(directory), "--ue-profile", str(paths["ue"]), "--edge-profile", str(paths["edge"]),
                    "--bandwidth", "5,20,100", "--rtt", "20", "--context", "128")

    out, err = capsys.readouterr()
    assert code == 0
    assert err == ""  # context 128 and batch 1 lie inside both profiles' grids
    assert out.count("<- best") == 3
    assert "first token" in out and "per token" in out
    summary = [line for line in out.splitlines() if line.startswith("best split at")]
    assert [line.split(":")[0] for line in summary] == [f"best split at {b} Mbit/s" for b in (5, 20, 100)]
    assert all(int(line.split(": ")[1]) in range(blocks + 1) for line in summary)
    private = [line for line in out.splitlines() if line.startswith("best split with private output at")]
    assert len(private) == 3 and "private output" in out  # the artifact has the head's graph: priced beside


def test_plan_with_a_link_profile_and_a_plot(tiny, tmp_path, capsys):
    directory, paths, _ = tiny
    link = save(LinkProfile("tcp://edge:5555", {}, 0.015, 2e6, 6e6), tmp_path / "link.json")
    png = tmp_path / "plots" / "plan.png"

    code = run_plan(str(directory), "--ue-profile", str(paths["ue"]), "--edge-profile", str(paths["edge"]),
                    "--link", str(link), "--bandwidth", "1,10", "--uplink-bandwidth", "0.5", "--rtt", "30",
                    "--plot", str(png))

    out = capsys.readouterr().out
    assert code == 0
    assert "(link.json)" in out
    assert out.count("best split at") == 3
    assert png.stat().st_size > 0
    assert png.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in png.parent.iterdir()] == ["plan.png"]  # no temporary file left behind


def test_plan_warns_when_it_extrapolates_beyond_the_profiles(tiny, capsys):
    directory, paths, _ = tiny

    code = run_plan(str(directory), "--ue-profile", str(paths["ue"]), "--edge-profile", str(paths["edge"]),
                    "--bandwidth", "10", "--rtt", "20", "--context", "300", "--batch", "8")

    warnings = capsys.readouterr().err.splitlines()
    assert code == 0
    # 300 is past the longest prompt (256) but not the longest past (512); batch 8 is past the largest (4).
    assert len(warnings) == 4
    assert sum("UE profile" in line for line in warnings) == sum("edge profile" in line for line in warnings) == 2
    assert sum("prefill was measured up to 256" in line for line in warnings) == 2
    assert sum("batch 8: measured up to 4" in line for line in warnings) == 2
    assert all("extrapolated" in line for line in warnings)


def test_plan_refuses_a_profile_of_another_artifact(tiny, tmp_path):
    directory, paths, _ = tiny
    raw = json.loads(paths["edge"].read_text())
    raw["key"]["artifact_fingerprint"] = "c" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(raw))

    with pytest.raises(SeamError, match="measured with artifact cccccccccccc, not this one") as refused:
        run_plan(str(directory), "--ue-profile", str(paths["ue"]), "--edge-profile", str(other),
                 "--bandwidth", "10", "--rtt", "20")
    assert "\n" not in str(refused.value)


def test_plan_needs_a_link(tiny):
    directory, paths, _ = tiny

    with pytest.raises(SeamError, match="--rtt"):
        run_plan(str(directory), "--ue-profile", str(paths["ue"]), "--edge-profile", str(paths["edge"]),
                 "--bandwidth", "10")
    with pytest.raises(SeamError, match="give the link"):
        run_plan(str(directory), "--ue-profile", str(paths["ue"]), "--edge-profile", str(paths["edge"]))
