"""`imago vault ...`: a marketplace operator's Vault."""

from __future__ import annotations

import argparse
from typing import Any

from pytoniq_core import Address

from contracts.chain import getters, operations
from contracts.chain.cli import (
    add_common_args,
    emit,
    friendly,
    hex32,
    load_deployment,
    load_or_create_key,
    open_chain,
    open_wallet,
    registry_of,
    run_async,
    run_operation,
    save_deployment,
    vault_of,
    wallet_passphrase,
)
from contracts.chain.units import format_ton, parse_ton

# ----------------------------------------------------------------- vault


async def _vault_deploy(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    if args.operator_key:
        public = hex32(args.operator_key, "--operator-key")
    else:
        _, public, _ = load_or_create_key("operator", wallet_passphrase(args))
    async with open_chain(args) as client:
        op = open_wallet(args, client)
        reg = await getters.get_registry_data(client, registry)
        stake = parse_ton(args.stake) if args.stake else reg.min_vault_stake
        vault = await run_operation(
            "deploying the vault",
            operations.deploy_vault,
            op,
            registry,
            public,
            stake,
            client=client,
        )
        v = await getters.get_vault_data(client, vault)
    dep = load_deployment(required=False)
    if dep is not None:
        dep.vaults[op.address.to_str(is_user_friendly=False)] = vault.to_str(is_user_friendly=False)
        save_deployment(dep)
    data = {"vault": friendly(args, vault), "operator_key": public.hex(), **_vault_json(args, v)}
    emit(args, data, lambda: _vault_human(args, vault, v))
    return 0


def _vault_json(args: argparse.Namespace, v: getters.VaultData) -> dict[str, Any]:
    return {
        "operator": friendly(args, v.operator),
        "operator_key": f"{v.operator_key:064x}",
        "stake": format_ton(v.stake, unit=False),
        "charged_in": format_ton(v.charged_in, unit=False),
        "paid_out": format_ton(v.paid_out, unit=False),
        "fees_accrued": format_ton(v.fees_accrued, unit=False),
        "fees_withdrawn": format_ton(v.fees_withdrawn, unit=False),
        "payable": format_ton(v.payable, unit=False),
        "last_epoch": v.last_epoch,
        "last_root": v.last_root.hex(),
        "committed_charged": format_ton(v.committed_charged, unit=False),
        "committed_paid": format_ton(v.committed_paid, unit=False),
        "committed_fees": format_ton(v.committed_fees, unit=False),
        "protocol_fee_bps": v.protocol_fee_bps,
        "escrow_close_delay": v.escrow_close_delay,
        "unbonding_delay": v.unbonding_delay,
        "unstaking": format_ton(v.unstaking, unit=False),
        "unlock_time": v.unlock_time,
        "balance": format_ton(v.balance, unit=False),
    }


def _vault_human(args: argparse.Namespace, vault: Address, v: getters.VaultData) -> str:
    return "\n".join(
        [
            f"vault {friendly(args, vault)} (operator {friendly(args, v.operator)})",
            f"stake {format_ton(v.stake)}, balance {format_ton(v.balance)}",
            f"charged in {format_ton(v.charged_in)}, paid out {format_ton(v.paid_out)}, "
            f"fees {format_ton(v.fees_accrued)} (withdrawn {format_ton(v.fees_withdrawn)})",
            f"last epoch {v.last_epoch}: committed charged {format_ton(v.committed_charged)}, "
            f"paid {format_ton(v.committed_paid)}, fees {format_ton(v.committed_fees)}",
            *(
                [f"unstaking {format_ton(v.unstaking)}, withdrawable from {v.unlock_time}"]
                if v.unstaking
                else []
            ),
        ]
    )


async def _vault_stake_op(args: argparse.Namespace, op: str) -> int:
    vault = vault_of(args)
    async with open_chain(args) as client:
        w = open_wallet(args, client)
        if op == "unstake":
            await run_operation(
                "unstaking", operations.vault_unstake, w, vault, parse_ton(args.amount)
            )
        else:
            await run_operation("withdrawing the stake", operations.vault_withdraw_stake, w, vault)
        v = await getters.get_vault_data(client, vault)
    data = {"vault": friendly(args, vault), **_vault_json(args, v)}
    emit(args, data, lambda: _vault_human(args, vault, v))
    return 0


async def _vault_status(args: argparse.Namespace) -> int:
    vault = vault_of(args)
    async with open_chain(args) as client:
        v = await getters.get_vault_data(client, vault)
    data = {"vault": friendly(args, vault), **_vault_json(args, v)}
    emit(args, data, lambda: _vault_human(args, vault, v))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """`imago vault deploy|status|unstake|withdraw-stake`."""
    vau = subparsers.add_parser("vault", help="a marketplace operator's vault")
    vs = vau.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = vs.add_parser("deploy", help="deploy this wallet's vault through the Registry")
    add_common_args(p)
    p.add_argument(
        "--operator-key",
        help="operator ed25519 public key, hex (default: $IMAGO_HOME/keys/operator.json)",
    )
    p.add_argument("--stake", metavar="TON")
    p.add_argument("--registry")
    p.set_defaults(func=lambda a: run_async(_vault_deploy(a)))
    p = vs.add_parser("status", help="totals, stake, last epoch")
    add_common_args(p, wallet=False)
    p.add_argument("--vault")
    p.set_defaults(func=lambda a: run_async(_vault_status(a)))
    p = vs.add_parser("unstake", help="start the unbonding delay for part of the stake")
    add_common_args(p)
    p.add_argument("amount", metavar="TON")
    p.add_argument("--vault")
    p.set_defaults(func=lambda a: run_async(_vault_stake_op(a, "unstake")))
    p = vs.add_parser("withdraw-stake", help="after the delay, take the free stake back")
    add_common_args(p)
    p.add_argument("--vault")
    p.set_defaults(func=lambda a: run_async(_vault_stake_op(a, "withdraw")))
