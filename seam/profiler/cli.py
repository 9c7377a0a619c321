"""``seam profile``, ``seam probe`` and ``seam traces``: measure a device or a link and write a profile file,
or write the shipped link traces."""

from __future__ import annotations

import argparse
from pathlib import Path

from seam.runtime.errors import SeamError
from seam.runtime.addresses import check_address
from seam.runtime.shell import checked, comma_list, number, require_extra


_numbers = comma_list(int)


def _add_gap_option(parser) -> None:
    parser.add_argument("--gap-ms", type=number(float, 0), default=None,
                        help="idle time before each measurement, as each side of a split idles between its steps "
                             "(default 20)")


def _gap_s(args: argparse.Namespace) -> float:
    from seam.profiler.measure import IDLE_GAP_S

    if args.gap_ms is None:
        return IDLE_GAP_S
    return args.gap_ms / 1e3


def add_profile_parser(commands) -> None:
    parser = commands.add_parser("profile", help="measure every block of an artifact on this device")
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=number(int, 1), default=None,
                        help="onnxruntime threads (default: --cpus count or cores)")
    parser.add_argument("--cpus", type=_numbers, default=None, help="pin to these CPUs, e.g. 0,1 (a weaker UE)")
    parser.add_argument("--variant", default=None, help="block variant to measure, e.g. int8 (default: export dtype)")
    parser.add_argument("--batches", type=_numbers, default=None, help="decode batch sizes (default 1; cuda 1,4,16)")
    parser.add_argument("--prefill-lengths", type=_numbers, default=None, help="prompt lengths (default 1..512)")
    parser.add_argument("--past-lengths", type=_numbers, default=None, help="decode past lengths (default 0..2048)")
    parser.add_argument("--repeats", type=number(int, 1), default=10)
    parser.add_argument("--warmup", type=number(int, 0), default=2)
    _add_gap_option(parser)
    parser.add_argument("--training", action="store_true",
                        help="also time fine-tuning (a forward and backward with LoRA in PyTorch) of every block and "
                             "the head, which placing a training pipeline reads (needs the finetune extra)")
    parser.add_argument("--train-shapes", type=_shapes, default=((1, 64), (1, 256), (4, 64)),
                        help="with --training: micro-batch x sequence shapes to time (default 1x64,1x256,4x64)")
    parser.add_argument("--out", type=Path, default=None, help="also write the profile here")
    parser.add_argument("--force", action="store_true", help="measure again even when a cached profile exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_profile)


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        shapes = tuple(tuple(int(part) for part in item.lower().split("x")) for item in text.split(","))
    except ValueError:
        shapes = ()
    if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: give micro-batch x sequence shapes such as 1x64,4x256")
    return shapes


def _pin(cpus: tuple[int, ...]) -> None:
    import psutil

    process = psutil.Process()
    if not hasattr(process, "cpu_affinity"):
        raise SeamError("--cpus needs CPU affinity, which this system does not offer; use --threads alone")
    available = set(process.cpu_affinity())
    if not cpus or not set(cpus) <= available:
        raise SeamError(f"--cpus {','.join(map(str, cpus))} is not a subset of this process's CPUs {sorted(available)}")
    process.cpu_affinity(list(cpus))


def run_profile(args: argparse.Namespace) -> int:
    from seam.planning.loading import profile_key
    from seam.profiler.measure import DEFAULT_PAST_LENGTHS, DEFAULT_PREFILL_LENGTHS, Grid, profile_device
    from seam.planning.schema import DeviceProfile, load, save
    from seam.runtime.artifact import Artifact
    from seam.runtime.ort_options import default_threads, providers_for

    providers_for(args.device)
    artifact = Artifact.open(args.artifact)
    variant = args.variant or artifact.manifest.dtype
    known = sorted({name for block in artifact.manifest.blocks for name in block.variants})
    if variant not in known:
        raise SeamError(f"variant {variant!r} is not in this artifact; it has {', '.join(known)}")
    if args.cpus:
        _pin(args.cpus)
    threads = args.threads or (len(args.cpus) if args.cpus else default_threads())
    grid = Grid(
        prefill_lengths=args.prefill_lengths or DEFAULT_PREFILL_LENGTHS,
        past_lengths=args.past_lengths or DEFAULT_PAST_LENGTHS,
        batches=args.batches or ((1, 4, 16) if args.device == "cuda" else (1,)),
        repeats=args.repeats,
        warmup=args.warmup,
        gap_s=_gap_s(args),
        io_binding=args.device == "cuda",
    )
    cached = artifact.root / "profiles" / profile_key(artifact, args.device, threads, variant).file_name()
    profile = load(cached, DeviceProfile) if cached.is_file() and not args.force else None
    inference = {name: value for name, value in (profile.settings if profile else {}).items() if name != "training"}
    fresh = profile is None or inference != grid.settings()
    if fresh:
        profile = profile_device(artifact, args.device, threads, variant, grid, progress=not args.quiet)
    training = {"shapes": [list(shape) for shape in args.train_shapes], "repeats": min(args.repeats, 5)}
    if args.training and profile.settings.get("training") != training:
        profile, fresh = with_training(profile, artifact, threads, training, args.warmup), True
    if fresh:
        save(profile, cached)
        print(f"profile: {cached}")
    else:
        print(f"profile: {cached} (cached; --force measures again)")
    if args.out:
        save(profile, args.out)
        print(f"copied to {args.out}")
    print(summary(profile))
    return 0


def with_training(profile, artifact, threads: int, training: dict, warmup: int):
    """``profile`` with each block's and the head's fine-tuning timings measured on this device."""
    from dataclasses import replace

    require_extra("finetune")
    from seam.finetune.training_profile import measure_training

    blocks, head = measure_training(artifact, threads, [tuple(shape) for shape in training["shapes"]],
                                    training["repeats"], warmup)
    return replace(profile, blocks=[replace(block, train=blocks.get(tuple(block.layers), [])) for block in profile.blocks],
                   head_train=head, settings={**profile.settings, "training": training})


def summary(profile) -> str:
    from seam.runtime.shell import table

    rows = []
    for block in [profile.prelude, *profile.blocks]:
        longest = max(block.prefill, key=lambda timing: timing.length)
        decode = [timing for timing in block.decode if timing.batch == 1]
        shortest, farthest = min(decode, key=lambda t: t.length), max(decode, key=lambda t: t.length)
        rows.append([
            "prelude" if block.index < 0 else str(block.index),
            f"[{block.layers[0]}, {block.layers[1]})",
            f"{block.weight_bytes / 2**20:.1f}",
            f"{block.load_s:.2f}",
            f"{1e3 * longest.median_s:.2f} @ {longest.length}",
            f"{1e3 * shortest.median_s:.2f} @ {shortest.length}",
            f"{1e3 * farthest.median_s:.2f} @ {farthest.length}",
            *([_train_cell(block.train)] if profile.trained else []),
        ])
    headers = ["block", "layers", "weights MiB", "load s", "prefill ms @ len", "decode ms @ past", "decode ms @ past"]
    if profile.trained:
        headers.append("fine-tune ms @ batch x len")
        rows.append(["head", "-", "-", "-", "-", "-", "-", _train_cell(profile.head_train)])
    return table(headers, rows)


def _train_cell(timings) -> str:
    if not timings:
        return "-"
    largest = max(timings, key=lambda timing: timing.batch * timing.length)
    return f"{1e3 * largest.median_s:.2f} @ {largest.batch}x{largest.length}"


def add_probe_parser(commands) -> None:
    parser = commands.add_parser("probe", help="measure round trip and bandwidth to a running edge_server")
    parser.add_argument("server", type=checked(check_address), help="tcp://HOST:PORT of the edge_server")
    parser.add_argument("--out", type=Path, default=Path("link-profile.json"))
    parser.add_argument("--sizes", type=_numbers, default=None, help="payload bytes, e.g. 256,4096,1048576")
    parser.add_argument("--repeats", type=number(int, 1), default=7)
    _add_gap_option(parser)
    parser.add_argument("--timeout", type=number(float, 0, above=True), default=10.0,
                        help="seconds to wait for each reply")
    parser.add_argument("--curve-secret", type=Path, default=None, help="this UE's NAME.key_secret")
    parser.add_argument("--server-key", type=Path, default=None, help="the server's public NAME.key")
    parser.set_defaults(handler=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    from seam.profiler.probe import DEFAULT_SIZES, probe_link
    from seam.planning.schema import save
    from seam.runtime.transport import TransportConfig, UeSocket

    sizes = args.sizes or DEFAULT_SIZES
    if len(set(sizes)) < 2:
        raise SeamError("--sizes needs at least two different sizes to fit a bandwidth")
    socket = UeSocket(args.server, TransportConfig(timeout_s=args.timeout), args.curve_secret, args.server_key)
    try:
        link = probe_link(socket, sizes, args.repeats, _gap_s(args))
    finally:
        socket.close()
    save(link, args.out)
    print(f"link to {link.server}: round trip {1e3 * link.rtt_s:.3f} ms, "
          f"up {8 * link.up_bytes_per_s / 1e6:.1f} Mbit/s, down {8 * link.down_bytes_per_s / 1e6:.1f} Mbit/s")
    print(f"profile: {args.out}")
    return 0


def add_traces_parser(commands) -> None:
    parser = commands.add_parser("traces", help="write the shipped link traces (step, random walk, 4G, Wi-Fi), or "
                                                "seeded traces of one family")
    parser.add_argument("out", type=Path, help="directory for the CSV files")
    parser.add_argument("--seed", type=number(int, 0), default=0, help="the first seed")
    parser.add_argument("--family", default=None,
                        help="write --count traces of this family, FAMILY-SEED.csv (markov-fades, handovers, "
                             "starved-uplink, congestion, random-walk, 4g, wifi)")
    parser.add_argument("--count", type=number(int, 1), default=1)
    parser.set_defaults(handler=_run_traces)


def _run_traces(args) -> int:
    from seam.runtime.trace_families import family_trace
    from seam.runtime.traces import generate_traces, load_trace

    if args.family is None:
        paths = generate_traces(args.out, args.seed)
    else:
        seeds = range(args.seed, args.seed + args.count)
        paths = [family_trace(args.family, seed).save(args.out / f"{args.family}-{seed}.csv") for seed in seeds]
    for path in paths:
        trace = load_trace(path)
        print(f"{path}: {len(trace.times_s)} rows over {trace.duration_s:g} s")
    return 0
