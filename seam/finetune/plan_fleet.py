"""``seam plan-fleet SETUP.json --out PLAN.json``: DASHF's plan for training UEs over a fleet of edge servers: which
edge each UE trains with, its band share and rate, how much of the later layers' training its edge takes on, and
the round delay that predicts; ``ue_client DIR train --plan PLAN.json --name NAME`` then trains on the UE's planned
edge, its link held to the planned rate, and says how long its rounds took against the prediction.

The setup file names each edge by its address (per-round FLOPs and FLOP/s as the DASHF model counts them; a
profile's training timings give a device's speed):

    {"noise_dbm_per_hz": -174, "delay_weight": 1, "energy_weight": 1, "offload_gain": 1,
     "edges": [{"address": "tcp://edge-a:5555", "flops": 5e12, "bandwidth_mhz": 20, "capacity": 4}, ...],
     "ues": [{"name": "phone-1", "gain_db": [-90, -105], "power_dbm": 23, "upload_bytes": 2e6,
              "local_flop": 4e11, "server_flop": 2e12, "top_flops": 2e11, "energy_coeff": 1e-28,
              "quality": 1}, ...]}

``gain_db`` lists the UE's channel gain to each edge, in the order of ``edges``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from seam.runtime.errors import SeamError
from seam.runtime.files import write_atomically
from seam.runtime.shell import number


def read_fleet_setup(path: Path):
    """(UE names, edge addresses, ``DashfSetup``) from a setup file; one line on what is wrong with a bad one."""
    from seam.finetune.plan_round import read_setup_file

    return read_setup_file(path, "plan-fleet", _dashf_setup)


def _dashf_setup(setup: dict):
    from seam.finetune.dashf import DashfSetup

    edges, ues = setup["edges"], setup["ues"]

    def per_ue(key: str) -> np.ndarray:
        return np.array([ue[key] for ue in ues], float)

    return [ue["name"] for ue in ues], [edge["address"] for edge in edges], DashfSetup(
        gains=10 ** (np.array([ue["gain_db"] for ue in ues], float) / 10),
        powers_w=10 ** ((per_ue("power_dbm") - 30) / 10), upload_bits=8 * per_ue("upload_bytes"),
        local_flop=per_ue("local_flop"), server_flop=per_ue("server_flop"), top_flops=per_ue("top_flops"),
        energy_coeff=per_ue("energy_coeff"), quality=per_ue("quality"),
        server_flops=np.array([edge["flops"] for edge in edges], float),
        bandwidth_hz=np.array([edge["bandwidth_mhz"] for edge in edges], float) * 1e6,
        capacity=np.array([edge["capacity"] for edge in edges]),
        noise_w_per_hz=10 ** ((float(setup["noise_dbm_per_hz"]) - 30) / 10),
        delay_weight=float(setup.get("delay_weight", 1.0)), energy_weight=float(setup.get("energy_weight", 1.0)),
        offload_gain=float(setup.get("offload_gain", 1.0)),
    )


def add_plan_fleet_parser(commands) -> None:
    parser = commands.add_parser("plan-fleet", help="assign training UEs to the fleet's edges (DASHF)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setup", type=Path, help="the fleet's setup (JSON, see above)")
    parser.add_argument("--seed", type=number(int, 0), default=0, help="seeds the solver's randomised rounding")
    parser.add_argument("--out", type=Path, default=Path("plan.json"))
    parser.set_defaults(handler=run_plan_fleet, extra="allocation")


def run_plan_fleet(args: argparse.Namespace) -> int:
    from seam.finetune.allocation import rate_bps
    from seam.finetune.dashf import dinkelbach, evaluate, plain, strongest
    from seam.runtime.shell import table

    names, addresses, setup = read_fleet_setup(args.setup)
    if len(set(names)) != len(names) or len(set(addresses)) != len(addresses):
        raise SeamError("every UE of the setup needs its own name, and every edge its own address")
    result = dinkelbach(setup, np.random.default_rng(args.seed))
    chosen = result.allocation
    outcome = evaluate(setup, chosen)
    nearest = evaluate(setup, plain(setup, strongest(setup)))  # each UE on its strongest edge, shares equal
    rows = np.arange(len(names))
    k_hz = chosen.powers_w * setup.gains[rows, chosen.server] / setup.noise_w_per_hz
    rates = rate_bps(chosen.shares, setup.bandwidth_hz[chosen.server], k_hz) / 1e6
    ues = [{"name": name, "server": addresses[server], "share": float(share), "rate_mbit": float(rate),
            "offload": float(offload), "delay_s": float(delay)}
           for name, server, share, rate, offload, delay in zip(names, chosen.server, chosen.shares, rates,
                                                                chosen.offload, outcome.delay_s)]
    plan = {"method": "dashf", "ratio": result.ratio, "strongest_edge_ratio": nearest.ratio, "ues": ues}
    write_atomically(args.out, lambda out: out.write(json.dumps(plan, indent=1) + "\n"))
    print(table(["UE", "edge", "band share", "Mbit/s", "offloaded", "delay s"],
                [[ue["name"], ue["server"], f"{ue['share']:.3f}", f"{ue['rate_mbit']:.2f}", f"{ue['offload']:.2f}",
                  f"{ue['delay_s']:.2f}"] for ue in ues]))
    print(f"service-cost ratio {result.ratio:.4g} against {nearest.ratio:.4g} with every UE on its strongest edge "
          f"and equal shares; plan: {args.out}")
    return 0
