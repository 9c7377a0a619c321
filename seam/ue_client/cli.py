"""``ue_client DIR --server ... --split K --prompt ...``: streams generated text to stdout, a summary to stderr."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from seam.runtime.codecs import CODECS
from seam.runtime.errors import SeamError
from seam.runtime.impairments import parse as parse_impairment
from seam.runtime.ort_options import providers_for
from seam.runtime.sampling import SamplingParams
from seam.runtime.addresses import check_servers
from seam.runtime.registry import check_registry_url
from seam.runtime.shell import CommandParser, add_log_level, checked, configure_logging, number, run_cli
from seam.runtime.traces import load_trace
from seam.runtime.emulation import EmulatedLink
from seam.runtime.transport import TransportConfig, TransportTimeout
from seam.ue_client.chatting import converse

CHAT_LENGTH = 2048  # positions a conversation may grow to, within the model's context


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="ue_client",
        description="Generate text with the tail on an edge server ('ue_client DIR train --help': split fine-tuning; "
                    "'ue_client serve DIR --help': an OpenAI-compatible HTTP endpoint).")
    parser.add_argument("artifact", type=Path)
    add_split_flags(parser)
    _add_text_flags(parser)
    add_log_level(parser, "warning")
    return parser


def add_split_flags(parser: argparse.ArgumentParser) -> None:
    """Where the edge is, how the work is split and moved, and how hidden states cross: every way of
    generating on this device takes these (``ue_client`` and ``ue_client serve``)."""
    parser.add_argument("--server", default="tcp://127.0.0.1:5555", type=checked(check_servers),
                        help="the edge server, or several as A,B,...: sessions open on the one predicted fastest "
                             "and move to the next best if it is lost or shuts down")
    parser.add_argument("--registry", default=None, metavar="http://HOST:2379", type=checked(check_registry_url),
                        help="find the edge servers in this etcd registry instead of --server")
    parser.add_argument("--split", type=number(int, 0), default=None, help="layers run on this device (default: half)")
    parser.add_argument("--timeout", type=number(float, 0, above=True), default=30.0,
                        help="seconds to wait for any reply")
    parser.add_argument("--threads", type=number(int, 1), default=None)
    parser.add_argument("--variant", default=None,
                        help="this device's blocks: the export dtype (default), or int8 from 'seam export "
                             "--quantize-ue int8' (about twice as fast on a CPU, a little less accurate)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where this device runs its blocks (cuda needs onnxruntime-gpu, e.g. on a Jetson)")
    parser.add_argument("--fallback-local", action="store_true",
                        help="generate on this device if the edge is down, or finish here if it stops answering")
    parser.add_argument("--allow-token-upload", action="store_true", help="permit --split 0 (sends token ids)")
    parser.add_argument("--private-output", action="store_true",
                        help="keep the final norm, the LM head and sampling on this device: the edge returns the "
                             "last layer's hidden states and sees no generated token, logit or sampling setting")
    _add_policy_flags(parser)
    parser.add_argument("--codec", default="fp32", choices=list(CODECS),
                        help="how hidden states cross the link (falls back, with a warning, to one the edge has)")
    parser.add_argument("--impair", default=None, metavar="SPEC",
                        help="research: corrupt the hidden states at the cut, erasure:P or awgn:SNR_DB")
    parser.add_argument("--impair-seed", type=number(int, 0), default=0)
    parser.add_argument("--ue-slowdown", type=number(float, 1), default=1.0,
                        help="emulate a device this many times slower than this one, its profile scaled alike "
                             "(demos and benchmarks on one machine)")
    parser.add_argument("--curve-secret", type=Path, default=None, help="this UE's NAME.key_secret")
    parser.add_argument("--server-key", type=Path, default=None, help="the server's public NAME.key")


def _add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """How the split (and the codec) moves during a generation, and what it may cost."""
    parser.add_argument("--policy", choices=["static", "cost-model", "planner", "learned"], default=None,
                        help="how the split (and with a quality budget the codec) moves during a generation: "
                             "planner and learned maximise a reward of speed and quality, learned with a policy "
                             "from seam train-policy (default: cost-model when both profiles are found, else static)")
    parser.add_argument("--policy-file", type=Path, default=None,
                        help="the planner's and learned policy's file (default: DIR/policies/learned)")
    parser.add_argument("--ue-profile", type=Path, default=None,
                        help="this device's profile (default: its cached 'seam profile' in the artifact)")
    parser.add_argument("--edge-profile", type=Path, default=None, help="the edge's profile, copied from the edge")
    parser.add_argument("--link-profile", type=Path, default=None, help="a 'seam probe' profile to start the link estimate from")
    parser.add_argument("--min-ue-layers", type=number(int, 0), default=1,
                        help="layers that always stay on this device (default 1; 0 needs --allow-token-upload)")
    parser.add_argument("--max-token-recovery", type=number(float, 0, 1), default=None, metavar="SHARE",
                        help="the split (given or chosen by a policy) stays at cuts where the attacks of 'seam "
                             "analyze --privacy' recovered at most this share of the input tokens from the hidden "
                             "states, sent uncoded (e.g. 0.1)")
    parser.add_argument("--privacy-report", type=Path, default=None, metavar="JSON",
                        help="the 'seam analyze --privacy' result to read (default: the one in DIR/analysis)")
    parser.add_argument("--ue-memory-mb", type=number(float, 0, above=True), default=None,
                        help="memory budget for weights and KV on this device")
    parser.add_argument("--link-trace", type=Path, default=None,
                        help="emulate a link following this CSV trace (t_s,up_mbit,down_mbit,rtt_ms) on top of the real one")
    parser.add_argument("--max-ppl-increase", type=number(float, 0), default=None, metavar="PCT",
                        help="the quality budget: the cost-model policy (with --quality) sends each split's hidden "
                             "states in the codec with the fewest bytes whose measured perplexity increase stays "
                             "within PCT %%; planner and learned never pick a (split, codec) predicted beyond it")
    parser.add_argument("--quality", type=Path, default=None,
                        help="a 'seam analyze' result of this artifact (planner and learned: check the budget "
                             "against it instead of the policy file's predictions)")


def _add_text_flags(parser: argparse.ArgumentParser) -> None:
    """What to ask, and how the answer is sampled and ended."""
    parser.add_argument("--prompt", default=None,
                        help="what to ask; a chat model gets it as a user turn of its chat template")
    parser.add_argument("--chat", action="store_true",
                        help="a conversation: the prompt (if any), then each line of standard input, the earlier "
                             "turns kept in the caches of both sides")
    parser.add_argument("--system", default=None, help="a system turn before the prompt (chat models)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat template")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end the answer where this text appears (not written; may be given several times)")
    parser.add_argument("--max-new-tokens", type=number(int, 1), default=32, help="per answer (default 32)")
    parser.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=number(int, 0), default=0)
    parser.add_argument("--top-p", type=number(float, 0, 1, above=True), default=1.0)
    parser.add_argument("--seed", type=number(int, 0), default=0)


def run(args: argparse.Namespace) -> int:
    from seam.runtime.artifact import Artifact
    from seam.runtime.text import load_tokenizer
    from seam.ue_client.display import TextStream

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    artifact = Artifact.open(args.artifact)
    split = checked_split(args, artifact)  # before the network: a wrong split is no network error
    variant = artifact.check_variant(args.variant)
    if args.private_output:
        artifact.check_private_output()
    providers_for(args.device)
    tokenizer = load_tokenizer(artifact)
    eos = artifact.manifest.tokenizer.get("eos_token_id")
    prompt_ids = checked_prompt(args, artifact, tokenizer)
    stream = TextStream(tokenizer, eos, sys.stdout, tuple(args.stop))
    policy, prior = choose_policy(args, artifact)
    impairment = parse_impairment(args.impair) if args.impair else None
    try:
        client = open_client(args, artifact, variant, prior)
    except TransportTimeout:
        if not args.fallback_local or args.chat:
            raise
        print(f"ue_client: edge server at {args.server} unreachable; generating locally", file=sys.stderr)
        return generate_locally(artifact, args, variant, prompt_ids, sampling, stream)
    for warning in client.warnings:
        print(f"ue_client: warning: {warning}", file=sys.stderr)
    with client, client.session(split, sampling, args.allow_token_upload, args.fallback_local,
                                args.private_output) as session:
        session.impairment, session.impairment_rng = impairment, np.random.default_rng(args.impair_seed)
        if args.chat:
            converse(session, args, eos, min(artifact.context_length or CHAT_LENGTH, CHAT_LENGTH), policy)
        else:
            answer(session, prompt_ids, args.max_new_tokens, policy, stream)
    return 0


def open_client(args: argparse.Namespace, artifact, variant: str, prior, pool=None):
    """An ``EdgeClient`` connected as the split flags say (``pool``: the blocks of another client to share)."""
    from seam.ue_client.client import EdgeClient

    emulated = EmulatedLink(load_trace(args.link_trace)) if args.link_trace else None
    return EdgeClient(artifact, args.server, TransportConfig(timeout_s=args.timeout), args.threads, args.curve_secret,
                      args.server_key, prior, emulated, args.ue_slowdown, args.codec, variant, args.device, pool,
                      args.registry)


def checked_prompt(args: argparse.Namespace, artifact, tokenizer) -> list[int] | None:
    """The prompt's token ids, checked against the model's context; None for a conversation, which reads its
    turns as they come."""
    from seam.runtime.chat import encode_prompt

    if args.chat:
        if args.raw:
            raise SeamError("--chat converses through the model's chat template; drop --raw")
        return None
    if args.prompt is None:
        raise SeamError("give --prompt, or --chat to converse")
    prompt_ids = encode_prompt(artifact, tokenizer, args.prompt, args.system, args.raw)
    if not prompt_ids:
        raise SeamError("--prompt encodes to no tokens; give some text")
    artifact.check_context(len(prompt_ids) + args.max_new_tokens,
                           f"the prompt ({len(prompt_ids)} tokens) and --max-new-tokens {args.max_new_tokens}")
    return prompt_ids


def answer(session, prompt_ids: list[int], max_new_tokens: int, policy, stream) -> None:
    """Streams one answer, a live status line on a terminal, and the summary of where the time went."""
    from seam.ue_client.display import StatusLine, summary

    status = StatusLine(sys.stderr, session.num_layers)
    for tokens in session.generate([prompt_ids], max_new_tokens, policy):
        status.update(session)
        if not stream.push(tokens):
            break
    stream.end()
    status.finish()
    print(summary(session, session.client.socket), file=sys.stderr)


def generate_locally(artifact, args: argparse.Namespace, variant: str, prompt_ids: list[int],
                     sampling: SamplingParams, stream) -> int:
    """Every layer on this device, for ``--fallback-local`` when the edge cannot be reached."""
    from seam.runtime.executor import SessionPool
    from seam.ue_client.local import local_tokens

    pool = SessionPool(artifact, args.threads, args.device)
    for tokens in local_tokens(pool, variant, prompt_ids, args.max_new_tokens, sampling):
        if not stream.push(tokens):
            break
    stream.end()
    return 0


def private_splits(args: argparse.Namespace, artifact) -> tuple[int, ...] | None:
    """The splits ``--max-token-recovery`` leaves, from the privacy analysis; None without the flag."""
    from seam.planning.privacy import read_privacy, splits_within_recovery

    if args.max_token_recovery is None:
        if args.privacy_report is not None:
            raise SeamError("--privacy-report goes with --max-token-recovery: the analysis and the share it allows")
        return None
    path = args.privacy_report or _only_privacy_report(artifact)
    report = read_privacy(path, artifact.manifest.artifact_fingerprint)
    # Uncoded hidden states: what an edge learns most from, whatever codec a policy switches to later.
    return splits_within_recovery(report["cells"], args.max_token_recovery, num_layers=artifact.num_layers)


def _only_privacy_report(artifact) -> Path:
    """The privacy analysis ``seam analyze --privacy`` wrote into the artifact, when it wrote exactly one."""
    found = sorted((artifact.root / "analysis").glob("privacy-*.json"))
    if len(found) != 1:
        raise SeamError(f"{artifact.root / 'analysis'} holds {len(found) or 'no'} privacy analyses; name the one to "
                        "follow with --privacy-report, or write one with 'seam analyze DIR --privacy'")
    return found[0]


def checked_split(args: argparse.Namespace, artifact) -> int:
    """The split to start at: ``--split``, else the artifact's middle one, or with ``--max-token-recovery``
    the first split at or past it that the privacy analysis allows; refused in one line when it is no split
    point or gives the edge more than the share allowed."""
    allowed = private_splits(args, artifact)
    split = args.split if args.split is not None else artifact.default_split
    artifact.check_split(split, args.allow_token_upload)
    if allowed is not None and split not in allowed:
        if args.split is not None:
            raise SeamError(f"at split {split} the privacy analysis recovers more than {args.max_token_recovery:g} "
                            f"of the input tokens; choose one of {list(allowed)}")
        split = min(cut for cut in allowed if cut >= split)
    return split


def choose_policy(args: argparse.Namespace, artifact):
    """The split policy (None = static) and the link prior the arguments ask for, refusing half a cost model."""
    from seam.planning.cost_model import Link
    from seam.planning.loading import cached_profile, device_models
    from seam.planning.policy import Constraints, CostModelPolicy
    from seam.planning.schema import LinkProfile, load

    prior = Link.from_profile(load(args.link_profile, LinkProfile)) if args.link_profile else None
    if args.policy == "static" and (args.quality is not None or args.max_ppl_increase is not None):
        raise SeamError("--quality and --max-ppl-increase choose codecs for the other policies, not --policy static")
    if args.policy == "static":
        return None, prior
    ue_path = args.ue_profile or cached_profile(artifact, args.threads, args.variant, args.device)
    if ue_path is None or args.edge_profile is None:
        if args.policy is not None or args.quality is not None or args.max_ppl_increase is not None:
            missing = "--edge-profile" if ue_path else "--ue-profile (or run 'seam profile' on this device)"
            raise SeamError(f"the {args.policy or 'cost-model'} policy (and a quality budget with it) needs both "
                            f"device profiles; give {missing}")
        return None, prior
    if args.min_ue_layers == 0 and not args.allow_token_upload:
        raise SeamError("--min-ue-layers 0 lets the policy send token ids; it needs --allow-token-upload")
    ue, edge = device_models(artifact, ue_path, args.edge_profile, args.ue_slowdown)
    memory = None if args.ue_memory_mb is None else int(args.ue_memory_mb * 2**20)
    constraints = Constraints(args.min_ue_layers, memory, private_splits(args, artifact))
    if args.policy in ("learned", "planner"):
        return learned_policy(args, artifact, ue, edge, constraints), prior
    return CostModelPolicy(ue, edge, constraints, quality=quality_budget(args)), prior


def learned_policy(args: argparse.Namespace, artifact, ue, edge, constraints):
    """``--policy learned`` or ``planner`` from its policy file, checking the budget against a measured
    analysis when ``--quality`` gives one."""
    from seam.planning.learned import LearnedPolicy, PolicyFile
    from seam.planning.loading import read_analysis

    policy = PolicyFile.load(args.policy_file or artifact.root / "policies" / "learned")
    if policy.artifact_fingerprint != artifact.manifest.artifact_fingerprint:
        raise SeamError(f"the policy {policy.root} was trained for another artifact than {artifact.root}; "
                        "train it again with seam train-policy")
    budget = math.inf if args.max_ppl_increase is None else args.max_ppl_increase
    measured = read_analysis(args.quality).increase_pct if args.quality else None
    return LearnedPolicy(ue, edge, policy, args.policy == "planner", constraints, budget, measured)


def quality_budget(args: argparse.Namespace):
    """The quality budget ``--quality`` and ``--max-ppl-increase`` give, or None without them."""
    from seam.planning.loading import read_analysis

    if (args.quality is None) != (args.max_ppl_increase is None):
        raise SeamError("--quality and --max-ppl-increase go together: the analysis and the increase it may cost")
    if args.quality is None:
        return None
    return read_analysis(args.quality, args.max_ppl_increase)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, "ue_client")
    return run_cli("ue_client", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
