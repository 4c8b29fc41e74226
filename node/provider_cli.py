"""`imago provider ...`: a GPU owner's stake and registration on-chain."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
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
    open_chain,
    open_wallet,
    registry_of,
    run_async,
    run_operation,
    save_deployment,
    trace_summary,
)
from contracts.chain.messages.capabilities import Capabilities, ModelPrice
from contracts.chain.units import format_ton, parse_address, parse_ton
from node.keys import load_or_create_keys, node_public_key, record_provider
from protocol.home import node_dir, node_keystore, stack_file
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


def _node_state_dir(args: argparse.Namespace) -> Path:
    return Path(args.node_state_dir).expanduser() if args.node_state_dir else node_dir()


def _node_key(args: argparse.Namespace) -> tuple[bytes, Path | None]:
    """The key to stake: --node-key, or that of the node's own keystore, which is made
    here, exactly as `imago node serve` would make it, if the node has not run yet."""
    if args.node_key:
        return hex32(args.node_key, "--node-key"), None
    path = node_keystore(_node_state_dir(args))
    public = node_public_key(path)
    if public is None:
        passphrase = None
        if args.node_passphrase_env:
            passphrase = os.environ.get(args.node_passphrase_env)
            if not passphrase:
                raise CliError(f"--node-passphrase-env {args.node_passphrase_env}: empty or unset")
        public = load_or_create_keys(path, passphrase).ed25519_public
    return public, path


def _record_for_node(
    args: argparse.Namespace, provider: Address, node_key: bytes, registry: Address
) -> Path | None:
    """If ``node_key`` is the node keystore's, note its Provider there for `node serve`."""
    state_dir = _node_state_dir(args)
    if node_public_key(node_keystore(state_dir)) != node_key:
        return None
    return record_provider(
        state_dir,
        provider.to_str(is_user_friendly=False),
        node_key,
        registry.to_str(is_user_friendly=False),
    )


async def _provider_register(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    node_key, keystore_path = _node_key(args)
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
    record = _record_for_node(args, provider, node_key, registry)
    data = {
        "provider": friendly(args, provider),
        "state": p.state_name,
        "stake": format_ton(p.stake, unit=False),
        "node_key": node_key.hex(),
        "node_keystore": str(keystore_path) if keystore_path else None,
        "provider_record": str(record) if record else None,
        **trace_summary(trace),
    }

    def human() -> str:
        lines = [f"provider {data['provider']}: {p.state_name}, stake {format_ton(p.stake)}"]
        source = f" (the key of {keystore_path})" if keystore_path else ""
        lines.append(f"node key {node_key.hex()}{source}")
        if record:
            lines.append(f"`imago node serve` names this provider (recorded in {record})")
        return "\n".join(lines)

    emit(args, data, human)
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
            new_key = hex32(args.new_key, "new key")
            trace = await run_operation(
                "rotating the node key",
                operations.provider_rotate_key,
                owner,
                provider,
                new_key,
            )
            if not getattr(args, "address", None):
                _record_for_node(args, provider, new_key, registry_of(args))
        elif op == "unstake":
            trace = await run_operation("unstaking", operations.provider_unstake, owner, provider)
        elif op == "sweep":
            trace = await run_operation("sweeping", operations.provider_sweep, owner, provider)
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


# ----------------------------------------------------------------- claims and earnings


def _state_dir(args: argparse.Namespace) -> Path:
    return args.state_dir if args.state_dir is not None else node_dir()


def _stack() -> dict[str, Any]:
    """``$IMAGO_HOME/stack.json`` (written by `imago up`), or {}."""
    try:
        doc = json.loads(stack_file().read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _matcher(args: argparse.Namespace) -> str:
    url = args.matcher or _stack().get("matcher_url")
    if not url:
        raise CliError("give --matcher URL (or run `imago up`, which records it in stack.json)")
    return url


async def _provider_claim(args: argparse.Namespace) -> int:
    from node.claims import Claimer, ClaimError

    matcher = _matcher(args)
    async with open_chain(args) as client:
        owner = open_wallet(args, client)
        provider = _provider_of(args, owner.address)
        claimer = Claimer(
            client=client,
            wallet=owner,
            provider=provider,
            matcher=matcher,
            state_dir=_state_dir(args),
        )
        try:
            run = await claimer.run_once(force=True)
        except ClaimError as e:
            raise CliError(str(e)) from None
        finally:
            await claimer.close()
    data = {"provider": friendly(args, provider), **run.to_json()}
    emit(args, data, lambda: _claim_human(run))
    if run.status != "ok" or any(v.status in ("failed", "insolvent") for v in run.vaults):
        return 1
    return 0


def _claim_human(run: Any) -> str:
    lines = []
    if run.message:
        lines.append(run.message)
    if run.refused:
        lines.append(f"the matcher's voucher is refused: {run.refused}")
    if run.status == "ok" and run.fetched is None and not run.vaults:
        lines.append("no payout voucher released for this provider yet")
    for v in run.vaults:
        if v.status == "claimed":
            lines.append(
                f"claimed {format_ton(v.amount)} (epoch {v.epoch}, {format_ton(v.cumulative)} "
                f"in all) from {v.vault}; fees {format_ton(v.fees)}"
            )
        elif v.status == "nothing":
            lines.append(f"nothing to claim: {format_ton(v.cumulative)} claimed in all")
        else:
            lines.append(f"{v.status}: {v.message}")
    return "\n".join(lines)


async def _provider_earnings(args: argparse.Namespace) -> int:
    import aiohttp

    from node.earnings import EarningsError, compute_earnings
    from protocol.keystore import KeystoreError

    state_dir = _state_dir(args)
    keystore = node_keystore(state_dir)
    if not keystore.exists():
        raise CliError(
            f"no node keystore at {keystore}: the records are fetched with the node key "
            "(give the node's --state-dir)"
        )
    passphrase = None
    if args.node_passphrase_env:
        passphrase = os.environ.get(args.node_passphrase_env)
        if passphrase is None:
            raise CliError(f"--node-passphrase-env {args.node_passphrase_env} is not set")
    try:
        keys = load_or_create_keys(keystore, passphrase)
    except KeystoreError as e:
        raise CliError(str(e)) from None
    matcher = _matcher(args)
    async with open_chain(args) as client, aiohttp.ClientSession() as session:
        if args.address:
            provider = parse_address(args.address)
        elif _stack().get("provider"):
            provider = parse_address(_stack()["provider"])
        else:
            provider = _provider_of(args, open_wallet(args, client).address)
        try:
            earnings = await compute_earnings(
                client=client,
                session=session,
                matcher=matcher,
                provider=provider,
                node_key=keys.ed25519,
                state_dir=state_dir,
            )
        except EarningsError as e:
            raise CliError(str(e)) from None
    data = earnings.to_json()
    data["provider"] = friendly(args, provider)
    emit(args, _in_ton(data), lambda: _earnings_human(args, earnings))
    return 0


def _in_ton(data: Any) -> Any:
    """nanoTON decimal strings -> TON decimal strings, recursively (the JSON output)."""
    amounts = {"gross", "earned", "committed", "claimed", "claimable", "pending", "cumulative"}
    if isinstance(data, list):
        return [_in_ton(x) for x in data]
    if isinstance(data, dict):
        return {
            k: format_ton(int(v), unit=False) if k in amounts and isinstance(v, str) else _in_ton(v)
            for k, v in data.items()
        }
    return data


def _earnings_human(args: argparse.Namespace, e: Any) -> str:
    def ton(n: int) -> str:
        return format_ton(n, unit=False)

    head = ("epoch", "jobs", "prompt tok", "compl. tok", "earned", "committed", "claimed")
    head += ("claimable",)
    rows = [head]
    for r in e.epochs:
        rows.append(
            (
                str(r.epoch),
                str(r.jobs),
                str(r.prompt_tokens),
                str(r.completion_tokens),
                ton(r.earned),
                ton(r.committed),
                ton(r.claimed),
                ton(r.claimable),
            )
        )
    total = (
        "total",
        str(sum(r.jobs for r in e.epochs)),
        str(sum(r.prompt_tokens for r in e.epochs)),
        str(sum(r.completion_tokens for r in e.epochs)),
        ton(e.earned),
        ton(e.committed),
        ton(e.claimed),
        ton(e.claimable),
    )
    rows.append(total)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        f"provider {friendly(args, e.provider)}"
        + (f", vault {friendly(args, e.vault)}" if e.vault else "")
        + " (amounts in TON; earned is after the protocol fee)"
    ]
    for i, row in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    lines.append(
        f"pending: {e.pending_jobs} job{'' if e.pending_jobs == 1 else 's'} "
        f"({e.pending_tokens[0]} + {e.pending_tokens[1]} tokens), "
        f"{ton(e.pending)} TON after the fee, in no committed epoch yet"
    )
    if e.voucher:
        lines.append(f"payout voucher: epoch {e.voucher_epoch}, {ton(e.voucher)} TON in all")
    for issue in e.issues:
        lines.append(f"warning: {issue}")
    return "\n".join(lines)


def _node_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--node-state-dir",
        metavar="DIR",
        help="the node's state dir, as given to `imago node serve --state-dir` (default "
        "$IMAGO_HOME/node)",
    )
    p.add_argument(
        "--node-passphrase-env",
        metavar="VAR",
        help="a node keystore made here is encrypted with this variable's passphrase (give "
        "`imago node serve` the same --passphrase-env)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """`imago provider register|status|top-up|rotate-key|unstake|withdraw|claim|earnings`."""
    prov = subparsers.add_parser("provider", help="a GPU node's stake and registration")
    ps = prov.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = ps.add_parser("register", help="register a node with a stake")
    add_common_args(p)
    p.add_argument("--stake", required=True, metavar="TON")
    p.add_argument(
        "--node-key",
        help="node ed25519 public key, hex (default: the key `imago node serve` signs with, "
        "from its keystore, made now if the node has not run yet)",
    )
    _node_args(p)
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
        ("sweep", "withdrawn or slashed: take what is left above the storage reserve"),
        ("status", "state, stake, key, capabilities"),
    ):
        p = ps.add_parser(name, help=helptext)
        add_common_args(p)
        if name == "top-up":
            p.add_argument("amount", metavar="TON")
        if name == "rotate-key":
            p.add_argument("new_key", metavar="HEX")
            _node_args(p)
        p.add_argument("--seq", type=int, default=0)
        p.add_argument(
            "--address", help="provider address (default: derived from the wallet and --seq)"
        )
        p.add_argument("--registry")
        if name == "status":
            p.set_defaults(func=lambda a: run_async(_provider_status(a)))
        else:
            p.set_defaults(func=lambda a, op=name: run_async(_provider_op(a, op)))
    for name, helptext in (
        ("claim", "claim the latest payout voucher now, whatever the claim multiple"),
        ("earnings", "jobs, tokens, earned, committed, claimed, claimable and pending, by epoch"),
    ):
        p = ps.add_parser(name, help=helptext)
        add_common_args(p)
        p.add_argument("--matcher", help="matcher URL (default: stack.json's, from `imago up`)")
        p.add_argument(
            "--state-dir",
            type=Path,
            default=None,
            help="the node's state dir: its receipt log, claim state and keys "
            "(default $IMAGO_HOME/node)",
        )
        p.add_argument("--seq", type=int, default=0)
        p.add_argument(
            "--address",
            help="provider address (default: "
            + ("stack.json's, else " if name == "earnings" else "")
            + "derived from the wallet and --seq)",
        )
        p.add_argument("--registry")
        if name == "earnings":
            p.add_argument(
                "--node-passphrase-env",
                metavar="VAR",
                help="environment variable holding the node keystore's passphrase",
            )
            p.set_defaults(func=lambda a: run_async(_provider_earnings(a)))
        else:
            p.set_defaults(func=lambda a: run_async(_provider_claim(a)))
