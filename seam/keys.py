"""``seam keys DIR --name NAME``: creates a CURVE key pair for an edge server or a UE.

The edge keeps its NAME.key_secret and gives NAME.key to its UEs; each UE does the same, and the edge admits
only the UE public keys found in its ``--allow`` directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_keys_parser(commands) -> None:
    parser = commands.add_parser("keys", help="create a CURVE key pair (NAME.key, NAME.key_secret)")
    parser.add_argument("directory", type=Path, help="where to write the two files")
    parser.add_argument("--name", required=True, help="file name stem, e.g. 'edge' or 'jetson-01'")
    parser.set_defaults(handler=run_keys)


def run_keys(args: argparse.Namespace) -> int:
    from seam.runtime.transport import generate_keypair

    public, secret = generate_keypair(args.directory, args.name)
    print(f"public key: {public}  (give it to the peer: UEs pass the edge's as --server-key, the edge lists UE keys in --allow)")
    print(f"secret key: {secret}  (keep it on this machine; pass it as --curve-secret)")
    return 0
