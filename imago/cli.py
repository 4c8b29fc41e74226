"""The `imago` command: one table of every command and the party that owns it.

A party's module is imported only when one of its commands runs (as vLLM's CLI does),
so `imago --help` loads no party at all and `imago chat --help` loads only the client's
command module. Each module exposes ``register(subparsers)``, which adds the commands
the table gives it; modules keep their heavy imports inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (owning module, one-line help); the order is the order of `imago --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("imago.stack", "start the whole system on loopback"),
    "down": ("imago.stack", "stop everything `imago up` started"),
    "chat": ("client.cli", "ask one question through the gateway"),
    "gateway": ("client.cli", "run the OpenAI-compatible gateway on loopback"),
    "escrow": ("client.escrow_cli", "a client's credits for a vault"),
    "audit": ("client.audit_cli", "verify every settled epoch against the chain"),
    "node": ("node.cli", "run a provider node"),
    "provider": ("node.provider_cli", "a GPU node's stake and registration"),
    "matcher": ("marketplace.cli", "the marketplace matcher"),
    "vault": ("marketplace.vault_cli", "a marketplace operator's vault"),
    "devnet": ("contracts.chain.devnet_cli", "run the local TON devnet"),
    "wallet": ("contracts.chain.devnet_cli", "wallets (v5r1) and their keystores"),
    "registry": ("contracts.chain.registry_cli", "the Registry: governance, params, allowlists"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with ``command``'s module loaded; every other command is listed by its
    help line only (enough for `imago --help` and for argparse to name a typo)."""
    parser = argparse.ArgumentParser(
        prog="imago", description="Imago: confidential inference settled in TON"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(subparsers)
    for name, (_, help_line) in COMMANDS.items():
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=help_line)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
