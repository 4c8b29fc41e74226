"""`imago registry deploy|params|allow-image|allow-model|status`: governance of the Registry."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from pytoniq_core import Address

from contracts.chain import addresses, getters, operations
from contracts.chain.addresses import DEFAULT_PARAMS, PRODUCTION_PARAMS, Deployment
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
from contracts.chain.messages.registry import RegistryParams
from contracts.chain.units import format_ton, parse_ton
from protocol.attestation import DEV_MEASUREMENT, image_hash
from protocol.home import key_file
from protocol.signed import model_hash


def _param_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-provider-stake", metavar="TON")
    p.add_argument("--min-vault-stake", metavar="TON")
    p.add_argument("--unbonding-delay", metavar="SECONDS")
    p.add_argument("--escrow-close-delay", metavar="SECONDS")
    p.add_argument("--protocol-fee-bps", metavar="BPS")
    p.add_argument("--slash-bounty-bps", metavar="BPS")


# ----------------------------------------------------------------- registry


def _params_from_args(args: argparse.Namespace, base: RegistryParams) -> RegistryParams:
    values = asdict(base)
    for field, conv in (
        ("min_provider_stake", parse_ton),
        ("min_vault_stake", parse_ton),
        ("unbonding_delay", int),
        ("escrow_close_delay", int),
        ("protocol_fee_bps", int),
        ("slash_bounty_bps", int),
    ):
        v = getattr(args, field, None)
        if v is not None:
            values[field] = conv(v)
    return RegistryParams(**values)


def _params_given(args: argparse.Namespace) -> bool:
    return any(
        getattr(args, f, None) is not None
        for f in (
            "min_provider_stake",
            "min_vault_stake",
            "unbonding_delay",
            "escrow_close_delay",
            "protocol_fee_bps",
            "slash_bounty_bps",
        )
    )


async def _registry_deploy(args: argparse.Namespace) -> int:
    base = PRODUCTION_PARAMS if args.chain in ("testnet", "mainnet") else DEFAULT_PARAMS
    params = _params_from_args(args, base)
    async with open_chain(args) as client:
        gov = open_wallet(args, client)
        registry = await run_operation(
            "deploying the registry", _deploy_registry_traced, gov, params
        )
        dep = Deployment(
            chain=args.chain,
            registry=registry.to_str(is_user_friendly=False),
            owner=gov.address.to_str(is_user_friendly=False),
            params=asdict(params),
            code_hashes={},
            vaults={},
            providers={},
            escrows={},
        )
        from . import artifacts

        dep.code_hashes = {n: a.code_hash_hex for n, a in artifacts.load_all().items()}
        vault = None
        if args.all:
            _, public, key_path = load_or_create_key("operator", wallet_passphrase(args))
            stake = parse_ton(args.vault_stake) if args.vault_stake else params.min_vault_stake
            vault = await run_operation(
                "deploying the vault",
                operations.deploy_vault,
                gov,
                registry,
                public,
                stake,
                client=client,
            )
            dep.vaults[gov.address.to_str(is_user_friendly=False)] = vault.to_str(
                is_user_friendly=False
            )
        path = save_deployment(dep)
    data = {
        "registry": friendly(args, registry),
        "vault": friendly(args, vault) if vault else None,
        "owner": friendly(args, gov.address),
        "params": asdict(params),
        "deployment_file": str(path),
    }

    def human() -> str:
        lines = [f"registry deployed at {data['registry']}", f"owner: {data['owner']}"]
        if vault:
            lines.append(
                f"vault deployed at {data['vault']} (operator key in {key_file('operator')})"
            )
        lines.append(f"saved to {path}")
        return "\n".join(lines)

    emit(args, data, human)
    return 0


async def _deploy_registry_traced(
    gov: Any, params: RegistryParams, *, on_poll: Any = None
) -> Address:
    si = addresses.registry_state_init(gov.address, params)
    addr = addresses.address_of(si)
    addresses.check_params(params)
    value = addresses.STORAGE_RESERVES["registry"] + parse_ton("0.1")  # its reserve stays
    trace = await gov.transfer(addr, value, None, state_init=si, bounce=False, on_poll=on_poll)
    if operations.failed_exit_codes(trace):
        raise operations.OperationFailed("registry deploy", trace)
    return addr


def _registry_data_json(args: argparse.Namespace, r: getters.RegistryData) -> dict[str, Any]:
    return {
        "owner": friendly(args, r.owner),
        "min_provider_stake": format_ton(r.min_provider_stake, unit=False),
        "min_vault_stake": format_ton(r.min_vault_stake, unit=False),
        "unbonding_delay": r.unbonding_delay,
        "escrow_close_delay": r.escrow_close_delay,
        "protocol_fee_bps": r.protocol_fee_bps,
        "slash_bounty_bps": r.slash_bounty_bps,
        "register_fee": format_ton(r.register_fee, unit=False),
        "deploy_vault_fee": format_ton(r.deploy_vault_fee, unit=False),
        "code_hashes": {
            "provider": r.provider_code_hash.hex().upper(),
            "vault": r.vault_code_hash.hex().upper(),
            "escrow": r.escrow_code_hash.hex().upper(),
        },
    }


async def _registry_params(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    async with open_chain(args) as client:
        r = await getters.get_registry_data(client, registry)
        if _params_given(args):
            current = RegistryParams(
                r.min_provider_stake,
                r.unbonding_delay,
                r.escrow_close_delay,
                r.protocol_fee_bps,
                r.slash_bounty_bps,
                r.min_vault_stake,
            )
            gov = open_wallet(args, client)
            await run_operation(
                "updating params",
                operations.update_params,
                gov,
                registry,
                _params_from_args(args, current),
            )
            r = await getters.get_registry_data(client, registry)
    data = _registry_data_json(args, r)

    def human() -> str:
        return "\n".join(
            [
                f"min provider stake: {data['min_provider_stake']} TON",
                f"min vault stake:    {data['min_vault_stake']} TON",
                f"unbonding delay:    {r.unbonding_delay} s",
                f"escrow close delay: {r.escrow_close_delay} s",
                f"protocol fee:       {r.protocol_fee_bps} bps",
                f"slash bounty:       {r.slash_bounty_bps} bps",
            ]
        )

    emit(args, data, human)
    return 0


def _image_value(text: str, chain: str | None = None) -> int:
    """A 32-byte image hash as is, or a 48-byte TDX mr_td hashed into one: the size tells
    them apart, and hashing here spares governance a hand-made sha256. ``dev`` is the dev
    (software) attestation's image, which only a devnet may allow."""
    if text == "dev":
        if chain in ("testnet", "mainnet"):
            raise CliError(f"the dev image proves nothing: never allow it on {chain}")
        return image_hash(DEV_MEASUREMENT)
    raw = text.removeprefix("0x")
    if len(raw) == 96:
        try:
            return image_hash(bytes.fromhex(raw))
        except ValueError:
            raise CliError("a TDX mr_td must be 48 bytes in hex") from None
    return int.from_bytes(hex32(text, "image hash"), "big")


async def _registry_allow(args: argparse.Namespace, kind: str) -> int:
    registry = registry_of(args)
    if kind == "image":
        value = _image_value(args.image, args.chain)
    else:
        m = args.model
        value = (
            int.from_bytes(hex32(m, "model hash"), "big") if len(m) in (64, 66) else model_hash(m)
        )
    allowed = not args.revoke
    async with open_chain(args) as client:
        gov = open_wallet(args, client)
        fn = operations.allow_image if kind == "image" else operations.allow_model
        trace = await run_operation(
            f"{'allowing' if allowed else 'revoking'} {kind}", fn, gov, registry, value, allowed
        )
        check = getters.is_image_allowed if kind == "image" else getters.is_model_allowed
        now = await check(client, registry, value)
    data = {kind: f"{value:064x}", "allowed": now, **trace_summary(trace)}
    emit(args, data, lambda: f"{kind} {value:064x}: {'allowed' if now else 'not allowed'}")
    return 0


async def _registry_sweep(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    async with open_chain(args) as client:
        gov = open_wallet(args, client)
        trace = await run_operation(
            "sweeping the registry", operations.registry_sweep, gov, registry
        )
        balance = await client.get_balance(registry)
    data = {"registry": friendly(args, registry), "balance": format_ton(balance, unit=False)}
    data |= trace_summary(trace)
    emit(args, data, lambda: f"registry swept; it keeps {format_ton(balance)}")
    return 0


async def _registry_status(args: argparse.Namespace) -> int:
    from . import artifacts

    registry = registry_of(args)
    async with open_chain(args) as client:
        info = await client.get_address_information(registry)
        r = await getters.get_registry_data(client, registry) if info.state == "active" else None
    builds = {n: a.code_hash_hex for n, a in artifacts.load_all().items()}
    data: dict[str, Any] = {
        "registry": friendly(args, registry),
        "state": info.state,
        "balance": format_ton(info.balance, unit=False),
    }
    if r is not None:
        data.update(_registry_data_json(args, r))
        data["code_matches_build"] = {
            n: data["code_hashes"][n] == builds[n] for n in ("provider", "vault", "escrow")
        }
    dep = load_deployment(required=False)
    if dep is not None:
        data["vaults"] = {friendly(args, k): friendly(args, v) for k, v in dep.vaults.items()}

    def human() -> str:
        lines = [f"registry {data['registry']}: {info.state}, balance {data['balance']} TON"]
        if r is not None:
            lines.append(f"owner: {data['owner']}")
            lines.append(
                f"min stake {data['min_provider_stake']} TON, unbonding {r.unbonding_delay} s, "
                f"fee {r.protocol_fee_bps} bps"
            )
            for n, ok in data["code_matches_build"].items():
                lines.append(
                    f"{n} code {data['code_hashes'][n][:16]}… "
                    + ("matches the build" if ok else "DIFFERS from the build")
                )
        for op, v in data.get("vaults", {}).items():
            lines.append(f"vault {v} (operator {op})")
        return "\n".join(lines)

    emit(args, data, human)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """`imago registry deploy|params|allow-image|allow-model|status`: governance."""
    reg = subparsers.add_parser("registry", help="the Registry: governance, params, allowlists")
    rs = reg.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = rs.add_parser("deploy", help="deploy the Registry (--all: and a Vault: the whole set)")
    add_common_args(p)
    _param_args(p)
    p.add_argument("--all", action="store_true", help="also deploy a Vault operated by this wallet")
    p.add_argument(
        "--vault-stake", metavar="TON", help="stake of that Vault (default: the minimum)"
    )
    p.set_defaults(func=lambda a: run_async(_registry_deploy(a)))
    p = rs.add_parser("params", help="show the params (with options: update them, as the owner)")
    add_common_args(p)
    _param_args(p)
    p.add_argument("--registry", help="registry address (default: from deployment.json)")
    p.set_defaults(func=lambda a: run_async(_registry_params(a)))
    p = rs.add_parser("allow-image", help="allow (or --revoke) a TEE image measurement")
    add_common_args(p)
    p.add_argument(
        "image",
        help="image hash (32 bytes hex), a TDX mr_td (48 bytes hex; its sha256 is used), or "
        "`dev`: the dev attestation's image (devnet only)",
    )
    p.add_argument("--revoke", action="store_true")
    p.add_argument("--registry")
    p.set_defaults(func=lambda a: run_async(_registry_allow(a, "image")))
    p = rs.add_parser("allow-model", help="allow (or --revoke) a model (name or 32-byte hash)")
    add_common_args(p)
    p.add_argument("model")
    p.add_argument("--revoke", action="store_true")
    p.add_argument("--registry")
    p.set_defaults(func=lambda a: run_async(_registry_allow(a, "model")))
    p = rs.add_parser("sweep", help="send what the Registry holds above its reserve to its owner")
    add_common_args(p)
    p.add_argument("--registry")
    p.set_defaults(func=lambda a: run_async(_registry_sweep(a)))
    p = rs.add_parser("status", help="registry state, params and code hashes")
    add_common_args(p, wallet=False)
    p.add_argument("--registry")
    p.set_defaults(func=lambda a: run_async(_registry_status(a)))
