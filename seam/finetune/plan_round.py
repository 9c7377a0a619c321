"""``seam plan-round SETUP.json --out PLAN.json``: FedsLLM's plan of a federated round, each UE's cut layer and
band share, from a setup file; ``ue_client DIR train --plan PLAN.json --name NAME`` then trains at the UE's cut
with its link held to the share's rate by the transport's rate limiter.

The setup file (per-layer seconds are per training sample, forward and backward; 3x a profiled prefill of the
same length is a fair first guess):

    {"bandwidth_mhz": 20, "noise_dbm_per_hz": -174, "iterations": 10, "min_cut": 1,
     "edge_layer_s": [...], "cut_bytes": [...], "adapter_bytes": [...],
     "ues": [{"name": "phone-1", "layer_s": [...], "samples": 8, "gain_db": -100, "power_dbm": 23}, ...]}

``cut_bytes[K]`` is what one sample sends across a cut at layer K (entry 0 is not used but must be positive),
``adapter_bytes[i]`` the size of layer i's adapter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from seam.runtime.errors import SeamError
from seam.runtime.files import write_atomically


def read_setup_file(path: Path, command: str, build):
    """``build(setup)`` of the JSON setup at ``path``; one line on what is wrong with a file that cannot be read or
    a setup ``build`` finds malformed, naming the ``command`` whose --help lists its fields."""
    try:
        return build(json.loads(path.read_text()))
    except OSError as error:
        raise SeamError(f"cannot read the setup {path}: {error.strerror or error}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise SeamError(f"the setup {path} is malformed ({type(error).__name__}: {error}); see seam {command} "
                        "--help for its fields") from None


def read_setup(path: Path):
    return read_setup_file(path, "plan-round", _fedsllm_setup)


def _fedsllm_setup(setup: dict):
    from seam.finetune.fedsllm import FedsllmSetup

    ues = setup["ues"]
    return [ue["name"] for ue in ues], FedsllmSetup(
        ue_layer_s=np.array([ue["layer_s"] for ue in ues], float),
        edge_layer_s=np.array(setup["edge_layer_s"], float),
        cut_bits=8 * np.array(setup["cut_bytes"], float),
        adapter_bits=8 * np.array(setup["adapter_bytes"], float),
        samples=np.array([ue["samples"] for ue in ues], float),
        gains=10 ** (np.array([ue["gain_db"] for ue in ues], float) / 10),
        powers_w=10 ** ((np.array([ue["power_dbm"] for ue in ues], float) - 30) / 10),
        noise_w_per_hz=10 ** ((float(setup["noise_dbm_per_hz"]) - 30) / 10),
        bandwidth_hz=float(setup["bandwidth_mhz"]) * 1e6,
        iterations=float(setup["iterations"]),
        min_cut=int(setup.get("min_cut", 1)),
    )


def add_plan_round_parser(commands) -> None:
    parser = commands.add_parser("plan-round", help="plan a federated fine-tuning round: each UE's cut and bandwidth",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setup", type=Path, help="the round's setup (JSON, see above)")
    parser.add_argument("--common-cut", action="store_true", help="one cut for every UE, as FedAvg over identical "
                                                                  "client models needs")
    parser.add_argument("--out", type=Path, default=Path("plan.json"))
    parser.set_defaults(handler=run_plan_round, extra="allocation")


def run_plan_round(args: argparse.Namespace) -> int:
    from seam.runtime.shell import table
    from seam.finetune.allocation import rate_bps
    from seam.finetune.fedsllm import equal_shares, plan

    names, setup = read_setup(args.setup)
    if len(set(names)) != len(names):
        raise SeamError("every UE of the setup needs its own name")
    chosen = plan(setup, common_cut=args.common_cut)
    equal = equal_shares(setup, chosen.cuts)
    rates = rate_bps(chosen.shares, setup.bandwidth_hz, setup.k_hz) / 1e6
    ues = [{"name": name, "cut": int(cut), "share": float(share), "rate_mbit": float(rate), "delay_s": float(delay)}
           for name, cut, share, rate, delay in zip(names, chosen.cuts, chosen.shares, rates, chosen.delays_s)]
    write_atomically(args.out, lambda out: out.write(json.dumps(
        {"round_s": chosen.round_s, "equal_shares_round_s": equal.round_s, "ues": ues}, indent=1) + "\n"))
    print(table(["UE", "cut", "band share", "Mbit/s", "delay s"],
                [[ue["name"], str(ue["cut"]), f"{ue['share']:.3f}", f"{ue['rate_mbit']:.2f}", f"{ue['delay_s']:.2f}"]
                 for ue in ues]))
    print(f"round {chosen.round_s:.2f} s against {equal.round_s:.2f} s with equal shares at the same cuts; "
          f"plan: {args.out}")
    return 0


def planned(path: Path, name: str) -> dict:
    """This UE's row of a ``seam plan-round`` plan."""
    try:
        rows = {row["name"]: row for row in json.loads(path.read_text())["ues"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SeamError(f"cannot read the plan {path} ({type(error).__name__}: {error}); write it with seam "
                        "plan-round") from None
    if name not in rows:
        raise SeamError(f"the plan {path} has no UE named {name!r}; it plans {', '.join(rows)}")
    return rows[name]
