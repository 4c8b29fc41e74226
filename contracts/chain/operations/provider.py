"""A GPU owner's operations on its Provider (and anyone's slashing report)."""

from __future__ import annotations

from typing import Any

from pytoniq_core import Address, Cell

from protocol.signed import PayoutVoucher, Receipt

from .. import addresses, getters
from ..addresses import Sender
from ..messages.capabilities import Capabilities
from ..messages.provider import (
    Claim,
    ProviderTopUp,
    RotateKey,
    SignedPayout,
    SignedReceipt,
    Slash,
    SweepProvider,
    Unstake,
    UpdateCapabilities,
    WithdrawStake,
)
from ..messages.registry import (
    RegisterProvider,
)
from ..toncenter import ToncenterClient
from ..transactions import Trace
from .base import (
    OP_VALUE,
    _key_int,
    _send,
    new_query_id,
)


async def register_provider(
    owner: Sender,
    client: ToncenterClient,
    registry: Address,
    node_key: bytes | int,
    stake: int,
    capabilities: Capabilities | Cell,
    *,
    seq: int = 0,
    check: bool = True,
    **kw: Any,
) -> tuple[Address, Trace]:
    """Register a node: the Registry deploys its Provider with ``stake``."""
    reg = await getters.get_registry_data(client, registry)
    caps = capabilities.to_cell() if isinstance(capabilities, Capabilities) else capabilities
    body = RegisterProvider(new_query_id(), seq, _key_int(node_key), caps).to_cell()
    trace = await _send(
        "register provider", owner, registry, stake + reg.register_fee, body, check=check, **kw
    )
    return addresses.provider_address(registry, owner.address, seq), trace


async def provider_top_up(
    owner: Sender, provider: Address, amount: int, *, check: bool = True, **kw: Any
) -> Trace:
    body = ProviderTopUp(new_query_id()).to_cell()
    return await _send("provider top-up", owner, provider, amount, body, check=check, **kw)


async def provider_rotate_key(
    owner: Sender, provider: Address, node_key: bytes | int, *, check: bool = True, **kw: Any
) -> Trace:
    body = RotateKey(new_query_id(), _key_int(node_key)).to_cell()
    return await _send("rotate key", owner, provider, OP_VALUE["simple"], body, check=check, **kw)


async def provider_update_capabilities(
    owner: Sender,
    provider: Address,
    capabilities: Capabilities | Cell,
    *,
    check: bool = True,
    **kw: Any,
) -> Trace:
    caps = capabilities.to_cell() if isinstance(capabilities, Capabilities) else capabilities
    body = UpdateCapabilities(new_query_id(), caps).to_cell()
    return await _send(
        "update capabilities", owner, provider, OP_VALUE["simple"], body, check=check, **kw
    )


async def provider_unstake(
    owner: Sender, provider: Address, *, check: bool = True, **kw: Any
) -> Trace:
    body = Unstake(new_query_id()).to_cell()
    return await _send("unstake", owner, provider, OP_VALUE["simple"], body, check=check, **kw)


async def provider_withdraw(
    owner: Sender, provider: Address, *, check: bool = True, **kw: Any
) -> Trace:
    body = WithdrawStake(new_query_id()).to_cell()
    return await _send(
        "withdraw stake", owner, provider, OP_VALUE["simple"], body, check=check, **kw
    )


async def provider_sweep(
    owner: Sender, provider: Address, *, check: bool = True, **kw: Any
) -> Trace:
    """Withdrawn or slashed: send everything above the storage reserve to the owner."""
    body = SweepProvider(new_query_id()).to_cell()
    return await _send("sweep", owner, provider, OP_VALUE["simple"], body, check=check, **kw)


async def provider_claim(
    owner: Sender,
    provider: Address,
    voucher: PayoutVoucher,
    signature: bytes,
    *,
    value: int | None = None,
    check: bool = True,
    **kw: Any,
) -> Trace:
    """Claim an operator-signed payout voucher; the payout reaches the owner's wallet."""
    body = Claim(new_query_id(), SignedPayout(signature, voucher)).to_cell()
    return await _send(
        "claim", owner, provider, value or OP_VALUE["claim"], body, check=check, **kw
    )


async def provider_slash(
    reporter: Sender,
    provider: Address,
    proof1: tuple[Receipt, bytes],
    proof2: tuple[Receipt, bytes],
    *,
    check: bool = True,
    **kw: Any,
) -> Trace:
    """Report an equivocation: two different receipts for one job signed by the node key."""
    body = Slash(
        new_query_id(),
        SignedReceipt(proof1[1], proof1[0]),
        SignedReceipt(proof2[1], proof2[0]),
    ).to_cell()
    return await _send("slash", reporter, provider, OP_VALUE["slash"], body, check=check, **kw)
