"""Governance's operations on the Registry, and deploying the whole contract set."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pytoniq_core import Address

from protocol.signed import model_hash

from .. import addresses, artifacts
from ..addresses import DEFAULT_PARAMS, Sender
from ..messages.registry import (
    ChangeOwner,
    RegistryParams,
    SetImage,
    SetModel,
    SweepRegistry,
    UpdateParams,
)
from ..transactions import Trace
from .base import (
    OP_VALUE,
    TON,
    OperationFailed,
    _key_int,
    _send,
    failed_exit_codes,
    new_query_id,
)
from .vault import deploy_vault


def _raw(a: Address) -> str:
    return a.to_str(is_user_friendly=False)


async def deploy_registry(
    owner: Sender, params: RegistryParams = DEFAULT_PARAMS, *, value: int | None = None
) -> tuple[Address, Trace]:
    """Deploy the Registry owned by ``owner`` (an empty-body top-up with the StateInit).

    Its initial params are checked here as ``UpdateParams`` checks them on-chain (no message
    checks the StateInit): a fee of at most 100 %, a slashing bounty of at most 50 %."""
    addresses.check_params(params)
    reserve = addresses.STORAGE_RESERVES["registry"]
    if value is None:
        value = reserve + TON // 10
    if value < reserve:
        raise ValueError(f"a Registry keeps a {reserve} nanoTON reserve")
    si = addresses.registry_state_init(owner.address, params)
    addr = addresses.address_of(si)
    trace = await owner.transfer(addr, value, None, state_init=si, bounce=False)
    if failed_exit_codes(trace):
        raise OperationFailed("registry deploy", trace)
    return addr, trace


async def deploy_all(
    owner: Sender,
    *,
    chain: str = "devnet",
    params: RegistryParams = DEFAULT_PARAMS,
    operator: Sender | None = None,
    operator_key: int | None = None,
    vault_stake: int | None = None,
) -> addresses.Deployment:
    """Deploy the Registry and, given an operator, its Vault. Returns the Deployment."""
    registry, _ = await deploy_registry(owner, params)
    dep = addresses.Deployment(
        chain=chain,
        registry=_raw(registry),
        owner=_raw(owner.address),
        params=asdict(params),
        code_hashes={n: a.code_hash_hex for n, a in artifacts.load_all().items()},
        vaults={},
        providers={},
        escrows={},
    )
    if operator is not None and operator_key is not None:
        stake = vault_stake if vault_stake is not None else params.min_vault_stake
        vault = await deploy_vault(
            operator,
            registry,
            operator_key,
            stake,
            client=getattr(operator, "client", None),
            params=params,
        )
        dep.vaults[_raw(operator.address)] = _raw(vault)
    return dep


async def update_params(
    owner: Sender, registry: Address, params: RegistryParams, *, check: bool = True, **kw: Any
) -> Trace:
    body = UpdateParams(new_query_id(), params).to_cell()
    return await _send("update params", owner, registry, OP_VALUE["admin"], body, check=check, **kw)


async def allow_image(
    owner: Sender,
    registry: Address,
    image: int | bytes,
    allowed: bool = True,
    *,
    check: bool = True,
    **kw: Any,
) -> Trace:
    body = SetImage(new_query_id(), _key_int(image), allowed).to_cell()
    return await _send("allow image", owner, registry, OP_VALUE["admin"], body, check=check, **kw)


async def allow_model(
    owner: Sender,
    registry: Address,
    model: int | str,
    allowed: bool = True,
    *,
    check: bool = True,
    **kw: Any,
) -> Trace:
    m = model_hash(model) if isinstance(model, str) else model
    body = SetModel(new_query_id(), m, allowed).to_cell()
    return await _send("allow model", owner, registry, OP_VALUE["admin"], body, check=check, **kw)


async def registry_sweep(
    owner: Sender, registry: Address, *, check: bool = True, **kw: Any
) -> Trace:
    """Send everything on the Registry above its storage reserve to its owner (governance)."""
    body = SweepRegistry(new_query_id()).to_cell()
    return await _send(
        "registry sweep", owner, registry, OP_VALUE["admin"], body, check=check, **kw
    )


async def change_owner(
    owner: Sender, registry: Address, new_owner: Address, *, check: bool = True, **kw: Any
) -> Trace:
    body = ChangeOwner(new_query_id(), new_owner).to_cell()
    return await _send("change owner", owner, registry, OP_VALUE["admin"], body, check=check, **kw)
