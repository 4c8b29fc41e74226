"""The operator's operations on its Vault: deploying it, epoch commits, fees, stake."""

from __future__ import annotations

import re
from typing import Any

from pytoniq.contract.contract import Contract
from pytoniq_core import Address

from protocol.signed import EpochCommit

from .. import addresses, getters
from ..addresses import Sender
from ..messages.registry import (
    DeployVault,
    RegistryParams,
)
from ..messages.vault import (
    CommitEpoch,
    ExternalCommit,
    TopUpStake,
    UnstakeVault,
    WithdrawFees,
    WithdrawVaultStake,
)
from ..toncenter import ToncenterClient, ToncenterError
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


async def deploy_vault(
    operator: Sender,
    registry: Address,
    operator_key: bytes | int,
    stake: int,
    *,
    client: ToncenterClient | None = None,
    params: RegistryParams | None = None,
    check: bool = True,
    **kw: Any,
) -> Address:
    """Ask the Registry to deploy this operator's Vault with ``stake``.

    The Vault's address depends only on (registry, operator, key), not on the Registry's
    params (``params`` is accepted for compatibility and ignored); ``client`` reads the
    exact deploy fee on-chain. Deploying again only adds stake.
    """
    del params
    if client is not None:
        fee = (await getters.get_registry_data(client, registry)).deploy_vault_fee
    else:
        fee = TON  # above deployVaultFee(): gas, forward fee, storage reserve
    body = DeployVault(new_query_id(), _key_int(operator_key)).to_cell()
    await _send("deploy vault", operator, registry, stake + fee, body, check=check, **kw)
    return addresses.vault_address(registry, operator.address, _key_int(operator_key))


async def vault_commit_epoch(
    sender: Sender,
    vault: Address,
    commit: EpochCommit,
    signature: bytes,
    *,
    check: bool = True,
    **kw: Any,
) -> Trace:
    body = CommitEpoch(new_query_id(), signature, commit).to_cell()
    return await _send("epoch commit", sender, vault, OP_VALUE["commit"], body, check=check, **kw)


async def vault_commit_epoch_external(
    client: ToncenterClient,
    vault: Address,
    commit: EpochCommit,
    signature: bytes,
    *,
    timeout: float = 60.0,
    on_poll: Any = None,
) -> Trace:
    """Commit an epoch with an external message to the Vault: no wallet, no value. The Vault
    pays its gas and import fee (``external_commit_fee``) out of the operator's unwithdrawn
    fees. Returns the trace (the Vault's transaction alone).

    Raises :class:`OperationFailed` when the Vault refuses it (every check comes before it
    accepts the message: a replayed epoch 310, another network 320, a bad signature 304,
    fees short 311, balance short 316...): the chain then ran no transaction and nothing was
    spent; ``exit_codes`` holds the code the chain reported (None if it gave none)."""
    body = ExternalCommit(signature, commit).to_cell()
    boc = Contract.create_external_msg(dest=vault, body=body).serialize().to_boc()
    info = await client.get_address_information(vault)
    try:
        sent = await client.send_boc_return_hash(boc)
    except ToncenterError as e:
        if not _not_accepted(e):
            raise
        raise OperationFailed(
            "external epoch commit", Trace([]), exit_codes=[_refusal_exit_code(e)]
        ) from e
    root = await client.wait_for_message(
        sent, vault, after_lt=info.last_transaction_lt, timeout=timeout, on_poll=on_poll
    )
    trace = await client.wait_for_trace(root, timeout=timeout, on_poll=on_poll)
    if failed_exit_codes(trace):
        raise OperationFailed("external epoch commit", trace)
    return trace


def _not_accepted(e: ToncenterError) -> bool:
    """An external message the contract did not accept (the liteserver's wording, which
    toncenter and the devnet pass on)."""
    return e.exit_code is not None or "not accepted" in e.message


_EXIT_CODE = re.compile(r"exit[ _]?code[=:]?\s*(-?\d+)", re.IGNORECASE)


def _refusal_exit_code(e: ToncenterError) -> int | None:
    if e.exit_code is not None:
        return int(e.exit_code)
    m = _EXIT_CODE.search(e.message)
    return int(m[1]) if m else None


async def vault_withdraw_fees(
    operator: Sender, vault: Address, amount: int, *, check: bool = True, **kw: Any
) -> Trace:
    body = WithdrawFees(new_query_id(), amount).to_cell()
    return await _send(
        "withdraw fees", operator, vault, OP_VALUE["simple"], body, check=check, **kw
    )


async def vault_top_up_stake(
    operator: Sender, vault: Address, amount: int, *, check: bool = True, **kw: Any
) -> Trace:
    body = TopUpStake(new_query_id()).to_cell()
    return await _send("vault top-up", operator, vault, amount, body, check=check, **kw)


async def vault_unstake(
    operator: Sender, vault: Address, amount: int, *, check: bool = True, **kw: Any
) -> Trace:
    """Start the unbonding delay for ``amount`` of the Vault's stake (operator only)."""
    body = UnstakeVault(new_query_id(), amount).to_cell()
    return await _send("vault unstake", operator, vault, OP_VALUE["admin"], body, check=check, **kw)


async def vault_withdraw_stake(
    operator: Sender, vault: Address, *, check: bool = True, **kw: Any
) -> Trace:
    """After the delay: pay the requested stake, at most what invariant 3 leaves free."""
    body = WithdrawVaultStake(new_query_id()).to_cell()
    return await _send(
        "vault withdraw stake", operator, vault, OP_VALUE["admin"], body, check=check, **kw
    )
