"""Message bodies an Escrow receives and sends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pytoniq_core import Address

from protocol.signed import SpendVoucher

from .body import U64, U256, _Body, _f
from .opcodes import (
    OP_CHARGE,
    OP_CLOSE,
    OP_DEPOSIT,
    OP_ESCROW_CHARGED,
    OP_ESCROW_REFUND,
    OP_ESCROW_WITHDRAW,
)

__all__ = ["Charge", "Close", "Deposit", "EscrowCharged", "EscrowRefund", "EscrowWithdraw"]


@dataclass(frozen=True, slots=True)
class Deposit(_Body):
    """deposit#45530001 query_id:uint64 = Deposit;  (an empty body deposits too)"""

    OP: ClassVar[int] = OP_DEPOSIT
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class Charge(_Body):
    """charge#45530002 query_id:uint64 signature:bits512 voucher:^SpendVoucher = Charge;"""

    OP: ClassVar[int] = OP_CHARGE
    query_id: int = _f(U64)
    signature: bytes = _f("bits512")
    voucher: SpendVoucher = _f(("refobj", SpendVoucher))


@dataclass(frozen=True, slots=True)
class Close(_Body):
    """close#45530003 query_id:uint64 = Close;"""

    OP: ClassVar[int] = OP_CLOSE
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class EscrowWithdraw(_Body):
    """withdraw#45530004 query_id:uint64 = EscrowWithdraw;"""

    OP: ClassVar[int] = OP_ESCROW_WITHDRAW
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class EscrowCharged(_Body):
    """escrow_charged#56410001 query_id:uint64 amount:Coins owner:MsgAddressInt
    spend_key:uint256 excess_to:MsgAddressInt = EscrowCharged;"""

    OP: ClassVar[int] = OP_ESCROW_CHARGED
    query_id: int = _f(U64)
    amount: int = _f("coins")
    owner: Address = _f("address")
    spend_key: int = _f(U256)
    excess_to: Address = _f("address")


@dataclass(frozen=True, slots=True)
class EscrowRefund(_Body):
    """escrow_refund#45530010 query_id:uint64 amount:Coins = EscrowRefund;"""

    OP: ClassVar[int] = OP_ESCROW_REFUND
    query_id: int = _f(U64)
    amount: int = _f("coins")
