"""`imago registry|provider|escrow|vault ...`: the on-chain roles from the command line.

Handlers stay thin: the work is in contracts.roles (operations), contracts.getters
(state) and contracts.deploy (addresses). Deployed addresses are kept in
``$IMAGO_HOME/deployment.json``; keys this CLI generates (operator key, spend keys) in
``$IMAGO_HOME/keys/`` (mode 0600).

    imago registry deploy --all          # Registry + a Vault: the whole set, on the devnet
    imago provider register --stake 10 --node-key HEX --model smollm2:100:200
    imago escrow open --amount 5
    imago escrow close && imago escrow withdraw
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address

from . import deploy, getters, roles
from .cli_chain import (
    CliError,
    Progress,
    add_chain_args,
    add_wallet_args,
    chain_network,
    open_chain,
    open_wallet,
    run_async,
    wallet_passphrase,
)
from .deploy import DEFAULT_PARAMS, PRODUCTION_PARAMS, Deployment
from .devnet import imago_home
from .messages import Capabilities, ModelPrice, RegistryParams
from .protocol.attestation import image_hash
from .protocol.signed import model_hash
from .units import format_address, format_ton, parse_address, parse_ton
from .wallet import WalletKeys, create_keystore, load_keystore

__all__ = ["deployment_file", "load_deployment", "register", "save_deployment"]


# ----------------------------------------------------------------- deployment and keys


def deployment_file() -> Path:
    return imago_home() / "deployment.json"


def load_deployment(required: bool = True) -> Deployment | None:
    path = deployment_file()
    if not path.exists():
        if required:
            raise CliError(f"no deployment at {path}: run `imago registry deploy --all` first")
        return None
    try:
        return Deployment.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError) as e:
        raise CliError(f"{path} is not a deployment file: {e}") from None


def save_deployment(dep: Deployment) -> Path:
    path = deployment_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dep.to_json(), indent=2) + "\n")
    tmp.replace(path)
    return path


def _key_file(name: str) -> Path:
    return imago_home() / "keys" / f"{name}.json"


def _load_or_create_key(
    name: str, passphrase: str | None = None
) -> tuple[Ed25519PrivateKey, bytes, Path]:
    """An ed25519 key in $IMAGO_HOME/keys/<name>.json, created on first use: a 0600
    keystore, encrypted at rest when a passphrase is given (--passphrase-env)."""
    path = _key_file(name)
    if path.exists():
        keys, _ = load_keystore(path, passphrase)
    else:
        keys = WalletKeys.generate(mnemonic=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        create_keystore(path, keys, passphrase=passphrase, name=name)
    return Ed25519PrivateKey.from_private_bytes(keys.private_key[:32]), keys.public_key, path


def _hex32(text: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise CliError(f"{what} must be 32 bytes in hex") from None
    if len(raw) != 32:
        raise CliError(f"{what} must be 32 bytes in hex (got {len(raw)})")
    return raw


# ----------------------------------------------------------------- output helpers


def _friendly(args: argparse.Namespace, a: Address | str) -> str:
    return format_address(a, testnet=chain_network(args.chain) != "mainnet")


def _emit(args: argparse.Namespace, data: dict[str, Any], human: Callable[[], str]) -> None:
    print(json.dumps(data, default=str) if args.json else human())


def _trace_summary(trace: Any) -> dict[str, Any]:
    return {
        "transactions": len(trace),
        "gas": trace.total_gas_used,
        "fees_nanoton": trace.total_fees,
        "exit_codes": roles.failed_exit_codes(trace),
    }


async def _do(label: str, coro_fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
    """Run one role operation with progress dots; OperationFailed becomes a CliError."""
    with Progress(label) as progress:
        try:
            return await coro_fn(*a, on_poll=progress.tick, **kw)
        except roles.OperationFailed as e:
            raise CliError(str(e)) from None


def _registry_of(args: argparse.Namespace) -> Address:
    if getattr(args, "registry", None):
        return parse_address(args.registry)
    dep = load_deployment()
    assert dep is not None
    return Address(dep.registry)


def _vault_of(args: argparse.Namespace) -> Address:
    if getattr(args, "vault", None):
        return parse_address(args.vault)
    dep = load_deployment()
    assert dep is not None
    if not dep.vaults:
        raise CliError("no vault in the deployment: give --vault or run `imago vault deploy`")
    return Address(next(iter(dep.vaults.values())))


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
        registry = await _do("deploying the registry", _deploy_registry_traced, gov, params)
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
            _, public, key_path = _load_or_create_key("operator", wallet_passphrase(args))
            stake = parse_ton(args.vault_stake) if args.vault_stake else params.min_vault_stake
            vault = await _do(
                "deploying the vault",
                roles.deploy_vault,
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
        "registry": _friendly(args, registry),
        "vault": _friendly(args, vault) if vault else None,
        "owner": _friendly(args, gov.address),
        "params": asdict(params),
        "deployment_file": str(path),
    }

    def human() -> str:
        lines = [f"registry deployed at {data['registry']}", f"owner: {data['owner']}"]
        if vault:
            lines.append(
                f"vault deployed at {data['vault']} (operator key in {_key_file('operator')})"
            )
        lines.append(f"saved to {path}")
        return "\n".join(lines)

    _emit(args, data, human)
    return 0


async def _deploy_registry_traced(
    gov: Any, params: RegistryParams, *, on_poll: Any = None
) -> Address:
    si = deploy.registry_state_init(gov.address, params)
    addr = deploy.address_of(si)
    deploy.check_params(params)
    value = deploy.STORAGE_RESERVES["registry"] + parse_ton("0.1")  # its storage reserve stays
    trace = await gov.transfer(addr, value, None, state_init=si, bounce=False, on_poll=on_poll)
    if roles.failed_exit_codes(trace):
        raise roles.OperationFailed("registry deploy", trace)
    return addr


def _registry_data_json(args: argparse.Namespace, r: getters.RegistryData) -> dict[str, Any]:
    return {
        "owner": _friendly(args, r.owner),
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
    registry = _registry_of(args)
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
            await _do(
                "updating params",
                roles.update_params,
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

    _emit(args, data, human)
    return 0


def _image_value(text: str) -> int:
    """A 32-byte image hash as is, or a 48-byte TDX mr_td hashed into one: the size tells
    them apart, and hashing here spares governance a hand-made sha256."""
    raw = text.removeprefix("0x")
    if len(raw) == 96:
        try:
            return image_hash(bytes.fromhex(raw))
        except ValueError:
            raise CliError("a TDX mr_td must be 48 bytes in hex") from None
    return int.from_bytes(_hex32(text, "image hash"), "big")


async def _registry_allow(args: argparse.Namespace, kind: str) -> int:
    registry = _registry_of(args)
    if kind == "image":
        value = _image_value(args.image)
    else:
        m = args.model
        value = (
            int.from_bytes(_hex32(m, "model hash"), "big") if len(m) in (64, 66) else model_hash(m)
        )
    allowed = not args.revoke
    async with open_chain(args) as client:
        gov = open_wallet(args, client)
        fn = roles.allow_image if kind == "image" else roles.allow_model
        trace = await _do(
            f"{'allowing' if allowed else 'revoking'} {kind}", fn, gov, registry, value, allowed
        )
        check = getters.is_image_allowed if kind == "image" else getters.is_model_allowed
        now = await check(client, registry, value)
    data = {kind: f"{value:064x}", "allowed": now, **_trace_summary(trace)}
    _emit(args, data, lambda: f"{kind} {value:064x}: {'allowed' if now else 'not allowed'}")
    return 0


async def _registry_sweep(args: argparse.Namespace) -> int:
    registry = _registry_of(args)
    async with open_chain(args) as client:
        gov = open_wallet(args, client)
        trace = await _do("sweeping the registry", roles.registry_sweep, gov, registry)
        balance = await client.get_balance(registry)
    data = {"registry": _friendly(args, registry), "balance": format_ton(balance, unit=False)}
    data |= _trace_summary(trace)
    _emit(args, data, lambda: f"registry swept; it keeps {format_ton(balance)}")
    return 0


async def _registry_status(args: argparse.Namespace) -> int:
    from . import artifacts

    registry = _registry_of(args)
    async with open_chain(args) as client:
        info = await client.get_address_information(registry)
        r = await getters.get_registry_data(client, registry) if info.state == "active" else None
    builds = {n: a.code_hash_hex for n, a in artifacts.load_all().items()}
    data: dict[str, Any] = {
        "registry": _friendly(args, registry),
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
        data["vaults"] = {_friendly(args, k): _friendly(args, v) for k, v in dep.vaults.items()}

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

    _emit(args, data, human)
    return 0


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
    return deploy.provider_address(_registry_of(args), owner, args.seq)


async def _provider_register(args: argparse.Namespace) -> int:
    registry = _registry_of(args)
    node_key = (
        _hex32(args.node_key, "--node-key")
        if args.node_key
        else _load_or_create_key(f"node-{args.seq}", wallet_passphrase(args))[1]
    )
    stake = parse_ton(args.stake)
    async with open_chain(args) as client:
        owner = open_wallet(args, client)
        provider, trace = await _do(
            "registering the provider",
            roles.register_provider,
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
        "provider": _friendly(args, provider),
        "state": p.state_name,
        "stake": format_ton(p.stake, unit=False),
        "node_key": node_key.hex(),
        **_trace_summary(trace),
    }
    _emit(
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
            trace = await _do(
                "topping up", roles.provider_top_up, owner, provider, parse_ton(args.amount)
            )
        elif op == "rotate-key":
            trace = await _do(
                "rotating the node key",
                roles.provider_rotate_key,
                owner,
                provider,
                _hex32(args.new_key, "new key"),
            )
        elif op == "unstake":
            trace = await _do("unstaking", roles.provider_unstake, owner, provider)
        elif op == "sweep":
            trace = await _do("sweeping", roles.provider_sweep, owner, provider)
        else:
            trace = await _do("withdrawing the stake", roles.provider_withdraw, owner, provider)
        p = await getters.get_provider_data(client, provider)
    data = {"provider": _friendly(args, provider), **_provider_json(p), **_trace_summary(trace)}
    _emit(args, data, lambda: _provider_human(args, provider, p))
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
        f"provider {_friendly(args, provider)}: {p.state_name}",
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
            raise CliError(f"provider {_friendly(args, provider)} is not deployed ({info.state})")
        p = await getters.get_provider_data(client, provider)
    data = {"provider": _friendly(args, provider), **_provider_json(p)}
    _emit(args, data, lambda: _provider_human(args, provider, p))
    return 0


# ----------------------------------------------------------------- escrow


def _escrow_key_name(vault: Address, owner: Address) -> str:
    return f"spend-{vault.hash_part.hex()[:16]}-{owner.hash_part.hex()[:16]}"


async def _escrow_address(
    args: argparse.Namespace, client: Any, owner: Address
) -> tuple[Address, Address, int]:
    vault = _vault_of(args)
    if getattr(args, "address", None):
        return parse_address(args.address), vault, 0
    _, public, _ = _load_or_create_key(_escrow_key_name(vault, owner), wallet_passphrase(args))
    v = await getters.get_vault_data(client, vault)
    spend = int.from_bytes(public, "big")
    return (
        deploy.escrow_address(vault, owner, spend, v.escrow_close_delay),
        vault,
        v.escrow_close_delay,
    )


async def _escrow_open(args: argparse.Namespace) -> int:
    vault = _vault_of(args)
    amount = parse_ton(args.amount)
    async with open_chain(args) as client:
        owner = open_wallet(args, client)
        if args.spend_key:
            public = _hex32(args.spend_key, "--spend-key")
            key_path = None
        else:
            _, public, key_path = _load_or_create_key(
                _escrow_key_name(vault, owner.address), wallet_passphrase(args)
            )
        v = await getters.get_vault_data(client, vault)
        escrow, trace = await _do(
            "opening the escrow",
            roles.escrow_open,
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
        "escrow": _friendly(args, escrow),
        "vault": _friendly(args, vault),
        "spend_key": public.hex(),
        "spend_key_file": str(key_path) if key_path else None,
        **_escrow_json(e),
        **_trace_summary(trace),
    }
    _emit(args, data, lambda: _escrow_human(args, escrow, e))
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
        f"escrow {_friendly(args, escrow)}: {e.state_name}",
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
            trace = await _do(
                "depositing", roles.escrow_deposit, owner, escrow, parse_ton(args.amount)
            )
        elif op == "close":
            trace = await _do("closing", roles.escrow_close, owner, escrow)
        else:
            trace = await _do("withdrawing", roles.escrow_withdraw, owner, escrow)
        e = await getters.get_escrow_data(client, escrow)
        after = await owner.balance()
    data = {"escrow": _friendly(args, escrow), **_escrow_json(e), **_trace_summary(trace)}
    if op == "withdraw":
        data["returned"] = format_ton(max(0, after - before), unit=False)

    def human() -> str:
        text = _escrow_human(args, escrow, e)
        if op == "withdraw":
            text += f"\nreturned to the owner: about {format_ton(max(0, after - before))}"
        return text

    _emit(args, data, human)
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
                f"escrow {_friendly(args, escrow)} is not deployed ({info.state}); "
                "open it with `imago escrow open`"
            )
        e = await getters.get_escrow_data(client, escrow)
    data = {"escrow": _friendly(args, escrow), **_escrow_json(e)}
    _emit(args, data, lambda: _escrow_human(args, escrow, e))
    return 0


# ----------------------------------------------------------------- vault


async def _vault_deploy(args: argparse.Namespace) -> int:
    registry = _registry_of(args)
    if args.operator_key:
        public = _hex32(args.operator_key, "--operator-key")
    else:
        _, public, _ = _load_or_create_key("operator", wallet_passphrase(args))
    async with open_chain(args) as client:
        op = open_wallet(args, client)
        reg = await getters.get_registry_data(client, registry)
        stake = parse_ton(args.stake) if args.stake else reg.min_vault_stake
        vault = await _do(
            "deploying the vault", roles.deploy_vault, op, registry, public, stake, client=client
        )
        v = await getters.get_vault_data(client, vault)
    dep = load_deployment(required=False)
    if dep is not None:
        dep.vaults[op.address.to_str(is_user_friendly=False)] = vault.to_str(is_user_friendly=False)
        save_deployment(dep)
    data = {"vault": _friendly(args, vault), "operator_key": public.hex(), **_vault_json(args, v)}
    _emit(args, data, lambda: _vault_human(args, vault, v))
    return 0


def _vault_json(args: argparse.Namespace, v: getters.VaultData) -> dict[str, Any]:
    return {
        "operator": _friendly(args, v.operator),
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
            f"vault {_friendly(args, vault)} (operator {_friendly(args, v.operator)})",
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
    vault = _vault_of(args)
    async with open_chain(args) as client:
        w = open_wallet(args, client)
        if op == "unstake":
            await _do("unstaking", roles.vault_unstake, w, vault, parse_ton(args.amount))
        else:
            await _do("withdrawing the stake", roles.vault_withdraw_stake, w, vault)
        v = await getters.get_vault_data(client, vault)
    data = {"vault": _friendly(args, vault), **_vault_json(args, v)}
    _emit(args, data, lambda: _vault_human(args, vault, v))
    return 0


async def _vault_status(args: argparse.Namespace) -> int:
    vault = _vault_of(args)
    async with open_chain(args) as client:
        v = await getters.get_vault_data(client, vault)
    data = {"vault": _friendly(args, vault), **_vault_json(args, v)}
    _emit(args, data, lambda: _vault_human(args, vault, v))
    return 0


# ----------------------------------------------------------------- registration


def _common(p: argparse.ArgumentParser, *, wallet: bool = True) -> None:
    add_chain_args(p)
    if wallet:
        add_wallet_args(p)


def _param_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-provider-stake", metavar="TON")
    p.add_argument("--min-vault-stake", metavar="TON")
    p.add_argument("--unbonding-delay", metavar="SECONDS")
    p.add_argument("--escrow-close-delay", metavar="SECONDS")
    p.add_argument("--protocol-fee-bps", metavar="BPS")
    p.add_argument("--slash-bounty-bps", metavar="BPS")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `registry`, `provider`, `escrow` and `vault` to the `imago` parser."""
    # registry
    reg = subparsers.add_parser("registry", help="the Registry: governance, params, allowlists")
    rs = reg.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = rs.add_parser("deploy", help="deploy the Registry (--all: and a Vault: the whole set)")
    _common(p)
    _param_args(p)
    p.add_argument("--all", action="store_true", help="also deploy a Vault operated by this wallet")
    p.add_argument(
        "--vault-stake", metavar="TON", help="stake of that Vault (default: the minimum)"
    )
    p.set_defaults(func=lambda a: run_async(_registry_deploy(a)))
    p = rs.add_parser("params", help="show the params (with options: update them, as the owner)")
    _common(p)
    _param_args(p)
    p.add_argument("--registry", help="registry address (default: from deployment.json)")
    p.set_defaults(func=lambda a: run_async(_registry_params(a)))
    p = rs.add_parser("allow-image", help="allow (or --revoke) a TEE image measurement")
    _common(p)
    p.add_argument(
        "image", help="image hash (32 bytes hex), or a TDX mr_td (48 bytes hex; its sha256 is used)"
    )
    p.add_argument("--revoke", action="store_true")
    p.add_argument("--registry")
    p.set_defaults(func=lambda a: run_async(_registry_allow(a, "image")))
    p = rs.add_parser("allow-model", help="allow (or --revoke) a model (name or 32-byte hash)")
    _common(p)
    p.add_argument("model")
    p.add_argument("--revoke", action="store_true")
    p.add_argument("--registry")
    p.set_defaults(func=lambda a: run_async(_registry_allow(a, "model")))
    p = rs.add_parser("sweep", help="send what the Registry holds above its reserve to its owner")
    _common(p)
    p.add_argument("--registry")
    p.set_defaults(func=lambda a: run_async(_registry_sweep(a)))
    p = rs.add_parser("status", help="registry state, params and code hashes")
    _common(p, wallet=False)
    p.add_argument("--registry")
    p.set_defaults(func=lambda a: run_async(_registry_status(a)))

    # provider
    prov = subparsers.add_parser("provider", help="a GPU node's stake and registration")
    ps = prov.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = ps.add_parser("register", help="register a node with a stake")
    _common(p)
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
        ("sweep", "withdrawn or slashed: take what is left above the storage reserve"),
        ("status", "state, stake, key, capabilities"),
    ):
        p = ps.add_parser(name, help=helptext)
        _common(p)
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

    # escrow
    esc = subparsers.add_parser("escrow", help="a client's credits for a vault")
    es = esc.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = es.add_parser("open", help="deploy the escrow with a first deposit")
    _common(p)
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
        _common(p)
        if name == "deposit":
            p.add_argument("amount", metavar="TON")
        p.add_argument("--vault")
        p.add_argument("--address", help="escrow address (default: this wallet's for the vault)")
        if name == "status":
            p.set_defaults(func=lambda a: run_async(_escrow_status(a)))
        else:
            p.set_defaults(func=lambda a, op=name: run_async(_escrow_op(a, op)))

    # vault
    vau = subparsers.add_parser("vault", help="a marketplace operator's vault")
    vs = vau.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = vs.add_parser("deploy", help="deploy this wallet's vault through the Registry")
    _common(p)
    p.add_argument(
        "--operator-key",
        help="operator ed25519 public key, hex (default: $IMAGO_HOME/keys/operator.json)",
    )
    p.add_argument("--stake", metavar="TON")
    p.add_argument("--registry")
    p.set_defaults(func=lambda a: run_async(_vault_deploy(a)))
    p = vs.add_parser("status", help="totals, stake, last epoch")
    _common(p, wallet=False)
    p.add_argument("--vault")
    p.set_defaults(func=lambda a: run_async(_vault_status(a)))
    p = vs.add_parser("unstake", help="start the unbonding delay for part of the stake")
    _common(p)
    p.add_argument("amount", metavar="TON")
    p.add_argument("--vault")
    p.set_defaults(func=lambda a: run_async(_vault_stake_op(a, "unstake")))
    p = vs.add_parser("withdraw-stake", help="after the delay, take the free stake back")
    _common(p)
    p.add_argument("--vault")
    p.set_defaults(func=lambda a: run_async(_vault_stake_op(a, "withdraw")))
