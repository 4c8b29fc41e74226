"""`imago escrow ...`: a client's credits for a vault.

`open` pays, by default, from the spend key `imago gateway` signs with
(``$IMAGO_HOME/client/spend.key``, made if missing, encrypted with
``$IMAGO_SPEND_PASSPHRASE`` if set) and records the escrow and vault beside it
(``escrow.json``), where the gateway finds them. The other commands find the escrow of
this wallet and vault from that key (or from a spend key an earlier version kept in
``$IMAGO_HOME/keys``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pytoniq_core import Address

from client.keys import PASSPHRASE_ENV, load_or_create_spend_key, public_bytes, spend_public_key
from contracts.chain import addresses, getters, operations
from contracts.chain.cli import (
    CliError,
    add_common_args,
    emit,
    friendly,
    hex32,
    load_deployment,
    open_chain,
    open_wallet,
    run_async,
    run_operation,
    save_deployment,
    trace_summary,
    vault_of,
)
from contracts.chain.units import format_ton, parse_address, parse_ton
from protocol import keystore
from protocol.home import client_dir, escrow_record, key_file, spend_key_file

# ----------------------------------------------------------------- escrow


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir).expanduser() if args.state_dir else client_dir()


def _gateway_key(args: argparse.Namespace, *, create: bool) -> tuple[bytes | None, Path]:
    """The public spend key of the gateway's keystore (made if ``create`` and missing)."""
    path = spend_key_file(_state_dir(args))
    passphrase = os.environ.get(PASSPHRASE_ENV) or None
    if path.exists():
        return spend_public_key(path, passphrase), path
    if not create:
        return None, path
    return public_bytes(load_or_create_spend_key(path, passphrase)), path


def _legacy_key(vault: Address, owner: Address) -> bytes | None:
    """A spend key `imago escrow open` kept in $IMAGO_HOME/keys before it used the
    gateway's: still honoured, so an escrow opened then can be closed now."""
    path = key_file(f"spend-{vault.hash_part.hex()[:16]}-{owner.hash_part.hex()[:16]}")
    if not path.exists():
        return None
    return keystore.read_info(path).ed25519_public


async def _escrow_address(
    args: argparse.Namespace, client: Any, owner: Address
) -> tuple[Address, Address, int]:
    vault = vault_of(args)
    if getattr(args, "address", None):
        return parse_address(args.address), vault, 0
    keys = [k for k in (_gateway_key(args, create=False)[0], _legacy_key(vault, owner)) if k]
    if not keys:
        raise CliError(
            f"no spend key in {_state_dir(args)}: open an escrow with `imago escrow open`, "
            "or give --address"
        )
    v = await getters.get_vault_data(client, vault)
    candidates = [
        addresses.escrow_address(vault, owner, int.from_bytes(k, "big"), v.escrow_close_delay)
        for k in keys
    ]
    for escrow in candidates:
        if (await client.get_address_information(escrow)).state != "uninitialized":
            return escrow, vault, v.escrow_close_delay
    return candidates[0], vault, v.escrow_close_delay


def _record_escrow(
    args: argparse.Namespace, escrow: Address, vault: Address, owner: Address, public: bytes
) -> Path | None:
    """Note the escrow beside the gateway's spend key if ``public`` is that key."""
    key, _ = _gateway_key(args, create=False)
    if key != public:
        return None
    path = escrow_record(_state_dir(args))
    record = {
        "escrow": escrow.to_str(is_user_friendly=False),
        "vault": vault.to_str(is_user_friendly=False),
        "owner": owner.to_str(is_user_friendly=False),
        "spend_key": public.hex(),
        "chain": args.chain,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


async def _escrow_open(args: argparse.Namespace) -> int:
    vault = vault_of(args)
    amount = parse_ton(args.amount)
    async with open_chain(args) as client:
        owner = open_wallet(args, client)
        if args.spend_key:
            public = hex32(args.spend_key, "--spend-key")
            key_path = None
        else:
            public, key_path = _gateway_key(args, create=True)
            assert public is not None
        v = await getters.get_vault_data(client, vault)
        escrow, trace = await run_operation(
            "opening the escrow",
            operations.escrow_open,
            owner,
            vault,
            public,
            amount,
            v.escrow_close_delay,
        )
        e = await getters.get_escrow_data(client, escrow)
    dep = load_deployment(required=False)
    if dep is not None:
        dep.escrows[
            f"{owner.address.to_str(is_user_friendly=False)}/{vault.to_str(is_user_friendly=False)}"
        ] = escrow.to_str(is_user_friendly=False)
        save_deployment(dep)
    record = _record_escrow(args, escrow, vault, owner.address, public)
    data = {
        "escrow": friendly(args, escrow),
        "vault": friendly(args, vault),
        "spend_key": public.hex(),
        "spend_key_file": str(key_path) if key_path else None,
        "escrow_record": str(record) if record else None,
        **_escrow_json(e),
        **trace_summary(trace),
    }

    def human() -> str:
        text = _escrow_human(args, escrow, e)
        if record:
            text += f"\n`imago gateway` pays from it (recorded in {record})"
        return text

    emit(args, data, human)
    return 0


def _escrow_json(e: getters.EscrowData) -> dict[str, Any]:
    return {
        "state": e.state_name,
        "deposited": format_ton(e.deposited, unit=False),
        "charged": format_ton(e.charged, unit=False),
        "available": format_ton(e.available, unit=False),
        "balance": format_ton(e.balance, unit=False),
        "unlock_time": e.unlock_time,
    }


def _escrow_human(args: argparse.Namespace, escrow: Address, e: getters.EscrowData) -> str:
    lines = [
        f"escrow {friendly(args, escrow)}: {e.state_name}",
        f"deposited {format_ton(e.deposited)}, charged {format_ton(e.charged)}, "
        f"available {format_ton(e.available)}",
        f"balance {format_ton(e.balance)}",
    ]
    if e.state_name == "closing":
        lines.append(f"the rest can be withdrawn from {e.unlock_time} (unix)")
    return "\n".join(lines)


async def _escrow_op(args: argparse.Namespace, op: str) -> int:
    async with open_chain(args) as client:
        owner = open_wallet(args, client)
        escrow, _, _ = await _escrow_address(args, client, owner.address)
        before = await owner.balance()
        if op == "deposit":
            trace = await run_operation(
                "depositing", operations.escrow_deposit, owner, escrow, parse_ton(args.amount)
            )
        elif op == "close":
            trace = await run_operation("closing", operations.escrow_close, owner, escrow)
        else:
            trace = await run_operation("withdrawing", operations.escrow_withdraw, owner, escrow)
        e = await getters.get_escrow_data(client, escrow)
        after = await owner.balance()
    data = {"escrow": friendly(args, escrow), **_escrow_json(e), **trace_summary(trace)}
    if op == "withdraw":
        data["returned"] = format_ton(max(0, after - before), unit=False)

    def human() -> str:
        text = _escrow_human(args, escrow, e)
        if op == "withdraw":
            text += f"\nreturned to the owner: about {format_ton(max(0, after - before))}"
        return text

    emit(args, data, human)
    return 0


async def _escrow_status(args: argparse.Namespace) -> int:
    async with open_chain(args) as client:
        owner = open_wallet(args, client) if not args.address else None
        escrow, _, _ = await _escrow_address(
            args, client, owner.address if owner else Address("0:" + "00" * 32)
        )
        info = await client.get_address_information(escrow)
        if info.state != "active":
            raise CliError(
                f"escrow {friendly(args, escrow)} is not deployed ({info.state}); "
                "open it with `imago escrow open`"
            )
        e = await getters.get_escrow_data(client, escrow)
    data = {"escrow": friendly(args, escrow), **_escrow_json(e)}
    emit(args, data, lambda: _escrow_human(args, escrow, e))
    return 0


def _state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="the gateway's state dir, where its spend key is (as given to `imago gateway "
        "--state-dir`; default $IMAGO_HOME/client)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """`imago escrow open|deposit|close|withdraw|status`."""
    esc = subparsers.add_parser("escrow", help="a client's credits for a vault")
    es = esc.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = es.add_parser("open", help="deploy the escrow with a first deposit")
    add_common_args(p)
    p.add_argument("--amount", required=True, metavar="TON")
    p.add_argument(
        "--spend-key",
        help="client spend public key, hex (default: the key `imago gateway` signs with, "
        f"made now if missing; ${PASSPHRASE_ENV} encrypts it)",
    )
    p.add_argument("--vault")
    _state_arg(p)
    p.set_defaults(func=lambda a: run_async(_escrow_open(a)))
    for name, helptext in (
        ("deposit", "buy credits"),
        ("close", "start the close delay"),
        ("withdraw", "after the close delay, take the rest back"),
        ("status", "deposited, charged, available"),
    ):
        p = es.add_parser(name, help=helptext)
        add_common_args(p)
        if name == "deposit":
            p.add_argument("amount", metavar="TON")
        p.add_argument("--vault")
        p.add_argument("--address", help="escrow address (default: this wallet's for the vault)")
        _state_arg(p)
        if name == "status":
            p.set_defaults(func=lambda a: run_async(_escrow_status(a)))
        else:
            p.set_defaults(func=lambda a, op=name: run_async(_escrow_op(a, op)))
