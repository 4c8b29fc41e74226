"""``imago audit``: verify every settled epoch of a Vault against the chain.

    imago audit --vault ADDRESS [--matcher URL] [--from-epoch N] [--json] [--chain ...]
    imago audit ... --escrow ADDRESS    [--key-file PATH] [--receipts PATH]   # a client
    imago audit ... --provider ADDRESS  [--key-file PATH] [--receipts PATH]   # a GPU owner

Anyone can run the first form. With ``--escrow`` (``--provider``) it also fetches that
party's own per-job records, which the matcher serves only to the escrow's spend key (a
node key of the provider), and checks them against the receipts the party kept.

Keys, by default: for an escrow, the spend key of `imago gateway` (``STATE/spend.key``,
STATE = ``--state-dir`` or ``$IMAGO_HOME/client``; its passphrase in
``$IMAGO_SPEND_PASSPHRASE``) or else the one `imago escrow open` made
(``$IMAGO_HOME/keys/spend-….json``), whichever the escrow names on-chain; for a provider,
the node's keystore (``STATE/node_keys.json``, STATE = ``--state-dir`` or
``$IMAGO_HOME/node``). ``--key-file`` takes any of those three formats. Receipts, by
default: ``STATE/receipts.jsonl``.

Exit code 0 only when everything matches; 1 otherwise, naming the first mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from contracts.chain.cli import add_chain_args

    p = subparsers.add_parser(
        "audit",
        help="verify every settled epoch against the chain",
        description="Fetch the matcher's published ledger, recompute every leaf, root and "
        "total, and compare them with the Vault, Escrow and Provider contracts on-chain. "
        "Exit code 0 only when everything matches.",
    )
    p.add_argument("--vault", help="the Vault to audit (default: the stack's)")
    p.add_argument("--matcher", help="the matcher's URL (default: the stack's, or loopback)")
    p.add_argument(
        "--from-epoch", type=int, default=1, metavar="N", help="audit epochs N.. (default 1)"
    )
    party = p.add_mutually_exclusive_group()
    party.add_argument("--escrow", metavar="ADDRESS", help="also check this escrow's own records")
    party.add_argument(
        "--provider", metavar="ADDRESS", help="also check this provider's own records"
    )
    p.add_argument(
        "--key-file",
        type=Path,
        help="the party's key: a spend key (PEM or `imago escrow` keystore) or a node keystore",
    )
    p.add_argument("--passphrase-env", metavar="VAR", help="the key file's passphrase is in VAR")
    p.add_argument(
        "--receipts", type=Path, help="the party's receipt log (default: STATE/receipts.jsonl)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="the party's state dir (default $IMAGO_HOME/client or $IMAGO_HOME/node)",
    )
    p.add_argument(
        "--no-history",
        action="store_true",
        help="do not read the Vault's transactions (older roots are then checked against "
        "the operator-signed commits only)",
    )
    add_chain_args(p)
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from contracts.chain.cli import run_async

    return run_async(_audit(args))


async def _audit(args: argparse.Namespace) -> int:
    from client.audit import AuditError, LiveSource, run_audit
    from client.cli import DEFAULT_MATCHER, load_stack_config
    from contracts.chain.cli import CliError, open_chain
    from contracts.chain.units import UnitsError, parse_address

    config = load_stack_config()
    try:
        vault_arg = args.vault or config.get("vault")
        if not vault_arg:
            raise CliError("give --vault (the Vault to audit)")
        vault = parse_address(vault_arg).to_str(is_user_friendly=False)
        matcher = args.matcher or config.get("matcher_url") or DEFAULT_MATCHER
        async with open_chain(args) as chain:
            source = LiveSource(matcher, chain, vault)
            try:
                party = await _party(args, source, vault)
                report = await run_audit(
                    source,
                    vault,
                    matcher=matcher,
                    from_epoch=args.from_epoch,
                    party=party,
                    history=not args.no_history,
                )
            finally:
                await source.close()
    except (AuditError, CliError, UnitsError) as e:
        if args.json:
            print(json.dumps({"ok": False, "error": str(e)}))
            return 1
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print(report.render())
    return 0 if report.ok else 1


async def _party(args: argparse.Namespace, source: Any, vault: str) -> Any:
    """The --escrow / --provider party with its key and receipts, or None."""
    from pytoniq_core import Address

    from client.audit import Party, load_receipt_log
    from client.keys import PASSPHRASE_ENV
    from contracts.chain.cli import CliError
    from contracts.chain.units import parse_address
    from protocol.home import client_dir, key_file, node_dir, node_keystore, spend_key_file

    if not (args.escrow or args.provider):
        for flag in ("key_file", "receipts"):
            if getattr(args, flag):
                raise CliError(f"--{flag.replace('_', '-')} needs --escrow or --provider")
        return None
    kind = "escrow" if args.escrow else "provider"
    address = parse_address(args.escrow or args.provider).to_str(is_user_friendly=False)
    state_dir = Path(args.state_dir or (client_dir() if args.escrow else node_dir())).expanduser()
    passphrase = _passphrase(args.passphrase_env)

    if kind == "escrow":
        data = await source.escrow(address)
        if data is None:
            raise CliError(f"no Escrow contract at {address}")
        if data.vault.to_str(is_user_friendly=False) != vault:
            other = data.vault.to_str(is_user_friendly=False)
            raise CliError(f"escrow {address} pays another vault ({other})")
        wanted = {data.spend_key.to_bytes(32, "big")}
        if args.key_file:
            candidates = [(args.key_file, passphrase)]
        else:
            legacy = (
                f"spend-{Address(vault).hash_part.hex()[:16]}-{data.owner.hash_part.hex()[:16]}"
            )
            candidates = [
                (spend_key_file(state_dir), passphrase or os.environ.get(PASSPHRASE_ENV) or None),
                (key_file(legacy), passphrase),  # where `imago escrow open` kept it before
            ]
        what = "the escrow's spend key"
    else:
        data = await source.provider(address)
        if data is None:
            raise CliError(f"no Provider contract at {address}")
        wanted = {k.to_bytes(32, "big") for k in (data.node_key, data.prev_key) if k}
        candidates = [(args.key_file or node_keystore(state_dir), passphrase)]
        what = "the provider's node key (current or previous)"

    key = None
    tried = []
    for path, secret in candidates:
        if not Path(path).exists() and not args.key_file:
            continue
        candidate = load_party_key(Path(path), secret)
        public = candidate.public_key().public_bytes_raw()
        if public in wanted:
            key = candidate
            break
        tried.append(f"{path} holds {public.hex()[:16]}…")
    if key is None:
        looked = ", ".join(str(p) for p, _ in candidates)
        names = "; ".join(tried) or f"no key file in {looked}"
        expected = next(iter(wanted)).hex()[:16]
        hint = "" if args.key_file else "; give --key-file"
        raise CliError(f"no key for {what} ({expected}…): {names}{hint}")

    receipts_path = args.receipts or state_dir / "receipts.jsonl"
    receipts = None
    warnings: list[str] = []
    if args.receipts or receipts_path.exists():
        try:
            receipts, warnings = load_receipt_log(receipts_path)
        except OSError as e:
            raise CliError(f"cannot read the receipt log {receipts_path}: {e}") from None
    return Party(
        kind=kind,
        address=address,
        key=key,
        receipts=receipts,
        receipts_path=str(receipts_path) if receipts is not None else None,
        receipt_warnings=warnings,
    )


def _passphrase(var: str | None) -> str | None:
    from contracts.chain.cli import CliError

    if not var:
        return None
    value = os.environ.get(var)
    if value is None:
        raise CliError(f"--passphrase-env {var}: that environment variable is not set")
    return value


def load_party_key(path: Path, passphrase: str | None) -> Any:
    """An ed25519 private key from any keystore (``protocol.keystore`` reads every
    format: the gateway's spend key, a node keystore, a role key)."""
    from contracts.chain.cli import CliError
    from protocol import keystore

    try:
        keys, _ = keystore.load(path, passphrase)
    except keystore.KeystoreError as e:
        raise CliError(str(e)) from None
    return keys.ed25519
