"""``seam fleet --registry URL``: the edge servers announced in a registry, with the load each reported, ranked
as a UE would choose among them (by reported step time: this command measures no round trip)."""

from __future__ import annotations

import argparse

from seam.runtime.registry import check_registry_url
from seam.runtime.shell import checked, number


def add_fleet_parser(commands) -> None:
    parser = commands.add_parser("fleet", help="list the edge servers of a registry and their load")
    parser.add_argument("--registry", required=True, metavar="http://HOST:2379", type=checked(check_registry_url))
    parser.add_argument("--timeout", type=number(float, 0, above=True), default=5.0, help="seconds (default 5)")
    parser.set_defaults(handler=run_fleet, extra="fleet")


def run_fleet(args: argparse.Namespace) -> int:
    from seam.planning.fleet import EdgeOffer, rank_edges
    from seam.runtime.registry import Registry
    from seam.runtime.shell import table

    entries = {entry["address"]: entry for entry in Registry(args.registry, args.timeout).edges()}
    if not entries:
        print(f"no edge server is announced in the registry at {args.registry}")
        return 0
    offers = [EdgeOffer.from_load(address, 0.0, entry.get("load") or {}) for address, entry in entries.items()]
    ranked = rank_edges(offers) + [offer for offer in offers if offer.draining]
    rows = []
    for offer in ranked:
        entry = entries[offer.address]
        free = "-" if offer.free_kv_bytes is None else f"{offer.free_kv_bytes / 2**20:.0f}"
        rows.append([offer.address, str(offer.sessions), f"{1e3 * offer.step_s:.2f}", free,
                     "draining" if offer.draining else "serving", str(entry.get("fingerprint", "?"))[:12],
                     ",".join(map(str, entry.get("splits", [])))])
    print(table(["edge", "sessions", "step ms", "free KV MiB", "state", "artifact", "splits"], rows))
    return 0
