"""A client's operations on its Escrow, and the matcher's charges."""

from __future__ import annotations

from typing import Any

from pytoniq_core import Address

from protocol.signed import SpendVoucher

from .. import addresses
from ..addresses import Sender
from ..messages.escrow import Charge, Close, Deposit, EscrowWithdraw
from ..transactions import Trace
from .base import (
    OP_VALUE,
    _key_int,
    _send,
    new_query_id,
)


async def escrow_open(
    owner: Sender,
    vault: Address,
    spend_key: bytes | int,
    amount: int,
    close_delay: int,
    *,
    check: bool = True,
    **kw: Any,
) -> tuple[Address, Trace]:
    """Deploy the owner's Escrow for ``vault`` with a first deposit of ``amount``.

    ``close_delay`` must be the vault's escrow close delay (``VaultData.escrow_close_delay``).
    """
    si = addresses.escrow_state_init(vault, owner.address, _key_int(spend_key), close_delay)
    addr = addresses.address_of(si)
    body = Deposit(new_query_id()).to_cell()
    trace = await _send("escrow open", owner, addr, amount, body, check=check, state_init=si, **kw)
    return addr, trace


async def escrow_deposit(
    sender: Sender, escrow: Address, amount: int, *, check: bool = True, **kw: Any
) -> Trace:
    body = Deposit(new_query_id()).to_cell()
    return await _send("deposit", sender, escrow, amount, body, check=check, **kw)


async def escrow_charge(
    sender: Sender,
    escrow: Address,
    voucher: SpendVoucher,
    signature: bytes,
    *,
    value: int | None = None,
    check: bool = True,
    **kw: Any,
) -> Trace:
    """Submit a client-signed spend voucher: the escrow pays the delta to its vault."""
    body = Charge(new_query_id(), signature, voucher).to_cell()
    return await _send(
        "charge", sender, escrow, value or OP_VALUE["charge"], body, check=check, **kw
    )


MAX_BATCH = 200  # messages in one wallet transfer (v5r1 takes up to 255)


async def escrow_charges(
    sender: Any, charges: list[tuple[Address, SpendVoucher, bytes]], **kw: Any
) -> Trace:
    """Several charges in one wallet transfer (``sender`` is a wallet with ``send``): one
    wallet transaction for all of them. Check each Escrow's ``charged`` afterwards: one
    refused charge does not stop the others."""
    from ..wallet import OutMessage

    if not 0 < len(charges) <= MAX_BATCH:
        raise ValueError(f"between 1 and {MAX_BATCH} charges in one transfer")
    messages = [
        OutMessage(
            escrow,
            OP_VALUE["charge"],
            Charge(new_query_id(), signature, voucher).to_cell(),
            bounce=True,
        )
        for escrow, voucher, signature in charges
    ]
    return await sender.send(messages, **kw)


async def escrow_close(owner: Sender, escrow: Address, *, check: bool = True, **kw: Any) -> Trace:
    body = Close(new_query_id()).to_cell()
    return await _send("escrow close", owner, escrow, OP_VALUE["simple"], body, check=check, **kw)


async def escrow_withdraw(
    owner: Sender, escrow: Address, *, check: bool = True, **kw: Any
) -> Trace:
    body = EscrowWithdraw(new_query_id()).to_cell()
    return await _send(
        "escrow withdraw", owner, escrow, OP_VALUE["simple"], body, check=check, **kw
    )
