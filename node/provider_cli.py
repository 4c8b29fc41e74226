"""`imago provider ...`: a GPU owner's stake and registration on-chain."""

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
    registry_of,
    run_async,
    run_operation,
    save_deployment,
    trace_summary,
    wallet_passphrase,
)
from contracts.chain.messages.capabilities import Capabilities, ModelPrice
from contracts.chain.units import format_ton, parse_address, parse_ton
from protocol.signed import model_hash

# ----------------------------------------------------------------- provider


def _capabilities(args: argparse.Namespace) -> Capabilities:
    models = []
    for spec in args.model or []:
        try:
            name, p, c = spec.rsplit(":", 2)
            models.append(
                ModelPrice(model_hash(name), parse_ton(p) if "." in p else int(p), int(c))
            )
        except ValueError:
            raise CliError(
                f"--model {spec!r}: expected NAME:PROMPT_PRICE:COMPLETION_PRICE "
                "(nanoTON per million tokens)"
            ) from None
    return Capabilities(args.gpu_model, args.gpu_memory, args.gpu_count, args.region, tuple(models))


def _provider_of(args: argparse.Namespace, owner: Address | None) -> Address:
    if getattr(args, "address", None):
        return parse_address(args.address)
    if owner is None:
        raise CliError("give --address")
    return addresses.provider_address(registry_of(args), owner, args.seq)


async def _provider_register(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    node_key = (
        hex32(args.node_key, "--node-key")
        if args.node_key
        else load_or_create_key(f"node-{args.seq}", wallet_passphrase(args))[1]
    )
    stake = parse_ton(args.stake)
    async with open_chain(args) as client:
        owner = open_wallet(args, client)
        provider, trace = await run_operation(
            "registering the provider",
            operations.register_provider,
            owner,
            client,
            registry,
            node_key,
            stake,
            _capabilities(args),
            seq=args.seq,
        )
        p = await getters.get_provider_data(client, provider)
    dep = load_deployment(required=False)
    if dep is not None:
        dep.providers[f"{owner.address.to_str(is_user_friendly=False)}/{args.seq}"] = (
            provider.to_str(is_user_friendly=False)
        )
        save_deployment(dep)
    data = {
        "provider": friendly(args, provider),
        "state": p.state_name,
        "stake": format_ton(p.stake, unit=False),
        "node_key": node_key.hex(),
        **trace_summary(trace),
    }
    emit(
        args,
        data,
        lambda: f"provider {data['provider']}: {p.state_name}, stake {format_ton(p.stake)}",
    )
    return 0


async def _provider_op(args: argparse.Namespace, op: str) -> int:
    async with open_chain(args) as client:
        owner = open_wallet(args, client)
        provider = _provider_of(args, owner.address)
        if op == "top-up":
            trace = await run_operation(
                "topping up", operations.provider_top_up, owner, provider, parse_ton(args.amount)
            )
        elif op == "rotate-key":
            trace = await run_operation(
                "rotating the node key",
                operations.provider_rotate_key,
                owner,
                provider,
                hex32(args.new_key, "new key"),
            )
        elif op == "unstake":
            trace = await run_operation("unstaking", operations.provider_unstake, owner, provider)
        else:
            trace = await run_operation(
                "withdrawing the stake", operations.provider_withdraw, owner, provider
            )
        p = await getters.get_provider_data(client, provider)
    data = {"provider": friendly(args, provider), **_provider_json(p), **trace_summary(trace)}
    emit(args, data, lambda: _provider_human(args, provider, p))
    return 0


def _provider_json(p: getters.ProviderData) -> dict[str, Any]:
    caps = None
    if p.capabilities is not None:
        try:
            c = Capabilities.from_cell(p.capabilities)
            caps = {
                "gpu_model": c.gpu_model,
                "gpu_memory_gb": c.gpu_memory_gb,
                "gpu_count": c.gpu_count,
                "region": c.region,
                "models": [
                    {
                        "model": f"{m.model:064x}",
                        "price_prompt": m.price_prompt,
                        "price_completion": m.price_completion,
                    }
                    for m in c.models
                ],
            }
        except ValueError:
            caps = {"raw": True}
    return {
        "state": p.state_name,
        "stake": format_ton(p.stake, unit=False),
        "balance": format_ton(p.balance, unit=False),
        "node_key": f"{p.node_key:064x}",
        "seq": p.seq,
        "unlock_time": p.unlock_time,
        "unbonding_delay": p.unbonding_delay,
        "capabilities": caps,
    }


def _provider_human(args: argparse.Namespace, provider: Address, p: getters.ProviderData) -> str:
    lines = [
        f"provider {friendly(args, provider)}: {p.state_name}",
        f"stake {format_ton(p.stake)}, balance {format_ton(p.balance)}",
        f"node key {p.node_key:064x}",
    ]
    if p.state_name == "unbonding":
        lines.append(f"unlocks at {p.unlock_time} (unix)")
    return "\n".join(lines)


async def _provider_status(args: argparse.Namespace) -> int:
    async with open_chain(args) as client:
        owner = None if args.address else open_wallet(args, client).address
        provider = _provider_of(args, owner)
        info = await client.get_address_information(provider)
        if info.state != "active":
            raise CliError(f"provider {friendly(args, provider)} is not deployed ({info.state})")
        p = await getters.get_provider_data(client, provider)
    data = {"provider": friendly(args, provider), **_provider_json(p)}
    emit(args, data, lambda: _provider_human(args, provider, p))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """`imago provider register|status|top-up|rotate-key|unstake|withdraw`."""
    # provider
    prov = subparsers.add_parser("provider", help="a GPU node's stake and registration")
    ps = prov.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = ps.add_parser("register", help="register a node with a stake")
    add_common_args(p)
    p.add_argument("--stake", required=True, metavar="TON")
    p.add_argument(
        "--node-key", help="node ed25519 public key, hex (default: a key in $IMAGO_HOME/keys)"
    )
    p.add_argument("--seq", type=int, default=0, help="node number of this owner (default 0)")
    p.add_argument("--gpu-model", default="cpu")
    p.add_argument("--gpu-memory", type=int, default=0, metavar="GB")
    p.add_argument("--gpu-count", type=int, default=0)
    p.add_argument("--region", default="local")
    p.add_argument(
        "--model",
        action="append",
        metavar="NAME:PROMPT:COMPLETION",
        help="served model and prices (nanoTON per million tokens)",
    )
    p.add_argument("--registry")
    p.set_defaults(func=lambda a: run_async(_provider_register(a)))
    for name, helptext in (
        ("top-up", "add to the stake"),
        ("rotate-key", "replace the node key"),
        ("unstake", "start the unbonding delay"),
        ("withdraw", "take the stake back after the unbonding delay"),
        ("status", "state, stake, key, capabilities"),
    ):
        p = ps.add_parser(name, help=helptext)
        add_common_args(p)
        if name == "top-up":
            p.add_argument("amount", metavar="TON")
        if name == "rotate-key":
            p.add_argument("new_key", metavar="HEX")
        p.add_argument("--seq", type=int, default=0)
        p.add_argument(
            "--address", help="provider address (default: derived from the wallet and --seq)"
        )
        p.add_argument("--registry")
        if name == "status":
            p.set_defaults(func=lambda a: run_async(_provider_status(a)))
        else:
            p.set_defaults(func=lambda a, op=name: run_async(_provider_op(a, op)))
