"""Any message body of the protocol, parsed by its opcode."""

from __future__ import annotations

from pytoniq_core import Cell

from .body import MessageError, ReturnExcess, Swept, _Body
from .escrow import Charge, Close, Deposit, EscrowCharged, EscrowRefund, EscrowWithdraw
from .provider import (
    Claim,
    ProviderInit,
    ProviderPayout,
    ProviderTopUp,
    RotateKey,
    Slash,
    SlashBounty,
    StakeReturned,
    SweepProvider,
    Unstake,
    UpdateCapabilities,
    WithdrawStake,
)
from .registry import (
    ChangeOwner,
    DeployVault,
    ForwardedFunds,
    RegisterProvider,
    SetImage,
    SetModel,
    SlashedStake,
    SweepRegistry,
    UpdateParams,
)
from .vault import (
    CommitEpoch,
    ExternalCommit,
    FeesPaid,
    PayoutPaid,
    PayoutRequest,
    TopUpStake,
    UnstakeVault,
    VaultInit,
    VaultStakeReturned,
    WithdrawFees,
    WithdrawVaultStake,
)

__all__ = ["MESSAGES", "parse_body"]


MESSAGES: dict[int, type[_Body]] = {
    cls.OP: cls  # type: ignore[misc]
    for cls in (
        ReturnExcess, UpdateParams, SetImage, SetModel, ChangeOwner, RegisterProvider,
        DeployVault, SlashedStake, ForwardedFunds, ProviderInit, ProviderTopUp, RotateKey,
        UpdateCapabilities, Unstake, WithdrawStake, Claim, Slash, ProviderPayout,
        StakeReturned, SlashBounty, PayoutRequest, PayoutPaid, CommitEpoch, WithdrawFees,
        TopUpStake, FeesPaid, Deposit, Charge, Close, EscrowWithdraw, EscrowCharged,
        EscrowRefund, VaultInit, UnstakeVault, WithdrawVaultStake, VaultStakeReturned,
        Swept, SweepRegistry, SweepProvider, ExternalCommit,
    )
}  # fmt: skip


def parse_body(cell: Cell) -> _Body | None:
    """Parse any message body of the protocol by its opcode; None for an empty body."""
    s = cell.begin_parse()
    if s.remaining_bits < 32:
        if s.remaining_bits == 0 and s.remaining_refs == 0:
            return None
        raise MessageError("body shorter than an opcode")
    op = s.preload_uint(32)
    cls = MESSAGES.get(op)
    if cls is None:
        raise MessageError(f"unknown opcode {op:#010x}")
    return cls.from_cell(cell)
