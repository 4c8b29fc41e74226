"""The `imago` command: one entry point whose subcommands each party registers.

Each party's package exposes ``register(subparsers)`` in its own CLI module; this
dispatcher loads them by name, so that no party's library code imports another's.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "contracts.cli_chain",  # devnet, wallet
    "contracts.cli_roles",  # registry, provider, escrow, vault
    "marketplace.cli",  # matcher
    "node.cli",  # node
    "client.commands",  # client serve, chat
    "client.stack",  # up, down: the whole system on loopback
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imago", description="Imago: confidential inference settled in TON"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
