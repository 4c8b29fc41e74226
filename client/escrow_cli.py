"""`imago escrow ...`: a client's credits for a vault."""

from __future__ import annotations

import argparse
from typing import Any

from pytoniq_core import Address

from contracts.chain import addresses, getters, operations
from contracts.chain.cli import (
    CliError,
    add_common_args,
    emit,
    friendly,
    hex32,
    load_deployment,
    load_or_create_key,
    open_chain,
    open_wallet,
    run_async,
    run_operation,
    save_deployment,
    trace_summary,
    vault_of,
    wallet_passphrase,
)
from contracts.chain.units import format_ton, parse_address, parse_ton

# ----------------------------------------------------------------- escrow


def escrow_key_name(vault: Address, owner: Address) -> str:
    """The role key (``$IMAGO_HOME/keys/<name>.json``) `imago escrow open` signs with."""
    return f"spend-{vault.hash_part.hex()[:16]}-{owner.hash_part.hex()[:16]}"


async def _escrow_address(
    args: argparse.Namespace, client: Any, owner: Address
) -> tuple[Address, Address, int]:
    vault = vault_of(args)
    if getattr(args, "address", None):
        return parse_address(args.address), vault, 0
    _, public, _ = load_or_create_key(escrow_key_name(vault, owner), wallet_passphrase(args))
    v = await getters.get_vault_data(client, vault)
    spend = int.from_bytes(public, "big")
    return (
        addresses.escrow_address(vault, owner, spend, v.escrow_close_delay),
        vault,
        v.escrow_close_delay,
    )


async def _escrow_open(args: argparse.Namespace) -> int:
    vault = vault_of(args)
    amount = parse_ton(args.amount)
    async with open_chain(args) as client:
        owner = open_wallet(args, client)
        if args.spend_key:
            public = hex32(args.spend_key, "--spend-key")
            key_path = None
        else:
            _, public, key_path = load_or_create_key(
                escrow_key_name(vault, owner.address), wallet_passphrase(args)
            )
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
    data = {
        "escrow": friendly(args, escrow),
        "vault": friendly(args, vault),
        "spend_key": public.hex(),
        "spend_key_file": str(key_path) if key_path else None,
        **_escrow_json(e),
        **trace_summary(trace),
    }
    emit(args, data, lambda: _escrow_human(args, escrow, e))
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """`imago escrow open|deposit|close|withdraw|status`."""
    # escrow
    esc = subparsers.add_parser("escrow", help="a client's credits for a vault")
    es = esc.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = es.add_parser("open", help="deploy the escrow with a first deposit")
    add_common_args(p)
    p.add_argument("--amount", required=True, metavar="TON")
    p.add_argument(
        "--spend-key", help="client spend public key, hex (default: a key in $IMAGO_HOME/keys)"
    )
    p.add_argument("--vault")
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
        if name == "status":
            p.set_defaults(func=lambda a: run_async(_escrow_status(a)))
        else:
            p.set_defaults(func=lambda a, op=name: run_async(_escrow_op(a, op)))
