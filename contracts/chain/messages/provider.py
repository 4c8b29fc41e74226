"""Message bodies a Provider receives and sends, and the signed objects they carry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pytoniq_core import Address, Cell

from protocol.signed import PayoutVoucher, Receipt

from .body import U16, U32, U64, U256, _Body, _f
from .opcodes import (
    OP_CLAIM,
    OP_PROVIDER_INIT,
    OP_PROVIDER_PAYOUT,
    OP_PROVIDER_TOP_UP,
    OP_ROTATE_KEY,
    OP_SLASH,
    OP_SLASH_BOUNTY,
    OP_STAKE_RETURNED,
    OP_SWEEP_PROVIDER,
    OP_UNSTAKE,
    OP_UPDATE_CAPABILITIES,
    OP_WITHDRAW_STAKE,
)

__all__ = [
    "SweepProvider",
    "Claim",
    "ProviderInit",
    "ProviderPayout",
    "ProviderTopUp",
    "RotateKey",
    "SignedPayout",
    "SignedReceipt",
    "Slash",
    "SlashBounty",
    "StakeReturned",
    "Unstake",
    "UpdateCapabilities",
    "WithdrawStake",
]


@dataclass(frozen=True, slots=True)
class SignedPayout(_Body):
    """signature:bits512 voucher:^PayoutVoucher = SignedPayout;"""

    signature: bytes = _f("bits512")
    voucher: PayoutVoucher = _f(("refobj", PayoutVoucher))


@dataclass(frozen=True, slots=True)
class SignedReceipt(_Body):
    """signature:bits512 receipt:^Receipt = SignedReceipt;"""

    signature: bytes = _f("bits512")
    receipt: Receipt = _f(("refobj", Receipt))


@dataclass(frozen=True, slots=True)
class ProviderInit(_Body):
    """provider_init#50520001 query_id:uint64 stake:Coins node_key:uint256
    unbonding_delay:uint32 slash_bounty_bps:uint16 capabilities:^Capabilities
    owner:MsgAddressInt = ProviderInit;  (owner: the registrant, for a bounce refund)"""

    OP: ClassVar[int] = OP_PROVIDER_INIT
    query_id: int = _f(U64)
    stake: int = _f("coins")
    node_key: int = _f(U256)
    unbonding_delay: int = _f(U32)
    slash_bounty_bps: int = _f(U16)
    capabilities: Cell = _f("ref")
    owner: Address = _f("address")


@dataclass(frozen=True, slots=True)
class ProviderTopUp(_Body):
    """provider_top_up#50520010 query_id:uint64 = ProviderTopUp;"""

    OP: ClassVar[int] = OP_PROVIDER_TOP_UP
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class RotateKey(_Body):
    """rotate_key#50520011 query_id:uint64 node_key:uint256 = RotateKey;"""

    OP: ClassVar[int] = OP_ROTATE_KEY
    query_id: int = _f(U64)
    node_key: int = _f(U256)


@dataclass(frozen=True, slots=True)
class UpdateCapabilities(_Body):
    """update_capabilities#50520012 query_id:uint64 capabilities:^Capabilities
    = UpdateCapabilities;"""

    OP: ClassVar[int] = OP_UPDATE_CAPABILITIES
    query_id: int = _f(U64)
    capabilities: Cell = _f("ref")


@dataclass(frozen=True, slots=True)
class Unstake(_Body):
    """unstake#50520013 query_id:uint64 = Unstake;"""

    OP: ClassVar[int] = OP_UNSTAKE
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class WithdrawStake(_Body):
    """withdraw_stake#50520014 query_id:uint64 = WithdrawStake;"""

    OP: ClassVar[int] = OP_WITHDRAW_STAKE
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class Claim(_Body):
    """claim#50520015 query_id:uint64 signed:^SignedPayout = Claim;"""

    OP: ClassVar[int] = OP_CLAIM
    query_id: int = _f(U64)
    signed: SignedPayout = _f(("refobj", SignedPayout))


@dataclass(frozen=True, slots=True)
class Slash(_Body):
    """slash#50520016 query_id:uint64 proof1:^SignedReceipt proof2:^SignedReceipt = Slash;"""

    OP: ClassVar[int] = OP_SLASH
    query_id: int = _f(U64)
    proof1: SignedReceipt = _f(("refobj", SignedReceipt))
    proof2: SignedReceipt = _f(("refobj", SignedReceipt))


@dataclass(frozen=True, slots=True)
class ProviderPayout(_Body):
    """provider_payout#50520020 query_id:uint64 amount:Coins = ProviderPayout;"""

    OP: ClassVar[int] = OP_PROVIDER_PAYOUT
    query_id: int = _f(U64)
    amount: int = _f("coins")


@dataclass(frozen=True, slots=True)
class StakeReturned(_Body):
    """stake_returned#50520021 query_id:uint64 amount:Coins = StakeReturned;"""

    OP: ClassVar[int] = OP_STAKE_RETURNED
    query_id: int = _f(U64)
    amount: int = _f("coins")


@dataclass(frozen=True, slots=True)
class SlashBounty(_Body):
    """slash_bounty#50520022 query_id:uint64 amount:Coins = SlashBounty;"""

    OP: ClassVar[int] = OP_SLASH_BOUNTY
    query_id: int = _f(U64)
    amount: int = _f("coins")


@dataclass(frozen=True, slots=True)
class SweepProvider(_Body):
    """sweep_provider#50520017 query_id:uint64 = SweepProvider;  (owner; withdrawn or slashed)"""

    OP: ClassVar[int] = OP_SWEEP_PROVIDER
    query_id: int = _f(U64)
