"""Message bodies the Vault receives and sends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pytoniq_core import Address, Cell

from protocol.signed import EpochCommit

from .body import U32, U64, _Body, _f
from .opcodes import (
    OP_COMMIT_EPOCH,
    OP_EXTERNAL_COMMIT,
    OP_FEES_PAID,
    OP_PAYOUT_PAID,
    OP_PAYOUT_REQUEST,
    OP_TOP_UP_STAKE,
    OP_UNSTAKE_VAULT,
    OP_VAULT_INIT,
    OP_VAULT_STAKE_RETURNED,
    OP_WITHDRAW_FEES,
    OP_WITHDRAW_VAULT_STAKE,
)
from .provider import SignedPayout

__all__ = [
    "CommitEpoch",
    "ExternalCommit",
    "FeesPaid",
    "PayoutPaid",
    "PayoutRequest",
    "TopUpStake",
    "UnstakeVault",
    "VaultInit",
    "VaultStakeReturned",
    "WithdrawFees",
    "WithdrawVaultStake",
]


@dataclass(frozen=True, slots=True)
class PayoutRequest(_Body):
    """payout_request#56410002 query_id:uint64 claimed_before:Coins cumulative:Coins
    owner:MsgAddressInt seq:uint32 signed:^SignedPayout = PayoutRequest;"""

    OP: ClassVar[int] = OP_PAYOUT_REQUEST
    query_id: int = _f(U64)
    claimed_before: int = _f("coins")
    cumulative: int = _f("coins")
    owner: Address = _f("address")
    seq: int = _f(U32)
    signed: SignedPayout = _f(("refobj", SignedPayout))


@dataclass(frozen=True, slots=True)
class PayoutPaid(_Body):
    """payout_paid#56410003 query_id:uint64 amount:Coins cumulative:Coins = PayoutPaid;
    (Vault -> the provider's owner)"""

    OP: ClassVar[int] = OP_PAYOUT_PAID
    query_id: int = _f(U64)
    amount: int = _f("coins")
    cumulative: int = _f("coins")


@dataclass(frozen=True, slots=True)
class CommitEpoch(_Body):
    """commit_epoch#56410004 query_id:uint64 signature:bits512 commit:^EpochCommit = CommitEpoch;"""

    OP: ClassVar[int] = OP_COMMIT_EPOCH
    query_id: int = _f(U64)
    signature: bytes = _f("bits512")
    commit: EpochCommit = _f(("refobj", EpochCommit))


@dataclass(frozen=True, slots=True)
class ExternalCommit(_Body):
    """external_commit#5641000a signature:bits512 commit:^EpochCommit = ExternalCommit;
    (the body of an external-in message to the Vault: no query id, no value; the Vault pays
    its gas and import fee out of the operator's unwithdrawn fees)"""

    OP: ClassVar[int] = OP_EXTERNAL_COMMIT
    signature: bytes = _f("bits512")
    commit: EpochCommit = _f(("refobj", EpochCommit))


@dataclass(frozen=True, slots=True)
class WithdrawFees(_Body):
    """withdraw_fees#56410005 query_id:uint64 amount:Coins = WithdrawFees;"""

    OP: ClassVar[int] = OP_WITHDRAW_FEES
    query_id: int = _f(U64)
    amount: int = _f("coins")


@dataclass(frozen=True, slots=True)
class TopUpStake(_Body):
    """top_up_stake#56410006 query_id:uint64 = TopUpStake;"""

    OP: ClassVar[int] = OP_TOP_UP_STAKE
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class VaultInit(_Body):
    """vault_init#56410007 query_id:uint64 protocol_fee_bps:uint16 escrow_close_delay:uint32
    unbonding_delay:uint32 escrow_code:^Cell provider_code:^Cell = VaultInit;
    (Registry -> Vault at deployment; stored on the first one, the value is stake)"""

    OP: ClassVar[int] = OP_VAULT_INIT
    query_id: int = _f(U64)
    protocol_fee_bps: int = _f(("uint", 16))
    escrow_close_delay: int = _f(U32)
    unbonding_delay: int = _f(U32)
    escrow_code: Cell = _f("ref")
    provider_code: Cell = _f("ref")


@dataclass(frozen=True, slots=True)
class UnstakeVault(_Body):
    """unstake_vault#56410008 query_id:uint64 amount:Coins = UnstakeVault;  (operator)"""

    OP: ClassVar[int] = OP_UNSTAKE_VAULT
    query_id: int = _f(U64)
    amount: int = _f("coins")


@dataclass(frozen=True, slots=True)
class WithdrawVaultStake(_Body):
    """withdraw_vault_stake#56410009 query_id:uint64 = WithdrawVaultStake;  (operator)"""

    OP: ClassVar[int] = OP_WITHDRAW_VAULT_STAKE
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class VaultStakeReturned(_Body):
    """vault_stake_returned#56410012 query_id:uint64 amount:Coins = VaultStakeReturned;"""

    OP: ClassVar[int] = OP_VAULT_STAKE_RETURNED
    query_id: int = _f(U64)
    amount: int = _f("coins")


@dataclass(frozen=True, slots=True)
class FeesPaid(_Body):
    """fees_paid#56410011 query_id:uint64 amount:Coins = FeesPaid;"""

    OP: ClassVar[int] = OP_FEES_PAID
    query_id: int = _f(U64)
    amount: int = _f("coins")
