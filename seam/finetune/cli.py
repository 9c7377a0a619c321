"""``ue_client DIR train --server ADDR --data FILE``: split fine-tuning from the UE's side, against an
``edge_server DIR --train``. Shows a progress bar with the loss, then writes the adapter of the whole model in
peft format, the losses (JSON) and a loss curve (PNG) to ``--out``."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from seam.runtime.errors import SeamError
from seam.runtime.protocol import TRAINING_MODES
from seam.runtime.addresses import check_address
from seam.runtime.shell import (CommandParser, add_log_level, bar_disabled, checked, configure_logging, has,
                                missing_extra, number, require_extra, run_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="ue_client DIR train", description=__doc__)
    parser.add_argument("artifact", type=Path, help="the exported artifact (its source model is what trains)")
    parser.add_argument("--server", default=None, type=checked(check_address),
                        help="edge_server address, e.g. tcp://10.0.0.2:5555 (or the one a 'seam plan-fleet' plan "
                             "assigns this UE)")
    parser.add_argument("--data", type=Path, required=True,
                        help="UTF-8 text, one sample per line (or .jsonl of {\"text\": ...})")
    parser.add_argument("--cut", type=number(int, 1), default=None,
                        help="layers trained here (default: half the model)")
    parser.add_argument("--mode", choices=TRAINING_MODES, default="edge-loss",
                        help="edge-loss: the labels go to the edge, which computes the loss; u-shaped: the head and "
                             "the labels stay here (default edge-loss)")
    parser.add_argument("--steps", type=number(int, 1), default=100, help="optimizer steps (per round, with --job)")
    parser.add_argument("--job", default="", help="train with the other UEs of this job: the edge's adapters are "
                                                  "shared, this device's are averaged with theirs every round")
    parser.add_argument("--rounds", type=number(int, 1), default=1, help="federated rounds (with --job)")
    parser.add_argument("--job-size", type=number(int, 0), default=0,
                        help="UEs every round of the job waits for, so that none starts without the slow starters "
                             "(default: those training in it; a round still closes at edge_server --round-timeout)")
    parser.add_argument("--name", default="", help="this UE's name in the edge's logs (default host and pid)")
    parser.add_argument("--round-wait", type=number(float, 0, above=True), default=600.0,
                        help="seconds to wait for a round's average after uploading")
    parser.add_argument("--batch", type=number(int, 1), default=4)
    parser.add_argument("--max-length", type=number(int, 2), default=128,
                        help="tokens per sample (longer ones are cut)")
    parser.add_argument("--lr", type=number(float, 0, 1, above=True), default=1e-3)
    parser.add_argument("--weight-decay", type=number(float, 0, 1), default=0.0)
    parser.add_argument("--rank", type=number(int, 1), default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=number(float, 0, above=True), default=16.0, help="LoRA alpha")
    parser.add_argument("--seed", type=number(int, 0), default=0,
                        help="seeds the adapters' initialisation and the data order")
    parser.add_argument("--out", type=Path, default=None, help="where the adapter goes (default DIR/adapters/split)")
    parser.add_argument("--plan", type=Path, default=None,
                        help="a 'seam plan-round' plan: train at this UE's (--name) cut, the link held to its rate; "
                             "or a 'seam plan-fleet' plan: train on the edge it assigns this UE, at its rate")
    parser.add_argument("--rate-mbit", type=number(float, 0, above=True), default=None,
                        help="hold this UE's link to this rate both ways (the transport's rate limiter)")
    parser.add_argument("--checkpoint-every", type=number(int, 0), default=0, metavar="STEPS",
                        help="write both sides' adapters and optimizer states every STEPS steps to OUT.checkpoint")
    parser.add_argument("--resume", action="store_true", help="carry on from OUT.checkpoint (same settings and data)")
    parser.add_argument("--timeout", type=number(float, 0, above=True), default=60.0,
                        help="seconds to wait for any reply")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_log_level(parser, "warning")
    return parser


def checked_plan(args: argparse.Namespace, num_layers: int) -> tuple[int, float | None, dict]:
    """The cut and link rate to train at, from the flags or the ``--plan``, and the plan's row of this UE ({}
    without one); refuses flags that do not go together. A fleet plan sets the edge (``args.server``) and the
    rate, and leaves the cut to ``--cut``."""
    from seam.finetune.plan_round import planned

    if args.rounds > 1 and not args.job:
        raise SeamError("--rounds are federated rounds: give the --job this UE trains in")
    if args.job and (args.resume or args.checkpoint_every):
        raise SeamError("checkpoints cover runs without --job for now; a federated run restarts from its rounds")
    cut, rate_mbit, row = args.cut if args.cut is not None else num_layers // 2, args.rate_mbit, {}
    if args.plan is not None:
        if not args.name or args.rate_mbit is not None:
            raise SeamError("--plan sets the rate (and the cut or the edge) of the UE it names: give --name, not "
                            "--rate-mbit")
        row = planned(args.plan, args.name)
        if "server" in row:  # a fleet plan: the edge is the plan's
            if args.server is not None and args.server != row["server"]:
                raise SeamError(f"the plan assigns {args.name} to {row['server']}, not {args.server}; leave "
                                "--server out")
            args.server = row["server"]
        elif args.cut is not None:
            raise SeamError("--plan sets the cut of the UE it names: give --name, not --cut")
        cut, rate_mbit = row.get("cut", cut), row["rate_mbit"]
    if args.server is None:
        raise SeamError("give the edge to train with: --server tcp://HOST:PORT, or a 'seam plan-fleet' --plan")
    if rate_mbit is not None and not rate_mbit > 0:
        raise SeamError(f"the link rate must be positive, got {rate_mbit!r} Mbit/s")
    return cut, rate_mbit, row


def train_round(args: argparse.Namespace, trainer, data, losses: list[float], number: int, checkpoints: Path,
                settings: dict) -> None:
    """Round ``number``: the steps not yet in ``losses``, checkpointed as asked, then the job's average."""
    from tqdm import tqdm

    from seam.finetune.adapters import split_weights, trained_weights, training_state
    from seam.finetune.checkpoint import Checkpoint, save_checkpoint

    label = f"round {number + 1}/{args.rounds}" if args.job else "train"
    done = len(losses) - number * args.steps
    with tqdm(total=args.steps, initial=done, unit="step", disable=bar_disabled(args.quiet), file=sys.stderr,
              desc=label) as bar:
        for step in range(done, args.steps):
            losses.append(trainer.step(next(data)))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                save_checkpoint(checkpoints, settings, Checkpoint(step + 1, losses, {
                    "ue": training_state(trainer.model, trainer.optimizer),
                    "edge": split_weights(trainer.edge.adapter(optimizer=True))}))
    if args.job:
        average = trainer.edge.federate(number, args.steps * args.batch, trained_weights(trainer.model),
                                        args.round_wait)
        trainer.load(split_weights(average))
        dropped = f"; dropped out: {', '.join(average.dropped)}" if average.dropped else ""
        print(f"ue_client: {label}: loss {losses[-1]:.4f}; averaged with {len(average.averaged)} UEs "
              f"({', '.join(average.averaged)}){dropped}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from seam.finetune.adapters import save_adapter, split_weights, trained_weights
    from seam.finetune.checkpoint import load_checkpoint
    from seam.finetune.data import batches, read_samples, tokenize
    from seam.finetune.ue import SplitTrainer
    from seam.runtime.artifact import Artifact
    from seam.runtime.text import load_tokenizer
    from seam.runtime.emulation import EmulatedLink
    from seam.runtime.traces import LinkState, Trace
    from seam.runtime.transport import TransportConfig
    from seam.ue_client.client import EdgeClient

    artifact = Artifact.open(args.artifact)
    cut, rate_mbit, planned_row = checked_plan(args, artifact.num_layers)
    if not has("matplotlib"):  # said now, not after the training
        print(f"ue_client: note: no loss.png without matplotlib ({missing_extra('matplotlib')})", file=sys.stderr)
    # The data is read and checked before anything reaches the edge.
    sequences = tokenize(read_samples(args.data), load_tokenizer(artifact), args.max_length)
    data = batches(sequences, args.batch, artifact.manifest.tokenizer["pad_token_id"], args.seed)
    out = args.out or artifact.root / "adapters" / "split"
    checkpoints = out.with_name(f"{out.name}.checkpoint")
    settings = {"cut": cut, "mode": args.mode, "rank": args.rank, "alpha": args.alpha, "lr": args.lr,
                "weight_decay": args.weight_decay, "seed": args.seed, "batch": args.batch,
                "max_length": args.max_length, "data_sha256": hashlib.sha256(args.data.read_bytes()).hexdigest()}
    resumed = load_checkpoint(checkpoints, settings) if args.resume else None
    if resumed and resumed.step >= args.steps:
        raise SeamError(f"the checkpoint is at step {resumed.step} already; give more --steps to carry on")
    losses: list[float] = resumed.losses if resumed else []
    for _ in range(len(losses)):
        next(data)  # the batches the checkpoint has trained on, in their seeded order
    limited = EmulatedLink(Trace((0.0,), (LinkState(rate_mbit, rate_mbit, 0.0),))) if rate_mbit else None
    with EdgeClient(artifact, args.server, TransportConfig(timeout_s=args.timeout), emulated=limited) as client:
        trainer = SplitTrainer(artifact, client, cut, args.mode, args.rank, args.alpha, args.lr, args.weight_decay,
                               args.seed, args.job, args.name or f"{socket.gethostname()}-{os.getpid()}",
                               (resumed.parts["ue"], resumed.parts["edge"]) if resumed else None, args.job_size)
        rounds_s = []
        for number in range(args.rounds):
            started = time.perf_counter()
            train_round(args, trainer, data, losses, number, checkpoints, settings)
            rounds_s.append(time.perf_counter() - started)
        edge_weights = split_weights(trainer.edge.adapter())
        stats = trainer.edge.close()

    def beside(directory: Path) -> None:
        (directory / "losses.json").write_text(json.dumps({"cut": cut, "mode": args.mode, "losses": losses}) + "\n")
        if has("matplotlib"):
            plot_losses(losses, directory / "loss.png", f"split fine-tuning at cut {cut} ({args.mode})")

    save_adapter(artifact, out, [trained_weights(trainer.model), edge_weights], args.rank, args.alpha, args.seed,
                 beside)
    limit = f"; link held to {rate_mbit:.2f} Mbit/s" if rate_mbit else ""
    print(f"ue_client: {len(losses)} steps at cut {cut}/{artifact.num_layers} ({args.mode}); loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f}; edge compute {stats['edge_compute_s']:.2f} s{limit}\nue_client: adapter: {out}",
          file=sys.stderr)
    if "delay_s" in planned_row:
        measured = statistics.median(rounds_s)
        print(f"ue_client: a round took {measured:.2f} s (median of {len(rounds_s)}) on {args.server}; the plan "
              f"predicted {planned_row['delay_s']:.2f} s ({measured / planned_row['delay_s']:.2f}x)", file=sys.stderr)
    return 0


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    loss_figure(losses, title).savefig(path, dpi=110)


def loss_figure(losses: list[float], title: str):
    """The loss of every step, steps counted in whole numbers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.plot(range(1, len(losses) + 1), losses)
    axes.set(xlabel="step", ylabel="loss", title=title)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    axes.grid(alpha=0.3)
    return figure


def main(argv: list[str] | None = None) -> int:
    """``ue_client DIR train ...``, given ``[DIR, ...]``."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(args.log_level, "ue_client train")

    def train() -> int:
        for extra in ("finetune", "allocation") if args.plan else ("finetune",):
            require_extra(extra)
        return run(args)

    return run_cli("ue_client train", train)


if __name__ == "__main__":
    sys.exit(main())
