"""``seam plan DIR``: predicts every split's latency from a UE profile, an edge profile and a link, per bandwidth.

Prints one table per link (per-token latency and time to first token, each broken into UE, uplink, edge and
downlink time), marks the best split, and can plot the breakdown and the best split against bandwidth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seam.runtime.shell import comma_list, number, require_extra, table
from seam.planning.cost_model import DeviceModel, Link, LinkPlan, check_pair, plan
from seam.planning.schema import DeviceProfile, LinkProfile, load
from seam.runtime.artifact import Artifact
from seam.runtime.errors import SeamError
from seam.runtime.files import write_atomically

_positive = comma_list(float, positive=True)  # bandwidths in Mbit/s


def add_plan_parser(commands) -> None:
    parser = commands.add_parser("plan", help="predict each split's latency from device and link profiles")
    parser.add_argument("directory", type=Path, help="the artifact both profiles were measured with")
    parser.add_argument("--ue-profile", type=Path, required=True, help="device profile of the UE (seam profile)")
    parser.add_argument("--edge-profile", type=Path, required=True, help="device profile of the edge")
    parser.add_argument("--bandwidth", type=_positive, default=[], metavar="MBIT[,MBIT...]",
                        help="link bandwidths to plan for, Mbit/s (down, and up unless --uplink-bandwidth)")
    parser.add_argument("--uplink-bandwidth", type=_positive, metavar="MBIT[,MBIT...]",
                        help="uplink Mbit/s: one value for every --bandwidth, or one per bandwidth")
    parser.add_argument("--rtt", type=number(float, 0), metavar="MS", help="round-trip time in ms (with --bandwidth)")
    parser.add_argument("--link", type=Path, action="append", default=[], metavar="LINKPROFILE",
                        help="a link profile from 'seam probe' (repeatable), instead of or besides --bandwidth")
    parser.add_argument("--context", type=number(int, 1), default=512,
                        help="prompt length and past length (default 512)")
    parser.add_argument("--batch", type=number(int, 1), default=1, help="sequences per step (default 1)")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also draw the plan to this PNG file")
    parser.set_defaults(handler=run_plan)


def _links(args: argparse.Namespace) -> dict[str, Link]:
    links: dict[str, Link] = {}
    if args.bandwidth:
        if args.rtt is None:
            raise SeamError("--bandwidth needs --rtt (the round-trip time in ms)")
        uplinks = args.uplink_bandwidth or [None]
        if len(uplinks) == 1:
            uplinks = uplinks * len(args.bandwidth)
        if len(uplinks) != len(args.bandwidth):
            raise SeamError(f"--uplink-bandwidth lists {len(uplinks)} values for {len(args.bandwidth)} bandwidths")
        for down, up in zip(args.bandwidth, uplinks):
            link = Link.from_mbit(down, args.rtt, up)
            links[link.label] = link
    elif args.uplink_bandwidth or args.rtt is not None:
        raise SeamError("--uplink-bandwidth and --rtt go with --bandwidth")
    for path in args.link:
        link = Link.from_profile(load(path, LinkProfile))
        links[f"{link.label} ({path.name})"] = link
    if not links:
        raise SeamError("give the link: --bandwidth MBIT[,MBIT...] with --rtt MS, or --link LINKPROFILE")
    return links


def checked_device(path: Path, fingerprint: str, split_points: list[int]) -> DeviceModel:
    """The cost model of the profile at ``path``, refused unless it was measured on this artifact."""
    profile = load(path, DeviceProfile)
    if profile.key.artifact_fingerprint != fingerprint:
        raise SeamError(
            f"{path} was measured with artifact {profile.key.artifact_fingerprint[:12]}, not this one "
            f"({fingerprint[:12]}); measure it again with 'seam profile' on this artifact"
        )
    model = DeviceModel.from_profile(profile)
    if model.split_points != split_points:
        raise SeamError(f"{path} splits at {model.split_points} but the artifact at {split_points}")
    return model


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def plan_table(link_plan: LinkPlan, private: LinkPlan | None = None) -> str:
    """One link's costs by split; with ``private``, the same link priced with the head on the UE (private
    output), whose per-token total is a column of its own."""
    all_local = max(cost.split for cost in link_plan.costs)  # split L: nothing crosses the link
    rows = []
    for index, cost in enumerate(link_plan.costs):
        row = [str(cost.split)]
        for step in (cost.decode, cost.prefill):
            if cost.split == all_local:
                row += [_ms(step.ue_s), "-", "-", "-", _ms(step.total_s)]
            else:
                row += [_ms(part) for part in (step.ue_s, step.uplink_s, step.edge_s, step.downlink_s, step.total_s)]
        if private is not None:
            row.append(_ms(private.costs[index].decode.total_s) + (" *" if cost.split == private.best else ""))
        row.append("<- best" if cost.split == link_plan.best else "")
        rows.append(row)
    headers = ["split", "UE", "up", "edge", "down", "total", "UE", "up", "edge", "down", "total",
               *(["per token"] if private is not None else []), ""]
    groups = [("", 1), ("per token (decode)", 5), ("first token (prefill)", 5),
              *([("private output", 1)] if private is not None else []), ("", 1)]
    return table(headers, rows, groups=groups)


def run_plan(args: argparse.Namespace) -> int:
    if args.plot:
        require_extra("plot")
    links = _links(args)
    # Planning reads only the manifest; hashing every weight file here would cost minutes on a large model.
    artifact = Artifact.open(args.directory, verify=False)
    artifact.check_context(args.context, f"--context {args.context}")
    fingerprint = artifact.manifest.artifact_fingerprint
    ue = checked_device(args.ue_profile, fingerprint, artifact.split_points)
    edge = checked_device(args.edge_profile, fingerprint, artifact.split_points)
    check_pair(ue, edge)
    for side, model, path in (("UE", ue, args.ue_profile), ("edge", edge, args.edge_profile)):
        for line in model.beyond_measured(args.context, args.batch):
            print(f"warning: {side} profile {path.name}: {line}; the prediction is extrapolated "
                  "(profile with longer --prefill-lengths, --past-lengths or --batches to measure it)",
                  file=sys.stderr)
    plans = plan(ue, edge, links, args.context, args.batch)
    # Private output (the head on the UE, hidden states back) priced beside, where the artifact can serve it.
    private = plan(ue, edge, links, args.context, args.batch, private_output=True) if artifact.manifest.head \
        else [None] * len(plans)
    print(f"UE {ue.key.device} ({ue.key.provider}), edge {edge.key.device} ({edge.key.provider}), "
          f"{artifact.num_layers} layers {ue.key.dtype}; context {args.context}, batch {args.batch}")
    for link_plan, private_plan in zip(plans, private):
        print(f"\n{link_plan.name}, rtt {link_plan.link.rtt_s * 1e3:g} ms: times in ms; "
              "layers [0, split) on the UE; totals include the rtt"
              + ("; private output: the head on the UE (* its best split)" if private_plan else ""))
        print(plan_table(link_plan, private_plan))
    print()
    for link_plan, private_plan in zip(plans, private):
        print(f"best split at {link_plan.name}: {link_plan.best}")
    for private_plan in filter(None, private):
        print(f"best split with private output at {private_plan.name}: {private_plan.best}")
    if args.plot:
        plot(plans, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def plot(plans: list[LinkPlan], path: Path) -> None:
    figure = plan_figure(plans)
    write_atomically(path, lambda out: figure.savefig(out, format="png", dpi=110), binary=True)


def plan_figure(plans: list[LinkPlan]):
    """Per-token latency and time to first token of every split at every bandwidth, each line's best split
    marked; the latency parts of each split at the middle bandwidth; and the best split per bandwidth."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_rate = sorted(plans, key=lambda p: p.link.down_bytes_per_s)
    figure = Figure(figsize=(12, 8.5), layout="constrained")
    FigureCanvasAgg(figure)  # Agg draws without a display and without touching pyplot's global state
    (decode, prefill), (parts, best) = figure.subplots(2, 2)
    splits = [cost.split for cost in by_rate[0].costs]
    for axes, phase, title in ((decode, "decode", "per-token latency"), (prefill, "prefill", "time to first token")):
        for link_plan in by_rate:
            totals = [getattr(cost, phase).total_s * 1e3 for cost in link_plan.costs]
            line, = axes.plot(splits, totals, marker=".", label=link_plan.name)
            lowest = min(range(len(totals)), key=totals.__getitem__)
            axes.plot(splits[lowest], totals[lowest], marker="*", markersize=14, color=line.get_color(),
                      markeredgecolor="black")
        axes.set(title=f"{title} (star: the best split for that link)", xlabel="split (layers on the UE)",
                 ylabel="ms", xticks=splits)
        axes.set_yscale("log")
        axes.legend(fontsize="small", title="link")
    _parts(parts, by_rate[(len(by_rate) - 1) // 2], splits)
    rates = [p.link.down_mbit for p in by_rate]
    best.plot(rates, [p.best for p in by_rate], marker="o")
    best.set(title="best split for per-token latency", xlabel="bandwidth, Mbit/s (down)",
             ylabel="split (layers on the UE)", yticks=splits, ylim=(min(splits) - 0.5, max(splits) + 0.5))
    if len(rates) > 1 and rates[-1] / rates[0] > 20:
        best.set_xscale("log")
    best.set_xticks(rates, [f"{rate:g}" for rate in rates], minor=False)
    best.minorticks_off()
    return figure


def _parts(axes, shown: LinkPlan, splits: list[int]) -> None:
    """Stacked bars: where each split's per-token time goes over one link, its best split marked."""
    bottom = [0.0] * len(splits)
    for label, name in (("UE", "ue_s"), ("uplink", "uplink_s"), ("rtt", "rtt_s"), ("edge", "edge_s"),
                        ("downlink", "downlink_s")):
        heights = [getattr(cost.decode, name) * 1e3 for cost in shown.costs]
        axes.bar(splits, heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    axes.annotate("best", (shown.best, bottom[splits.index(shown.best)]), xytext=(0, 4), textcoords="offset points",
                  ha="center", fontweight="bold")
    axes.set(title=f"per-token latency by part at {shown.name}", xlabel="split (layers on the UE)", ylabel="ms",
             xticks=splits)
    axes.set_ylim(top=max(bottom) * 1.35)  # headroom so the legend does not cover the bars
    axes.legend(ncols=3, loc="upper left", fontsize="small")
